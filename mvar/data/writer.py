"""Resumable writing of a shard set (used by synth, pack and tokenize).

A job is a plan (its inputs and options, as a JSON-able dict) and a fixed
number of shards whose contents depend only on the plan. Each finished shard
leaves a small state record beside the plan in `OUT/.mvar-data/`, written
before the shard is renamed into place; so a visible shard always has its
record, and a rerun of the same plan skips it and writes only the rest. A
rerun with another plan is refused rather than mixing two data sets.

A full disk while a shard is written (its samples, the tar's end, the fsync, its record) removes
that shard's temp file and stops the job with one line (DiskFull): the shards before it stay
complete, the manifest is not written, and a rerun after freeing space writes the rest.
"""
from __future__ import annotations

import fcntl
import json
import os
from typing import Any, Iterable

from mvar import faults
from mvar.data.manifest import MANIFEST_NAME, ShardInfo
from mvar.data.tario import Sample, ShardWriter, remove_stale_temps, shard_name
from mvar.errors import DiskFull, UserError
from mvar.files import disk_full, disk_full_error, fsync_path, read_json_mapping, write_text_atomic

STATE_DIR = ".mvar-data"


def _write_json_atomic(path: str, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


class ShardSetWriter:
    """Owns an output directory for one job (an exclusive lock) until `close()`."""

    def __init__(self, out: str, plan: dict[str, Any]):
        self.out, self.plan = out, plan
        self.state_dir = os.path.join(out, STATE_DIR)
        os.makedirs(self.state_dir, exist_ok=True)
        self._lock_fd = os.open(os.path.join(self.state_dir, "lock"), os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise UserError(f"another `mvar data` command is writing to '{out}'") from None
        self.stale_temps = remove_stale_temps(out) + remove_stale_temps(self.state_dir)
        self._check_plan()

    def _check_plan(self) -> None:
        path = os.path.join(self.state_dir, "plan.json")
        if os.path.exists(path):
            try:
                old = read_json_mapping(path, "job state file")
            except UserError as err:
                self.close()
                raise UserError(f"{err}; delete '{self.state_dir}' (and the shards beside it) to start over") from None
            if old != json.loads(json.dumps(self.plan)):
                changed = sorted(k for k in set(old) | set(self.plan) if old.get(k) != self.plan.get(k))
                self.close()
                raise UserError(f"'{self.out}' holds shards of another job (different {', '.join(changed)}); "
                                f"write to a new --out, or delete '{self.out}' to start over")
            return
        if os.path.exists(os.path.join(self.out, MANIFEST_NAME)):
            self.close()
            raise UserError(f"'{self.out}' holds a shard set not made by this job; use a new --out")
        _write_json_atomic(path, self.plan)

    def _record_path(self, index: int) -> str:
        return os.path.join(self.state_dir, shard_name(index) + ".json")

    def is_done(self, index: int) -> bool:
        return os.path.exists(os.path.join(self.out, shard_name(index)))

    def open_shard(self, index: int) -> ShardWriter:
        return ShardWriter(self.out, shard_name(index))

    def finish_shard(self, writer: ShardWriter, stats: dict[str, Any] | None = None) -> ShardInfo:
        """Record, then publish: a published shard always has its record."""
        info = writer.finish()
        index = int(writer.name.split("-")[1].split(".")[0])
        _write_json_atomic(self._record_path(index), {"shard": info.__dict__, "stats": stats or {}})
        writer.publish()
        return info

    def write(self, index: int, samples: Iterable[tuple[str, Sample]],
              stats: dict[str, Any] | None = None) -> ShardInfo:
        """Write shard `index` from (key, sample) pairs; `stats` may be filled while they are produced."""
        writer = self.open_shard(index)
        try:
            for key, sample in samples:
                writer.add(key, sample)
            faults.point("shard-data-written", index)  # testing aid: MVAR_FAULT=enospc-shard@N
            return self.finish_shard(writer, stats)
        except BaseException as err:
            writer.abort()
            if isinstance(err, DiskFull) or disk_full(err):
                done = sum(self.is_done(i) for i in range(index))
                raise disk_full_error(self.out, shard_name(index), f"; it was removed, the {done} shard(s) before "
                                      "it are complete: free space and rerun the same command to write the "
                                      "rest") from None
            raise

    def records(self, num_shards: int) -> list[tuple[ShardInfo, dict[str, Any]]]:
        """(shard info, stats) of every shard, all of which must be done."""
        out = []
        for index in range(num_shards):
            path = self._record_path(index)
            record = read_json_mapping(path, "shard record")
            try:
                out.append((ShardInfo(**record["shard"]), dict(record["stats"])))
            except (KeyError, TypeError, ValueError) as err:
                raise UserError(f"shard record '{path}' is not one this job wrote ({err!r}); delete it and "
                                f"{shard_name(index)} beside it, then rerun to write that shard again") from None
        return out

    def close(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = -1
        fsync_path(self.out)

    def __enter__(self) -> "ShardSetWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
