"""Which images an evaluation makes, and where: fixed by the config, never by the number of workers.

Sample i (0 <= i < N = num_per_class x C) has class ``classes[i % C]``. Batches are the fixed
runs [b*B, (b+1)*B) of sample indices, and batch b draws all its randomness from a generator
seeded by (seed, b); shards are fixed runs of ``samples_per_shard`` samples (whole batches).
A worker gets a contiguous run of shards and writes them, so the same config gives the same
shard bytes whether one worker or eight made them, and a rerun only makes missing shards.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from mvar.sampling import SamplingConfig


@dataclass(frozen=True)
class SamplePlan:
    classes: tuple[int, ...]
    num_per_class: int
    batch_size: int
    samples_per_shard: int
    seed: int

    @property
    def num_samples(self) -> int:
        return self.num_per_class * len(self.classes)

    @property
    def num_shards(self) -> int:
        return -(-self.num_samples // self.samples_per_shard)

    def label(self, index: int) -> int:
        return self.classes[index % len(self.classes)]

    def shard_range(self, shard: int) -> tuple[int, int]:
        lo = shard * self.samples_per_shard
        return lo, min(lo + self.samples_per_shard, self.num_samples)

    def batches(self, shard: int) -> list[tuple[int, int, int]]:
        """(batch index, first sample, end) of the batches of one shard."""
        lo, hi = self.shard_range(shard)
        return [(start // self.batch_size, start, min(start + self.batch_size, hi))
                for start in range(lo, hi, self.batch_size)]

    def batch_seed(self, batch: int) -> int:
        """A 63-bit seed from (seed, batch) through numpy's SeedSequence (well mixed, platform independent)."""
        return int(np.random.SeedSequence([self.seed, batch]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))

    def grid_indices(self, grid_classes: int, grid_per_class: int) -> list[int]:
        """Sample indices of the grid: row r, column c = the r-th sample of the c-th class."""
        cols = min(grid_classes, len(self.classes))
        rows = min(grid_per_class, self.num_per_class)
        return [r * len(self.classes) + c for r in range(rows) for c in range(cols)]


def split_contiguous(items: list[int], parts: int) -> list[list[int]]:
    """``items`` cut into at most ``parts`` contiguous, non-empty runs whose sizes differ by <= 1."""
    n = len(items)
    runs = [items[n * p // parts: n * (p + 1) // parts] for p in range(parts)]
    return [run for run in runs if run]


def setting_name(s: SamplingConfig) -> str:
    """Directory and run-name part of one sampling setting, e.g. 'cfg1.5-topk900-topp0.96'."""
    return f"cfg{s.cfg:g}-topk{s.top_k}-topp{s.top_p:g}"


def setting_params(s: SamplingConfig) -> dict:
    return {f"eval.{k}": v for k, v in asdict(s).items()}
