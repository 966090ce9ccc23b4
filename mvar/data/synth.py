"""A deterministic, class-conditional synthetic image set for local runs and tests.

Each class is a (shape, hue, fill texture) triple, so classes differ at a
glance; within a class the position, scale, rotation, exact colour, texture
phase and background vary, so a generator must learn a distribution, not a
template. Image i depends only on (seed, i): the output is identical however
it is chunked. Rendering is vectorised over chunks of images (numpy only).
"""
from __future__ import annotations

import numpy as np

from mvar.data.imaging import encode
from mvar.data.manifest import Manifest, write_manifest
from mvar.data.writer import ShardSetWriter

SHAPES = ("disk", "square", "diamond", "ring", "cross", "triangle", "xmark", "frame")
TEXTURES = ("solid", "stripes", "dots")
_GOLDEN = 0.6180339887  # hue step between classes: consecutive classes far apart on the colour wheel
_CHUNK = 256
_SQRT2 = np.float32(np.sqrt(2.0))


def class_names(num_classes: int) -> list[str]:
    return [f"{c:03d}-{_texture_of(c)}-{SHAPES[c % len(SHAPES)]}" for c in range(num_classes)]


def _texture_of(c: int) -> str:
    return TEXTURES[(c // len(SHAPES)) % len(TEXTURES)]


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """(N,) each in [0, 1] -> (N, 3) in [0, 1]."""
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6.0) % 6.0
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def _image_params(seed: int, index: int, num_classes: int, size: int) -> dict:
    """Everything random about image `index`, from its own generator."""
    rng = np.random.default_rng([seed, index])
    label = index % num_classes  # balanced, and classes interleave within every shard
    radius = size * rng.uniform(0.16, 0.30)
    margin = radius + 1.0
    return dict(
        label=label,
        cx=rng.uniform(margin, size - margin), cy=rng.uniform(margin, size - margin),
        radius=radius, theta=rng.uniform(-0.35, 0.35),
        hue=(label * _GOLDEN + rng.normal(0.0, 0.02)) % 1.0,
        sat=rng.uniform(0.65, 1.0), val=rng.uniform(0.75, 1.0),
        period=rng.uniform(0.25, 0.45) * radius + 2.0, phase=rng.uniform(0.0, 2 * np.pi),
        bg_a=rng.uniform(0.05, 0.45, 3), bg_b=rng.uniform(0.05, 0.45, 3), bg_angle=rng.uniform(0, 2 * np.pi),
        noise=rng.normal(0.0, 0.025, (size, size, 3)),
    )


def _signed_distance(shape: np.ndarray, a, b, u, v, r, rad) -> np.ndarray:
    """Approximate distance (px) outside each image's shape; negative inside. All (N, S, S)."""
    box = np.maximum(a, b)
    options = [
        r - rad,                                                          # disk
        box - rad,                                                        # square
        (a + b - rad) / _SQRT2,                                     # diamond
        np.abs(r - 0.75 * rad) - 0.25 * rad,                              # ring
        np.minimum(np.maximum(a - rad / 3, b - rad), np.maximum(b - rad / 3, a - rad)),  # cross
        np.maximum(v - 0.8 * rad, (a - 0.6 * (v + rad)) / 1.17),          # triangle, apex up
        np.maximum(np.abs(a - b) / _SQRT2 - rad / 4, box - rad),    # x mark
        np.abs(box - 0.75 * rad) - 0.25 * rad,                            # frame
    ]
    return np.select([shape == k for k in range(len(SHAPES))], options)


def _fill_pattern(texture: np.ndarray, u, v, period, phase) -> np.ndarray:
    """0 = base colour, 1 = dark colour, per pixel (N, S, S)."""
    stripes = np.clip(np.sin(2 * np.pi * u / period + phase) * 2.0 + 0.5, 0.0, 1.0)
    dots = ((np.sin(2 * np.pi * u / period + phase) * np.sin(2 * np.pi * v / period + phase)) > 0.0) * 1.0
    return np.select([texture == 0, texture == 1, texture == 2], [np.zeros_like(u), stripes, dots])


def render(params: list[dict], size: int) -> np.ndarray:
    """Per-image parameters -> uint8 (N, S, S, 3)."""
    # float32 throughout: half the memory traffic of float64, and 8-bit output needs no more
    col = {k: np.asarray([p[k] for p in params], dtype=np.float32) for k in params[0] if k != "label"}
    col["label"] = np.asarray([p["label"] for p in params])
    per = {k: col[k][:, None, None] for k in ("cx", "cy", "radius", "theta", "period", "phase", "bg_angle")}
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5                                 # (S, S) pixel centres
    dx, dy = x[None] - per["cx"], y[None] - per["cy"]                       # (N, S, S)
    cos, sin = np.cos(per["theta"]), np.sin(per["theta"])
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy                        # shape-aligned coordinates
    a, b, r = np.abs(u), np.abs(v), np.hypot(u, v)
    labels = col["label"][:, None, None]
    shape = labels % len(SHAPES)
    texture = (labels // len(SHAPES)) % len(TEXTURES)
    alpha = np.clip(0.5 - _signed_distance(shape, a, b, u, v, r, per["radius"]), 0.0, 1.0)[..., None]
    base = _hsv_to_rgb(col["hue"], col["sat"], col["val"])[:, None, None]   # (N, 1, 1, 3)
    dark = np.clip(_fill_pattern(texture, u, v, per["period"], per["phase"]), 0.0, 1.0)[..., None]
    fill = base * (1.0 - 0.55 * dark)
    ramp = ((x[None] * np.cos(per["bg_angle"]) + y[None] * np.sin(per["bg_angle"])) / size + 1.0) / 2.0
    bg = col["bg_a"][:, None, None] * (1 - ramp[..., None]) + col["bg_b"][:, None, None] * ramp[..., None]
    img = bg * (1.0 - alpha) + fill * alpha + col["noise"]
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


def synth_images(seed: int, start: int, stop: int, num_classes: int, size: int):
    """Yield (index, label, uint8 (S, S, 3)) for images start..stop-1."""
    for lo in range(start, stop, _CHUNK):
        params = [_image_params(seed, i, num_classes, size) for i in range(lo, min(lo + _CHUNK, stop))]
        images = render(params, size)
        for offset, p in enumerate(params):
            yield lo + offset, int(p["label"]), images[offset]


def write_synth(out: str, num_images: int, image_size: int, num_classes: int, seed: int = 0,
                shard_size: int = 1000, fmt: str = "png") -> Manifest:
    """Write the synthetic set as image shards + manifest under `out` (resumable like pack)."""
    plan = dict(command="synth", num_images=num_images, image_size=image_size,
                num_classes=num_classes, seed=seed, shard_size=shard_size, format=fmt)
    num_shards = -(-num_images // shard_size)
    with ShardSetWriter(out, plan) as job:
        for index in range(num_shards):
            if job.is_done(index):
                continue
            images = synth_images(seed, index * shard_size, min((index + 1) * shard_size, num_images),
                                  num_classes, image_size)
            job.write(index, ((f"{i:08d}", {fmt: encode(img, fmt), "cls": str(label).encode()})
                              for i, label, img in images))
        shards = [info for info, _ in job.records(num_shards)]
        manifest = Manifest(kind="images", num_samples=num_images, class_names=class_names(num_classes),
                            image_size=image_size, sample_format=fmt, shards=shards, source=plan)
        write_manifest(out, manifest)
    return manifest
