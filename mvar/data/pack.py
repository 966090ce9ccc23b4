"""`mvar data pack`: an ImageFolder tree (one folder per class) -> image shards.

The sorted file list is put in a fixed pseudo-random order (sha256 of seed and
path: the same on every machine and library version) so that each shard
mixes classes; shard i holds items [i * shard_size, (i + 1) * shard_size) of
that order. Shard contents are therefore a function of the file list and the
options alone, which is what makes an interrupted pack resumable: the rerun
skips the shards already written and produces the same bytes as a clean pack.
"""
from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Iterator

from mvar.data.imaging import IMAGE_EXTENSIONS, center_crop_arr, encode, open_rgb
from mvar.data.manifest import Manifest, write_manifest
from mvar.data.writer import ShardSetWriter
from mvar.errors import UserError

log = logging.getLogger("mvar.data")
MAX_LISTED = 20  # names kept in the manifest per kind of skipped input


@dataclass
class SourceTree:
    root: str
    class_names: list[str]                      # non-empty class folders, sorted; index = label
    files: list[tuple[str, int]]                # (path relative to root, label), in shard order
    empty_classes: list[str] = field(default_factory=list)
    non_image_files: list[str] = field(default_factory=list)

    def digest(self) -> str:
        """Identifies the inputs in the resume plan: same digest, same shards."""
        h = hashlib.sha256()
        for path, label in self.files:
            h.update(f"{label}\t{path}\n".encode())
        return h.hexdigest()


def _class_files(root: str, name: str) -> tuple[list[str], list[str]]:
    """(image paths, other file paths) under one class folder, relative to root, sorted."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, name), followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for fname in sorted(filenames):
            rel = os.path.relpath(os.path.join(dirpath, fname), root)
            if fname.startswith("."):
                continue  # .DS_Store and friends: not data, not worth a warning
            (images if fname.lower().endswith(IMAGE_EXTENSIONS) else others).append(rel)
    return images, others


def _shard_order(path: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{path}".encode()).hexdigest()


def scan_tree(root: str, seed: int = 0, shuffle: bool = True) -> SourceTree:
    """Class folders and image files of an ImageFolder tree; warns about what it skips."""
    if not os.path.isdir(root):
        raise UserError(f"source tree '{root}' does not exist (expected one folder of images per "
                        f"class, like ImageNet's train/)")
    folders = sorted(d for d in os.listdir(root)
                     if not d.startswith(".") and os.path.isdir(os.path.join(root, d)))
    if not folders:
        raise UserError(f"'{root}' has no class folders; expected {root}/CLASS_NAME/IMAGE.jpg")
    tree = SourceTree(root, [], [])
    for name in folders:
        images, others = _class_files(root, name)
        tree.non_image_files += others
        if not images:
            log.warning("skipping empty class folder %s", os.path.join(root, name))
            tree.empty_classes.append(name)
            continue
        tree.files += [(path, len(tree.class_names)) for path in images]
        tree.class_names.append(name)
    if tree.non_image_files:
        log.warning("skipping %d non-image files, e.g. %s", len(tree.non_image_files),
                    os.path.join(root, tree.non_image_files[0]))
    if not tree.files:
        raise UserError(f"no images under '{root}' (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    if shuffle:
        tree.files.sort(key=lambda item: _shard_order(item[0], seed))
    return tree


def load_and_crop(task: tuple[str, int, str]) -> tuple[bytes | None, str]:
    """(encoded image, '') or (None, why): runs in the worker processes."""
    path, image_size, fmt = task
    try:
        return encode(center_crop_arr(open_rgb(path), image_size), fmt), ""
    except Exception as err:  # a broken file must not stop a million-image pack
        return None, f"{type(err).__name__}: {err}"


@dataclass
class PackOptions:
    image_size: int = 256
    shard_size: int = 1000
    fmt: str = "png"          # "png" (lossless) or "jpg"
    workers: int = 0          # processes that decode and resize; 0 = one per CPU core
    seed: int = 0             # fixes the class-mixing order of files over shards
    shuffle: bool = True      # False keeps the sorted (class-by-class) order
    progress: bool = True     # tqdm bar on stderr

    def check(self) -> None:
        if self.image_size < 8:
            raise UserError(f"--image-size must be >= 8, got {self.image_size}")
        if self.shard_size < 1:
            raise UserError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.fmt not in ("png", "jpg"):
            raise UserError(f"--format must be png or jpg, got {self.fmt}")


def _plan(tree: SourceTree, opts: PackOptions) -> dict:
    return dict(command="pack", image_size=opts.image_size, shard_size=opts.shard_size, format=opts.fmt,
                order_seed=opts.seed if opts.shuffle else None, num_files=len(tree.files),
                files_sha256=tree.digest(), class_names=tree.class_names)


class _Pool:
    """`imap` over worker processes, or in this process for one worker (no pickling, easy to debug)."""

    def __init__(self, workers: int):
        self.pool = multiprocessing.Pool(workers) if workers > 1 else None

    def imap(self, fn, tasks: Iterator):
        return self.pool.imap(fn, tasks, chunksize=4) if self.pool else map(fn, tasks)

    def __enter__(self) -> "_Pool":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool:
            self.pool.terminate()  # results are all consumed on success; on error, stop now


def _shard_items(tree: SourceTree, index: int, shard_size: int) -> list[tuple[int, str, int]]:
    """(global position, relative path, label) of shard `index`."""
    lo = index * shard_size
    return [(lo + k, path, label) for k, (path, label) in enumerate(tree.files[lo:lo + shard_size])]


def _samples(items, results, fmt: str, stats: dict, bar) -> Iterator[tuple[str, dict]]:
    """Shard samples from the (ordered) worker results; undecodable files are skipped and noted."""
    for (position, path, label), (payload, why) in zip(items, results):
        bar.update(1)
        if payload is None:
            log.warning("skipping unreadable image %s: %s", path, why)
            stats["undecodable"].append(path)
            continue
        yield f"{position:08d}", {fmt: payload, "cls": str(label).encode()}


def _skipped(tree: SourceTree, records) -> dict:
    undecodable = [path for _, stats in records for path in stats.get("undecodable", [])]
    return {"empty_class_folders": tree.empty_classes,
            "non_image_files": len(tree.non_image_files),
            "non_image_examples": tree.non_image_files[:MAX_LISTED],
            "undecodable_images": len(undecodable),
            "undecodable_examples": undecodable[:MAX_LISTED]}


def _source(tree: SourceTree, opts: PackOptions, src: str) -> dict:
    plan = _plan(tree, opts)
    del plan["class_names"]  # already in the manifest
    return dict(plan, src=os.path.abspath(src))


def pack(src: str, out: str, opts: PackOptions) -> Manifest:
    """Pack (or finish packing) `src` into `out`; returns the written manifest."""
    from mvar import progress

    opts.check()
    tree = scan_tree(src, opts.seed, opts.shuffle)
    num_shards = -(-len(tree.files) // opts.shard_size)
    with ShardSetWriter(out, _plan(tree, opts)) as job:
        pending = [i for i in range(num_shards) if not job.is_done(i)]
        items = {i: _shard_items(tree, i, opts.shard_size) for i in pending}
        tasks = (os.path.join(tree.root, path) for i in pending for _, path, _ in items[i])
        done = len(tree.files) - sum(len(v) for v in items.values())
        with _Pool(opts.workers or os.cpu_count() or 1) as pool, \
                progress.bar(len(tree.files), f"pack {out}", initial=done, flag=opts.progress) as bar:
            results = pool.imap(load_and_crop, ((t, opts.image_size, opts.fmt) for t in tasks))
            for i in pending:
                stats: dict = {"undecodable": []}
                job.write(i, _samples(items[i], results, opts.fmt, stats, bar), stats)
        records = job.records(num_shards)
        manifest = Manifest(
            kind="images", num_samples=sum(info.num_samples for info, _ in records),
            class_names=tree.class_names, image_size=opts.image_size, sample_format=opts.fmt,
            shards=[info for info, _ in records], skipped=_skipped(tree, records),
            source=_source(tree, opts, src))
        write_manifest(out, manifest)
    return manifest
