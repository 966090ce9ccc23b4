"""Training and evaluation loaders over image or token shards.

Each rank builds its own loader from (rank, world_size) passed in by the
caller (Ray Train workers pass `ray.train.get_context()` values), so nothing
here reads global distributed state. Readers are the (rank, DataLoader
worker) pairs: reader = rank * num_workers + worker.

Training: every reader draws an endless stream of shards (reshuffled passes
over its share of the shards when there are at least as many shards as
readers, else over all of them), shuffles samples in a buffer, flips, batches,
and stops after a fixed number of batches. Every rank yields exactly
`steps_per_epoch` batches whatever the shard sizes, so DDP never waits on a
rank that ran out of data.

Evaluation: the global sample positions 0..N-1 (manifest order) are cut into
one contiguous range per reader, so every sample is read exactly once across
all ranks and workers even with fewer shards than readers, in a fixed order.
"""
from __future__ import annotations

import random
import tarfile
import zlib
from typing import Iterator

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mvar.data import storage
from mvar.data.config import DataConfig
from mvar.data.counter import BadSampleCounter
from mvar.data.manifest import DataError, Manifest, check_tokenizer, read_manifest
from mvar.data.samples import SampleDecoder, collate
from mvar.data.tario import iter_tar_samples
from mvar.data.verify import checksum_problems

# what a damaged, truncated or vanished shard raises while being read
_SHARD_READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


def open_shard_set(location: str, kind: str = "auto", image_size: int = 0,
                   tokenizer_fingerprint: str | None = None) -> Manifest:
    """The checked manifest at `location`; raises DataError saying what is wrong and how to fix it."""
    if not location:
        raise DataError("no shard location given: set data.shards to a shard directory or URL")
    manifest = read_manifest(location)
    if kind != "auto" and manifest.kind != kind:
        raise DataError(f"'{location}' holds {manifest.kind} shards but this run reads {kind}")
    if image_size and manifest.image_size != image_size:
        raise DataError(f"'{location}' holds {manifest.image_size} px images but this run "
                        f"expects {image_size} px; repack with --image-size {image_size}")
    check_tokenizer(manifest, location, tokenizer_fingerprint)
    return manifest


def verify_shard_checksums(location: str, manifest: Manifest, indices: list[int], opener: str = "") -> None:
    """sha256 of the given shards against the manifest; DataError naming every mismatch."""
    bad = checksum_problems(location, manifest, indices, opener)
    if bad:
        raise DataError(f"checksum mismatch in '{location}': " + "; ".join(bad)
                        + ". Repack, or run `mvar data verify` for the full report")


class _Reader:
    """What one reader needs; picklable, so DataLoader workers receive a copy."""

    def __init__(self, cfg: DataConfig, location: str, manifest: Manifest, rank: int, world_size: int):
        self.manifest, self.rank, self.world_size = manifest, rank, world_size
        self.num_workers = max(cfg.num_workers, 1)  # 0 workers = one reader in the training process
        self.urls = [storage.apply_opener(storage.join(location, s.name), cfg.shard_opener)
                     for s in manifest.shards]
        self.decoder = SampleDecoder(manifest.kind, manifest.num_classes, manifest.image_size, manifest.tokens)
        self.counter = BadSampleCounter(cfg.max_bad_samples)
        self.batch_size, self.seed = cfg.batch_size, cfg.seed
        self.num_decoded = 0  # per process; lets an endless stream notice it yields nothing

    def worker(self) -> tuple[int, int]:
        """(this reader's id, number of readers) from the DataLoader worker we run in."""
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * self.num_workers + worker, self.world_size * self.num_workers

    def read(self, shard_ids: Iterator[int]) -> Iterator[tuple[int, int, str, dict]]:
        """(shard index, position in shard, key, raw sample); damaged tails are counted, not raised."""
        for i in shard_ids:
            info, position = self.manifest.shards[i], 0
            try:
                with storage.open_read(self.urls[i]) as stream:
                    for key, sample in iter_tar_samples(stream):
                        yield i, position, key, sample
                        position += 1
            except _SHARD_READ_ERRORS as err:
                lost = max(info.num_samples - position, 1)
                self.counter.add(self.urls[i], f"tar@{position}",
                                 f"unreadable after {position} samples ({err}); {lost} lost", lost)

    def decode(self, items, rng: random.Random | None) -> Iterator[tuple[torch.Tensor, int, int]]:
        """(x, label, global index) for every sample that decodes; bad ones are counted."""
        offsets = self.manifest.shard_offsets()
        for i, position, key, sample in items:
            try:
                x, label = self.decoder(sample, rng)
            except Exception as err:  # any failure to decode makes only this sample unusable
                self.counter.add(self.urls[i], key, f"{type(err).__name__}: {err}")
                continue
            self.num_decoded += 1
            yield x, label, offsets[i] + position


def _endless_passes(shards: list[int], rng: random.Random, reader: _Reader) -> Iterator[int]:
    """Reshuffled passes over `shards` forever; fails if a whole pass yields nothing."""
    while True:
        before = reader.num_decoded
        order = list(shards)
        rng.shuffle(order)
        yield from order  # pull-based: the last shard is fully decoded before we resume here
        if reader.num_decoded == before:  # else an endless stream of nothing: a silent hang
            names = ", ".join(reader.manifest.shards[i].name for i in shards[:5])
            raise DataError(f"no sample of shards {names}{' ...' if len(shards) > 5 else ''} "
                            f"could be read or decoded; run `mvar data verify`")


class _TrainStream(IterableDataset):
    """One reader's endless, shuffled stream, cut to its share of the rank's batches."""

    def __init__(self, reader: _Reader, cfg: DataConfig, steps_per_epoch: int, epoch):
        super().__init__()
        self.reader, self.steps_per_epoch, self.epoch = reader, steps_per_epoch, epoch
        self.shuffle_buffer, self.random_flip = cfg.shuffle_buffer, cfg.random_flip

    def _my_batches(self) -> int:
        worker = self.reader.worker()[0] - self.reader.rank * self.reader.num_workers
        share, extra = divmod(self.steps_per_epoch, self.reader.num_workers)
        return share + (1 if worker < extra else 0)

    def __iter__(self):
        reader = self.reader
        me, num_readers = reader.worker()
        rng = random.Random(f"{reader.seed}/{self.epoch.value}/{me}")  # str seeds are stable across runs
        num_shards = len(reader.manifest.shards)
        mine = list(range(me, num_shards, num_readers)) if num_shards >= num_readers else list(range(num_shards))
        flip_rng = rng if self.random_flip else None
        pipeline = wds.DataPipeline(
            lambda: _endless_passes(mine, rng, reader),
            reader.read,
            lambda items: reader.decode(items, flip_rng),
            wds.shuffle(self.shuffle_buffer, initial=min(self.shuffle_buffer, 100), rng=rng)
            if self.shuffle_buffer > 1 else (lambda items: items),
            wds.batched(reader.batch_size, collation_fn=lambda b: collate(b, False), partial=False),
        ).with_epoch(nbatches=self._my_batches())
        return iter(pipeline)


def reader_range(num_samples: int, reader: int, num_readers: int) -> tuple[int, int]:
    """[lo, hi) of global sample positions for one reader: contiguous, sizes differ by <= 1."""
    return num_samples * reader // num_readers, num_samples * (reader + 1) // num_readers


class _EvalStream(IterableDataset):
    """One reader's contiguous range of samples, in manifest order, batched (last one partial)."""

    def __init__(self, reader: _Reader):
        super().__init__()
        self.reader = reader

    def _in_range(self, items, lo: int, hi: int):
        offsets = self.reader.manifest.shard_offsets()
        for item in items:
            index = offsets[item[0]] + item[1]
            if index >= hi:
                return  # manifest order: nothing of ours follows
            if index >= lo:
                yield item

    def __iter__(self):
        reader = self.reader
        me, num_readers = reader.worker()
        lo, hi = reader_range(reader.manifest.num_samples, me, num_readers)
        offsets = reader.manifest.shard_offsets()
        shard_ids = [i for i in range(len(offsets) - 1) if offsets[i] < hi and offsets[i + 1] > lo]
        pipeline = wds.DataPipeline(
            lambda: iter(shard_ids),
            reader.read,
            lambda items: self._in_range(items, lo, hi),
            lambda items: reader.decode(items, None),
            wds.batched(reader.batch_size, collation_fn=lambda b: collate(b, True), partial=True),
        )
        return iter(pipeline)


def _dataloader(dataset: IterableDataset, cfg: DataConfig, persistent: bool) -> DataLoader:
    workers = cfg.num_workers
    return DataLoader(
        dataset, batch_size=None,  # batches are built in the stream, per reader
        num_workers=workers,
        persistent_workers=persistent and workers > 0,  # no respawn (and re-import) every epoch
        prefetch_factor=cfg.prefetch_factor if workers > 0 else None,
        pin_memory=cfg.pin_memory and torch.cuda.is_available())


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")


def _check_local_shards(location: str, manifest: Manifest) -> None:
    """Missing local shard files fail at start, not as a stream of bad samples (a shard cut short is counted
    sample by sample here; the run's driver refuses it before it starts: mvar.data.verify.check_shard_set)."""
    if not storage.is_local(location):
        return  # one request per shard is too slow on object stores; reading will tell
    missing = [s.name for s in manifest.shards if not storage.exists(storage.join(location, s.name))]
    if missing:
        raise DataError(f"'{location}' lacks {len(missing)} shard(s) its manifest lists, e.g. "
                        f"{', '.join(missing[:3])}; rerun the pack/tokenize that made it to finish it")


def _open_for_rank(cfg: DataConfig, location: str, rank: int, world_size: int,
                   tokenizer_fingerprint: str | None) -> Manifest:
    _check_rank(rank, world_size)
    manifest = open_shard_set(location, cfg.kind, cfg.image_size, tokenizer_fingerprint)
    _check_local_shards(location, manifest)
    if cfg.verify_checksums:  # each rank checks every world_size-th shard: all are checked once
        shards = list(range(rank, len(manifest.shards), world_size))
        verify_shard_checksums(location, manifest, shards, cfg.shard_opener)
    return manifest


class _ShardLoader:
    """What both loaders expose: the shard kind and the skipped-sample counter."""

    manifest: Manifest
    _reader: _Reader

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def bad_samples(self) -> BadSampleCounter:
        """`.value`: samples skipped so far on this rank; log it as `data/bad_samples`."""
        return self._reader.counter


class TrainLoader(_ShardLoader):
    """One rank's training batches: exactly `len(loader)` per epoch on every rank.

    Yields (x, labels): x float32 (B, 3, H, W) in [-1, 1] for image shards or
    int64 (B, L) code indices (all scales, coarsest first) for token shards;
    labels int64 (B,). Call `set_epoch(e)` before each epoch for a stream that
    a resumed run reproduces; without it each iteration advances the epoch.
    """

    def __init__(self, cfg: DataConfig, location: str, manifest: Manifest, rank: int, world_size: int):
        self.location, self.manifest = location, manifest
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, manifest.num_samples // (cfg.batch_size * world_size))
        self._reader = _Reader(cfg, location, manifest, rank, world_size)
        self._epoch = torch.multiprocessing.get_context().Value("q", 0)  # workers read it at each epoch start
        self._epoch_given = True
        self._loader = _dataloader(_TrainStream(self._reader, cfg, self.steps_per_epoch, self._epoch), cfg, True)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.value = epoch
        self._epoch_given = True

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        if not self._epoch_given:
            self._epoch.value += 1
        self._epoch_given = False
        return iter(self._loader)


class EvalLoader(_ShardLoader):
    """One rank's share of an evaluation set, every sample exactly once across ranks.

    Yields (x, labels, index): as TrainLoader plus int64 (B,) global sample
    positions (manifest order), so gathered results can be checked or sorted.
    Ranks may differ by one sample (and so one batch): keep collectives out
    of the per-batch loop.
    """

    def __init__(self, cfg: DataConfig, location: str, manifest: Manifest, rank: int, world_size: int):
        self.location, self.manifest = location, manifest
        self._reader = _Reader(cfg, location, manifest, rank, world_size)
        workers = self._reader.num_workers
        ranges = [reader_range(manifest.num_samples, rank * workers + w, world_size * workers)
                  for w in range(workers)]
        self.num_samples = sum(hi - lo for lo, hi in ranges)
        self._num_batches = sum(-(-(hi - lo) // cfg.batch_size) for lo, hi in ranges)
        self._loader = _dataloader(_EvalStream(self._reader), cfg, False)

    def __len__(self) -> int:
        return self._num_batches

    def __iter__(self):
        return iter(self._loader)


def build_train_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, *,
                       tokenizer_fingerprint: str | None = None) -> TrainLoader:
    """Training batches of `cfg.shards` for one rank; token shards are refused unless
    made with the tokenizer whose sha256 is `tokenizer_fingerprint` (when given)."""
    manifest = _open_for_rank(cfg, cfg.shards, rank, world_size, tokenizer_fingerprint)
    return TrainLoader(cfg, cfg.shards, manifest, rank, world_size)


def build_eval_loader(cfg: DataConfig, rank: int = 0, world_size: int = 1, *,
                      tokenizer_fingerprint: str | None = None) -> EvalLoader:
    """Deterministic single pass over `cfg.eval_shards` (or `cfg.shards`) for one rank."""
    location = cfg.eval_shards or cfg.shards
    manifest = _open_for_rank(cfg, location, rank, world_size, tokenizer_fingerprint)
    return EvalLoader(cfg, location, manifest, rank, world_size)
