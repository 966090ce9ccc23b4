"""Data throughput benchmark: packing (images/s per core) and loading (decoded images/s per worker).

    python -m mvar.data.bench --work /tmp/mvar-data-bench --num-images 600 --image-size 256   # = mvar bench data

Source images are photo-like stand-ins for ImageNet (no downloads): 500x375
colour 1/f-noise images (the power spectrum of natural photos) saved as JPEG
quality 90, ~100 KB each like ImageNet's. Prints a Markdown report.
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import shutil
import sys
import time

import numpy as np
from PIL import Image

from mvar.commands import benchmarks, run_cli, standalone
from mvar.data.imaging import JPEG_QUALITY, center_crop_arr, decode, open_rgb


def pink_noise_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """uint8 (H, W, 3) with a 1/f amplitude spectrum and correlated colour channels."""
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None]
    freq = np.hypot(fx, fy)
    freq[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=freq.shape) + 1j * rng.normal(size=freq.shape)) / freq
        img = np.fft.irfft2(spectrum, s=(height, width))
        channels.append((img - img.mean()) / img.std())
    mixed = np.stack(channels, -1) @ rng.normal(size=(3, 3)) * 0.3 + rng.uniform(-0.5, 0.5, 3)
    return np.clip((mixed * 0.25 + 0.5) * 255, 0, 255).astype(np.uint8)


def make_source_tree(root: str, num_images: int, num_classes: int = 10, seed: int = 0) -> float:
    """An ImageFolder tree of JPEGs; returns the mean file size in KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(num_images):
        folder = os.path.join(root, f"n{i % num_classes:08d}")
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"img_{i:06d}.JPEG")
        Image.fromarray(pink_noise_image(rng, 375, 500)).save(path, quality=90)
        sizes.append(os.path.getsize(path))
    return float(np.mean(sizes)) / 1e3


def bench_pack(src: str, out: str, image_size: int, workers: int, fmt: str) -> float:
    """Images per second of a clean `mvar data pack` with `workers` processes."""
    from mvar.data.pack import PackOptions, pack
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    manifest = pack(src, out, PackOptions(image_size=image_size, shard_size=200, workers=workers,
                                          fmt=fmt, progress=False))
    return manifest.num_samples / (time.perf_counter() - start)


def bench_codecs(src: str, image_size: int, count: int = 50) -> list[tuple[str, float, float, float]]:
    """(codec, encode ms, decode ms, KB) per image at `image_size`."""
    paths = [os.path.join(d, f) for d, _, fs in os.walk(src) for f in sorted(fs)][:count]
    crops = [center_crop_arr(open_rgb(p), image_size) for p in paths]
    rows = []
    for name, kwargs in (("PNG level 1 (default)", dict(format="PNG", compress_level=1)),
                         ("PNG level 6", dict(format="PNG", compress_level=6)),
                         (f"JPEG q{JPEG_QUALITY}", dict(format="JPEG", quality=JPEG_QUALITY))):
        start, blobs = time.perf_counter(), []
        for arr in crops:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, **kwargs)
            blobs.append(buf.getvalue())
        encode_ms = (time.perf_counter() - start) / len(crops) * 1e3
        start = time.perf_counter()
        for blob in blobs:
            decode(blob)
        decode_ms = (time.perf_counter() - start) / len(crops) * 1e3
        rows.append((name, encode_ms, decode_ms, float(np.mean([len(b) for b in blobs])) / 1e3))
    return rows


def bench_loader(shards: str, workers: int, batch_size: int, steps: int) -> float:
    """Decoded, flipped, batched training images per second (after the first batch)."""
    from mvar.config import from_dict
    from mvar.data.config import DataConfig
    from mvar.data.loader import build_train_loader
    buffer = 500
    # the shuffle buffer reads two samples per sample it yields until it is full: skip that fill
    # (and the workers' start-up), one buffer per worker, to time the steady state
    warmup = max(workers, 1) * (buffer // batch_size + 1)
    cfg = from_dict(DataConfig, dict(shards=shards, batch_size=batch_size, num_workers=workers,
                                     steps_per_epoch=warmup + steps, shuffle_buffer=buffer))
    iterator = iter(build_train_loader(cfg, 0, 1))
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    count = sum(len(labels) for _, labels in iterator)
    return count / (time.perf_counter() - start)


def _machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, Python {platform.python_version()}"


def report(args: argparse.Namespace) -> str:
    start_load = os.getloadavg()[0]
    src = os.path.join(args.work, "src")
    if not os.path.isdir(src):
        make_source_tree(src, args.num_images)
    lines = [f"Machine: {_machine()}.", "",
             f"Packing {args.num_images} JPEGs (500x375) to {args.image_size} px shards:", "",
             "| format | pack workers | images/s | images/s per core |", "| --- | --- | --- | --- |"]
    for fmt in args.formats:
        for workers in args.pack_workers:
            rate = bench_pack(src, os.path.join(args.work, f"packed-{fmt}"), args.image_size, workers, fmt)
            lines.append(f"| {fmt} | {workers} | {rate:.0f} | {rate / workers:.0f} |")
    lines += ["", f"Codecs at {args.image_size} px (per image, one core):", "",
              "| codec | encode ms | decode ms | KB |", "| --- | --- | --- | --- |"]
    lines += [f"| {n} | {e:.1f} | {d:.1f} | {kb:.0f} |" for n, e, d, kb in bench_codecs(src, args.image_size)]
    lines += ["", f"Training loader (decode, flip, shuffle, batch of {args.batch_size}, float32 [-1, 1]):", "",
              "| shards | loader workers | images/s | images/s per worker |", "| --- | --- | --- | --- |"]
    for fmt in args.formats:
        for workers in args.loader_workers:
            rate = bench_loader(os.path.join(args.work, f"packed-{fmt}"), workers, args.batch_size, args.steps)
            lines.append(f"| {fmt} | {workers} | {rate:.0f} | {rate / max(workers, 1):.0f} |")
    lines += ["", "Load average (1 min) at start and end: "
              f"{start_load:.2f}, {os.getloadavg()[0]:.2f} (other processes compete for the cores when high)."]
    return "\n".join(lines)


def configure(p) -> None:
    benchmarks.data(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print(report(args))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m mvar.data.bench", benchmarks.DATA, configure), argv, name="mvar.data.bench")


if __name__ == "__main__":
    sys.exit(main())
