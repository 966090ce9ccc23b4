"""DataConfig: where the shards are and how each rank reads them (the `data.*` keys)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mvar.config import check


@dataclass
class DataConfig:
    # directory or URL prefix holding manifest.json and the shards (local, s3://, gs://, ...)
    shards: str = ""
    # held-out shard set for the evaluation loader; '' uses `shards`
    eval_shards: str = ""
    # wraps each shard URL before opening, e.g. 'pipe:aws s3 cp {url} -'; '' opens it directly
    shard_opener: str = ""
    # what the run expects: image shards, token shards (latent cache), or whatever the manifest says
    kind: Literal["auto", "images", "tokens"] = "auto"
    # expected image side in pixels; 0 accepts the manifest's
    image_size: int = 0
    batch_size: int = 64              # per rank
    num_workers: int = 2              # DataLoader worker processes per rank
    shuffle_buffer: int = 2000        # samples held per worker for shuffling
    # batches per rank per epoch, the same on every rank; 0 = num_samples // (batch_size * world_size)
    steps_per_epoch: int = 0
    random_flip: bool = True          # training only; token shards use the stored flipped variant
    max_bad_samples: int = 10         # per rank; past it the job fails naming the shard
    verify_checksums: bool = False    # sha256 of every shard against the manifest before reading
    prefetch_factor: int = 2          # batches each worker keeps ready
    pin_memory: bool = True           # only takes effect when CUDA is present
    seed: int = 0                     # shard order, shuffle and flips derive from (seed, epoch, rank, worker)

    def validate(self, prefix: str = "") -> None:
        check(self.image_size >= 0, prefix + "image_size", "must be >= 0 (0 = from the manifest)")
        check(self.batch_size > 0, prefix + "batch_size", "must be > 0")
        check(self.num_workers >= 0, prefix + "num_workers", "must be >= 0 (0 = read in the training process)")
        check(self.shuffle_buffer >= 0, prefix + "shuffle_buffer", "must be >= 0 (0 = no shuffle buffer)")
        check(self.steps_per_epoch >= 0, prefix + "steps_per_epoch", "must be >= 0 (0 = one pass of the data)")
        check(self.max_bad_samples >= 0, prefix + "max_bad_samples", "must be >= 0")
        check(self.prefetch_factor >= 1, prefix + "prefetch_factor", "must be >= 1")
        check(not self.shard_opener or "{url}" in self.shard_opener, prefix + "shard_opener",
              "must contain '{url}', e.g. 'pipe:aws s3 cp {url} -'")
