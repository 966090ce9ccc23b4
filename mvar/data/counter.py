"""Bad-sample accounting shared between a loader and its DataLoader workers."""
from __future__ import annotations

import logging
import multiprocessing

from mvar.data.manifest import DataError

log = logging.getLogger("mvar.data")


class BadSampleCounter:
    """Counts samples skipped because they could not be read or decoded.

    The count lives in shared memory so the training loop reads the total of
    all DataLoader workers (`counter.value`, logged as `data/bad_samples`).
    Past `limit` the worker that sees the next bad sample raises DataError
    naming the shard, which the DataLoader re-raises in the training loop.
    One counter per rank; the limit applies per rank.
    """

    def __init__(self, limit: int):
        self.limit = limit
        # inherited by DataLoader workers when they start (fork or spawn)
        self._count = multiprocessing.get_context().Value("q", 0)
        self._seen: set[tuple[str, str]] = set()  # per process: an endless stream re-reads shards

    @property
    def value(self) -> int:
        return int(self._count.value)

    def add(self, shard: str, key: str, reason: str, num: int = 1) -> None:
        """Record `num` lost samples at (shard, key); raise once past the limit."""
        if (shard, key) in self._seen:
            return
        self._seen.add((shard, key))
        with self._count.get_lock():
            self._count.value += num
            total = self._count.value
        log.warning("skipped %d bad sample(s) in %s at %s: %s (%d so far)", num, shard, key, reason, total)
        if total > self.limit:
            raise DataError(
                f"{total} bad samples, more than max_bad_samples={self.limit}; latest in shard "
                f"{shard} (sample {key}): {reason}. Check the set with `mvar data verify`, "
                f"repack the shard, or raise data.max_bad_samples")
