"""manifest.json: what a shard set holds, so readers can check it before a job starts.

Every shard set (images or tokens) has one, written last and atomically: a
directory without it is an unfinished pack, never read as data. It carries
no timestamps, so the same inputs give byte-identical manifests.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from typing import Any

from mvar.data import storage
from mvar.errors import UserError
from mvar.files import fsync_path, one_line, write_text_atomic

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
KINDS = ("images", "tokens")


class DataError(UserError):
    """Shards that cannot be used: missing, corrupt, mismatched, or too many bad samples."""


@dataclass
class ShardInfo:
    name: str          # file name relative to the shard set's location
    num_samples: int
    sha256: str
    num_bytes: int = 0


@dataclass
class Manifest:
    kind: str                      # "images" | "tokens"
    num_samples: int
    class_names: list[str]
    image_size: int
    sample_format: str             # "png" | "jpg" for images, "npy" for tokens
    shards: list[ShardInfo]
    skipped: dict[str, Any] = field(default_factory=dict)  # inputs left out, and why
    source: dict[str, Any] = field(default_factory=dict)   # how it was made (command, options)
    tokens: dict[str, Any] = field(default_factory=dict)   # tokenizer_sha256, patch_nums, vocab_size, dtype, flip
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def shard_offsets(self) -> list[int]:
        """Global index of each shard's first sample (cumulative counts), plus the total."""
        offsets = [0]
        for shard in self.shards:
            offsets.append(offsets[-1] + shard.num_samples)
        return offsets

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["num_classes"] = self.num_classes  # for people reading the file
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "Manifest":
        """Parsed and type-checked (a hand-edited or damaged file fails here, naming the key)."""
        from mvar.config import from_dict
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        data.pop("num_classes", None)
        return from_dict(cls, data)


def describe(manifest: Manifest, location: str) -> dict[str, Any]:
    """What a tracking store records of a shard set (``mvar.tracking.DatasetRecord``): its name, a digest of
    its shards' sha256 values (same shards, same digest), its location and a profile of counts and classes."""
    digest = hashlib.sha256("".join(f"{s.name}:{s.sha256}\n" for s in manifest.shards).encode()).hexdigest()
    profile = {"kind": manifest.kind, "num_samples": manifest.num_samples, "num_shards": len(manifest.shards),
               "num_classes": manifest.num_classes, "image_size": manifest.image_size,
               "sample_format": manifest.sample_format, "num_bytes": sum(s.num_bytes for s in manifest.shards),
               "classes": manifest.class_names[:20] + (["..."] if manifest.num_classes > 20 else [])}
    if manifest.tokens.get("tokenizer_sha256"):
        profile["tokenizer_sha256"] = manifest.tokens["tokenizer_sha256"]
    name = location.rstrip("/").rsplit("/", 1)[-1] or location
    return {"name": name, "digest": digest[:16], "source": location, "profile": profile}


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Atomically (temp + fsync + rename) write `directory/manifest.json`."""
    path = os.path.join(directory, MANIFEST_NAME)
    write_text_atomic(path, manifest.to_json())
    fsync_path(directory)
    return path


def how_to_make(location: str) -> str:
    return (f"make it with `mvar data pack --src IMAGE_TREE --out {location}` "
            f"(or `mvar data synth --out {location}` for a synthetic set)")


def read_manifest(location: str) -> Manifest:
    """The manifest of the shard set at `location` (directory or URL prefix)."""
    if storage.is_local(location) and not os.path.isdir(storage.local_path(location)):
        raise DataError(f"shard directory '{location}' does not exist; {how_to_make(location)}")
    url = storage.join(location, MANIFEST_NAME)
    try:
        raw = storage.read_bytes(url)
    except FileNotFoundError as err:
        raise DataError(f"'{location}' has no {MANIFEST_NAME}: not a finished shard set "
                        f"(an interrupted pack finishes when rerun with the same command); "
                        f"{how_to_make(location)}") from err
    try:
        manifest = Manifest.from_json(raw.decode())
    except (ValueError, TypeError, KeyError, AttributeError) as err:  # UnicodeDecodeError is a ValueError
        raise DataError(f"'{url}' is not a valid manifest (truncated or edited?): "
                        f"{one_line(err).replace('config key ', 'key ')}") from None
    _check_manifest(manifest, url)
    return manifest


def _check_manifest(manifest: Manifest, url: str) -> None:
    if manifest.kind not in KINDS:
        raise DataError(f"'{url}': kind '{manifest.kind}' is not one of {', '.join(KINDS)}")
    if not manifest.shards or manifest.num_samples == 0:
        raise DataError(f"'{url}' lists no samples; was the source empty? Repack from a tree "
                        f"with one folder of images per class")
    listed = sum(shard.num_samples for shard in manifest.shards)
    if listed != manifest.num_samples:
        raise DataError(f"'{url}': num_samples {manifest.num_samples} disagrees with its shards, which hold {listed} "
                        "samples in all (edited, or written by a broken tool?); repack, or run `mvar data verify` "
                        "to see each shard")
    if manifest.kind == "tokens" and not _token_meta_ok(manifest.tokens):
        raise DataError(f"'{url}': its 'tokens' section lacks tokenizer_sha256, patch_nums or vocab_size "
                        f"(has {sorted(manifest.tokens)}); remake it with `mvar data tokenize`")
    if manifest.format_version > FORMAT_VERSION:
        raise DataError(f"'{url}' has format_version {manifest.format_version}; this mvar "
                        f"reads up to {FORMAT_VERSION}: upgrade mvar")


def _token_meta_ok(tokens: dict) -> bool:
    patch_nums = tokens.get("patch_nums")
    return (isinstance(tokens.get("tokenizer_sha256"), str) and isinstance(tokens.get("vocab_size"), int)
            and isinstance(patch_nums, list) and all(isinstance(p, int) and p > 0 for p in patch_nums))


def check_tokenizer(manifest: Manifest, location: str, fingerprint: str | None) -> None:
    """Refuse token shards made with a tokenizer other than the one training uses."""
    if manifest.kind != "tokens" or not fingerprint:
        return
    made_with = manifest.tokens.get("tokenizer_sha256", "")
    if made_with != fingerprint:
        raise DataError(
            f"token shards '{location}' were made with tokenizer sha256 {made_with}, but this run "
            f"uses tokenizer sha256 {fingerprint}; re-tokenize with `mvar data tokenize "
            f"--tokenizer YOUR_TOKENIZER --src IMAGE_SHARDS --out NEW_DIR`")
