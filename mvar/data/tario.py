"""Reading and writing WebDataset tar shards.

Writing is deterministic (fixed mtime, owner and mode, members in the order
given), so a shard's bytes depend only on its samples: a resumed pack and a
clean pack give the same sha256. A shard becomes visible only when complete:
it is written under a temp name, fsynced, then renamed over the final name.

Reading groups members by key the WebDataset way (`KEY.EXT`, key = name up
to the first dot of the base name) and keeps memory flat on long shards.
"""
from __future__ import annotations

import io
import os
import tarfile
from typing import IO, Iterator

from mvar.data.manifest import ShardInfo
from mvar.files import fsync_path, sha256_stream

SHARD_PATTERN = "shard-{index:06d}.tar"
TMP_MARK = ".tmp-"  # temp files: `<final name>.tmp-<pid>`; stale ones are removed on resume

Sample = dict[str, bytes]  # extension -> payload, e.g. {"png": ..., "cls": b"3"}


def shard_name(index: int) -> str:
    return SHARD_PATTERN.format(index=index)


class ShardWriter:
    """One shard: `add()` samples, then `commit()` (atomic) or `abort()`."""

    def __init__(self, directory: str, name: str):
        self.directory, self.name = directory, name
        self.final_path = os.path.join(directory, name)
        self.tmp_path = f"{self.final_path}{TMP_MARK}{os.getpid()}"
        self._file = open(self.tmp_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.GNU_FORMAT)
        self.num_samples = 0

    def add(self, key: str, sample: Sample) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key '{key}' must not contain '.' or '/'")
        for ext, payload in sample.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(payload), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            self._tar.addfile(info, io.BytesIO(payload))
        self.num_samples += 1

    def finish(self) -> ShardInfo:
        """Close and fsync the temp file; the shard is not visible yet (see `publish`)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        with open(self.tmp_path, "rb") as fh:
            digest = sha256_stream(fh)
        return ShardInfo(self.name, self.num_samples, digest, os.path.getsize(self.tmp_path))

    def publish(self) -> None:
        """Atomically give the finished shard its final name."""
        os.replace(self.tmp_path, self.final_path)
        fsync_path(self.directory)

    def commit(self) -> ShardInfo:
        info = self.finish()
        self.publish()
        return info

    def abort(self) -> None:
        """Drop the temp file, whatever state the writer is in (a full disk refuses the tar's end blocks)."""
        for close in (self._tar.close, self._file.close):
            try:
                close()
            except (OSError, ValueError):
                pass
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)


def remove_stale_temps(directory: str) -> list[str]:
    """Temp files left by a killed writer: never complete, safe to delete."""
    stale = [n for n in os.listdir(directory) if TMP_MARK in n]
    for name in stale:
        os.remove(os.path.join(directory, name))
    return stale


def split_member_name(name: str) -> tuple[str, str]:
    """'dir/000012.png' -> ('dir/000012', 'png'); WebDataset's key/extension rule."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def iter_tar_samples(stream: IO[bytes]) -> Iterator[tuple[str, Sample]]:
    """(key, {ext: bytes}) for each sample of one tar stream, in file order.

    Raises tarfile.TarError / OSError on a corrupt or truncated tar after the
    samples before the damage were yielded (the caller counts what is missing).
    """
    key, sample = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isreg():
                continue
            member_key, ext = split_member_name(member.name)
            payload = tar.extractfile(member).read()
            tar.members = []  # stream mode keeps every header otherwise: O(shard) memory
            if member_key != key:
                if sample:
                    yield key, sample
                key, sample = member_key, {}
            sample[ext] = payload
    if sample:
        yield key, sample
