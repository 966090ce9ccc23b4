"""`mvar data verify`: re-read every shard and compare it with its manifest; and the cheaper
checks a run makes before it starts (``check_shard_set``: sizes, the first samples of each shard,
the checksums when asked)."""
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
from mvar.data.manifest import DataError, Manifest, ShardInfo, read_manifest
from mvar.data.samples import TOKEN_FLIP_EXT, SampleDecoder, decode_image, decode_tokens
from mvar.data.tario import TMP_MARK, iter_tar_samples
from mvar.files import human_bytes

MAX_PROBLEMS = 5  # per shard: the first few say enough
FIRST_SAMPLES = 2  # per shard, read by a run's checks: a missing .cls or a wrong token shape shows at once
REMOTE_SHARDS = 8  # shards of an object-store set whose first samples a run's checks read (a request each)
LARGE_SET_BYTES = 1 << 30  # a checksum pass over more prints a line first (the bar is drawn on a terminal only)
MIN_SAMPLE_BYTES = 1024  # a sample in a tar: at least one member, a 512-byte header and a 512-byte block of data
# what a damaged, truncated or vanished shard raises while being read
READ_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error)


class _HashingReader:
    """A read-only stream that hashes what passes through (one read for sha256 and content)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.digest, self.num_bytes = raw, hashlib.sha256(), 0

    def read(self, size: int = -1) -> bytes:
        data = self.raw.read(size)
        self.digest.update(data)
        self.num_bytes += len(data)
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
    missing_labels: int = 0   # samples without a .cls member

    def note(self, problem: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(problem)


def _check_sample(decoder: SampleDecoder, manifest: Manifest, sample: dict, need_labels: bool = True) -> None:
    """Label range, image decode and size, or token shape and range (raises on a bad sample)."""
    if need_labels:
        decoder(sample, None)
    elif manifest.kind == "tokens":
        decode_tokens(sample, decoder.num_tokens, decoder.vocab_size, flip=False)
    else:
        decode_image(sample, manifest.image_size, flip=False)
    if manifest.kind == "tokens" and manifest.tokens.get("flip"):
        if TOKEN_FLIP_EXT not in sample:
            raise ValueError(f"no .{TOKEN_FLIP_EXT} member though the manifest says flip=true")
        decode_tokens(sample, decoder.num_tokens, decoder.vocab_size, flip=True)


def verify_shard(url: str, info: ShardInfo, manifest: Manifest) -> ShardReport:
    """Recount, re-hash, re-measure and decode one shard; samples without .cls are counted."""
    report = ShardReport(info.name)
    decoder = SampleDecoder(manifest.kind, manifest.num_classes, manifest.image_size, manifest.tokens)
    try:
        with storage.open_read(url) as raw:
            stream = _HashingReader(raw)
            try:
                for key, sample in iter_tar_samples(stream):
                    report.num_samples += 1
                    labelled = "cls" in sample
                    report.missing_labels += not labelled
                    try:
                        _check_sample(decoder, manifest, sample, need_labels=labelled)
                    except Exception as err:  # report every kind of bad sample, keep going
                        report.note(f"sample {key}: {type(err).__name__}: {err}")
            except READ_ERRORS as err:  # a damaged tar: its bytes are still hashed and counted below
                report.note(f"unreadable after {report.num_samples} samples: {type(err).__name__}: {err}")
            sha = stream.drain()
    except READ_ERRORS as err:
        report.note(f"cannot read: {type(err).__name__}: {err}")
        return report
    # the summaries go in whatever the per-sample notes took
    if report.missing_labels:
        report.problems.insert(0, f"{report.missing_labels} of {report.num_samples} samples lack a .cls label")
    if info.num_bytes and stream.num_bytes != info.num_bytes:
        report.problems.insert(0, f"{stream.num_bytes} bytes, manifest says {info.num_bytes} (cut short or replaced?)")
    if sha != info.sha256:
        report.problems.append(f"sha256 {sha} != manifest {info.sha256}")
    if report.num_samples != info.num_samples:
        report.problems.append(f"{report.num_samples} samples, manifest says {info.num_samples}")
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


# -- the checks a run makes before it starts ----------------------------------------------------

def size_problems(location: str, manifest: Manifest) -> list[str]:
    """Local shards that are missing, whose size is not the manifest's ``num_bytes`` (a tar cut short), or too
    small for the samples the manifest gives them: one stat each. Shards on an object store are measured when read."""
    if not storage.is_local(location):
        return []
    problems = []
    for info in manifest.shards:
        try:
            size = os.path.getsize(storage.local_path(storage.join(location, info.name)))
        except OSError:
            problems.append(f"{info.name} is missing")
            continue
        if info.num_bytes and size != info.num_bytes:
            problems.append(f"{info.name} has {size} bytes, the manifest says {info.num_bytes} (cut short?)")
        elif info.num_samples > size // MIN_SAMPLE_BYTES:
            problems.append(f"{info.name} has {size} bytes, room for at most {size // MIN_SAMPLE_BYTES} samples; "
                            f"the manifest says {info.num_samples}")
    return problems


def _first_samples_problem(url: str, info: ShardInfo, manifest: Manifest, decoder: SampleDecoder,
                           need_labels: bool, samples_per_shard: int) -> str:
    """What is wrong with the first samples of one shard; '' when they decode."""
    seen = 0
    try:
        with storage.open_read(url) as raw:
            for key, sample in iter_tar_samples(raw):
                try:
                    _check_sample(decoder, manifest, sample, need_labels)
                except Exception as err:  # any failure to decode: what the run would skip
                    return f"{info.name} sample {key}: {err}"
                seen += 1
                if seen >= samples_per_shard:
                    return ""
    except READ_ERRORS as err:
        return f"{info.name} is unreadable after {seen} samples ({type(err).__name__}: {err})"
    return f"{info.name} holds {seen} samples, the manifest says {info.num_samples}" if seen < info.num_samples else ""


def first_sample_problems(location: str, manifest: Manifest, need_labels: bool = True, opener: str = "",
                          samples_per_shard: int = FIRST_SAMPLES) -> list[str]:
    """The first ``samples_per_shard`` samples of every shard (of the first REMOTE_SHARDS on an object store)
    decoded as a run decodes them: a .cls label each where ``need_labels``, images or tokens of the right shape."""
    decoder = SampleDecoder(manifest.kind, manifest.num_classes, manifest.image_size, manifest.tokens)
    shards = manifest.shards if storage.is_local(location) else manifest.shards[:REMOTE_SHARDS]
    found = (_first_samples_problem(storage.apply_opener(storage.join(location, info.name), opener), info, manifest,
                                    decoder, need_labels, samples_per_shard) for info in shards)
    return [problem for problem in found if problem]


def checksum_problems(location: str, manifest: Manifest, indices: list[int] | None = None, opener: str = "",
                      progress: bool = False) -> list[str]:
    """sha256 of the given shards (default: all) against the manifest; a line first for a large set."""
    from mvar import progress as bars
    infos = [manifest.shards[i] for i in (range(len(manifest.shards)) if indices is None else indices)]
    total = sum(info.num_bytes for info in infos)
    if progress and total >= LARGE_SET_BYTES:
        print(f"data.verify_checksums: sha256 of {len(infos)} shards ({human_bytes(total)}) in '{location}' ...",
              flush=True)
    problems = []
    with bars.bar(total or None, f"sha256 {location}", unit="B", flag=progress) as bar:
        for info in infos:
            try:
                actual = storage.sha256_url(storage.apply_opener(storage.join(location, info.name), opener))
            except OSError as err:
                problems.append(f"{info.name}: cannot read ({err})")
                continue
            if actual != info.sha256:
                problems.append(f"{info.name}: sha256 {actual}, manifest says {info.sha256}")
            bar.update(info.num_bytes)
    return problems


def check_shard_set(location: str, manifest: Manifest, *, need_labels: bool = True, verify_checksums: bool = False,
                    opener: str = "", samples_per_shard: int = FIRST_SAMPLES, progress: bool = True) -> None:
    """What a run checks of its shards before it starts (and `--check` with it): every shard's size against
    the manifest (free), the first samples of each shard, and with ``verify_checksums`` every shard's sha256.
    A DataError naming the first problems and `mvar data verify`; the cheap checks speak first."""
    _refuse(location, "do not match the manifest", size_problems(location, manifest))
    _refuse(location, "have bad samples",
            first_sample_problems(location, manifest, need_labels, opener, samples_per_shard))
    if verify_checksums:
        _refuse(location, "fail their checksum (data.verify_checksums)",
                checksum_problems(location, manifest, None, opener, progress))


def _refuse(location: str, what: str, problems: list[str]) -> None:
    if problems:
        more = f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""
        raise DataError(f"'{location}': shards {what}: {'; '.join(problems[:3])}{more}; run `mvar data verify "
                        f"{location}` for the full report, and repack or re-tokenize the set")
