"""`mvar data verify`: re-read every shard and compare it with its manifest."""
from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import tarfile
import zlib
from dataclasses import dataclass, field
from typing import IO

from mvar.data import storage
from mvar.data.manifest import Manifest, ShardInfo, read_manifest
from mvar.data.samples import TOKEN_FLIP_EXT, SampleDecoder, decode_tokens
from mvar.data.tario import TMP_MARK, iter_tar_samples

MAX_PROBLEMS = 5  # per shard: the first few say enough


class _HashingReader:
    """A read-only stream that hashes what passes through (one read for sha256 and content)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.digest = raw, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        return data

    def drain(self) -> str:
        while self.read(1 << 20):
            pass
        return self.digest.hexdigest()


@dataclass
class ShardReport:
    name: str
    num_samples: int = 0
    problems: list[str] = field(default_factory=list)

    def note(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)


def _check_sample(decoder: SampleDecoder, manifest: Manifest, sample: dict) -> None:
    decoder(sample, None)  # label range, image decode and size, or token shape and range
    if manifest.kind == "tokens" and manifest.tokens.get("flip"):
        if TOKEN_FLIP_EXT not in sample:
            raise ValueError(f"no .{TOKEN_FLIP_EXT} member though the manifest says flip=true")
        decode_tokens(sample, decoder.num_tokens, decoder.vocab_size, flip=True)


def verify_shard(url: str, info: ShardInfo, manifest: Manifest) -> ShardReport:
    """Recount, re-hash and decode one shard."""
    report = ShardReport(info.name)
    decoder = SampleDecoder(manifest.kind, manifest.num_classes, manifest.image_size, manifest.tokens)
    try:
        with storage.open_read(url) as raw:
            stream = _HashingReader(raw)
            for key, sample in iter_tar_samples(stream):
                report.num_samples += 1
                try:
                    _check_sample(decoder, manifest, sample)
                except Exception as err:  # report every kind of bad sample, keep going
                    report.note(f"sample {key}: {type(err).__name__}: {err}")
            sha = stream.drain()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as err:
        report.note(f"unreadable after {report.num_samples} samples: {type(err).__name__}: {err}")
        return report
    if sha != info.sha256:
        report.note(f"sha256 {sha} != manifest {info.sha256}")
    if report.num_samples != info.num_samples:
        report.note(f"{report.num_samples} samples, manifest says {info.num_samples}")
    return report


def _verify_task(args: tuple[str, ShardInfo, Manifest]) -> ShardReport:
    return verify_shard(*args)


def stray_files(location: str, manifest: Manifest) -> list[str]:
    """Shard-like files in a local set that the manifest does not list (e.g. leftover temps)."""
    if not storage.is_local(location):
        return []
    listed = {s.name for s in manifest.shards}
    names = os.listdir(storage.local_path(location))
    return sorted(n for n in names if (n.endswith(".tar") or TMP_MARK in n) and n not in listed)


def verify(location: str, workers: int = 1, opener: str = "",
           progress: bool = True) -> tuple[Manifest, list[ShardReport]]:
    """(manifest, one report per shard in manifest order); a bar counts the samples of the checked shards."""
    from mvar import progress as bars
    manifest = read_manifest(location)
    tasks = [(storage.apply_opener(storage.join(location, s.name), opener), s, manifest)
             for s in manifest.shards]
    with bars.bar(manifest.num_samples, f"verify {location}", unit="sample", flag=progress) as bar, \
            (multiprocessing.Pool(workers) if workers > 1 else contextlib.nullcontext()) as pool:
        reports = []
        for report in (pool.imap(_verify_task, tasks, chunksize=1) if pool else map(_verify_task, tasks)):
            reports.append(report)
            bar.update(report.num_samples)
    return manifest, reports
