"""The quickstart's picture: real held-out images, their tokenizer reconstructions and the samples of each
generator side by side, a row per class (out/quickstart/report/ablation.png)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

PER_CLASS = 4


def reconstructions(tokenizer_dir: Path, images_labels: list[tuple[np.ndarray, int]]):
    """The images through the tokenizer's discrete path (indices -> image), as (uint8 HWC, label) pairs."""
    import torch

    from mvar.checkpoint import load_tokenizer
    vae, _ = load_tokenizer(tokenizer_dir)
    x = torch.from_numpy(np.stack([im for im, _ in images_labels])).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    with torch.no_grad():
        rec = vae.idx_to_img(vae.img_to_idx(x)).clamp(-1, 1)
    rec_u8 = rec.add(1).mul(127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [(im, label) for im, (_, label) in zip(rec_u8, images_labels)]


def first_per_class(location: str, classes: list[int], per_class: int) -> list[tuple[np.ndarray, int]]:
    from mvar.metrics.images import iter_shard_images
    seen: dict[int, int] = {c: 0 for c in classes}
    out = []
    for image, label in iter_shard_images(location):
        if seen.get(label, per_class) < per_class:
            seen[label] += 1
            out.append((image, label))
        if all(n == per_class for n in seen.values()):
            break
    return out


def samples_of(eval_dir: Path) -> Path | None:
    """The sample shard set of an evaluation's (only) setting, when it is complete (its manifest is there)."""
    found = sorted(eval_dir.glob("*/samples/manifest.json"))
    return found[0].parent if found else None


def ablation_picture(out: Path, held_out: Path, rows: list[str], per_class: int = PER_CLASS) -> Path:
    """Panels: real, reconstructed, then ``rows`` (evaluations under out/eval/<name>) -> report/ablation.png."""
    from mvar.data.manifest import read_manifest
    from mvar.metrics.images import iter_shard_images
    from mvar.report import class_grid, write_picture
    names = read_manifest(str(held_out)).class_names
    classes = list(range(len(names)))
    real = first_per_class(str(held_out), classes, per_class)
    panels = [("real", class_grid(real, classes, per_class)),
              ("recon", class_grid(reconstructions(out / "tokenizer", real), classes, per_class))]
    for name in rows:
        samples = samples_of(out / "eval" / name)
        if samples is not None:
            panels.append((name, class_grid(iter_shard_images(str(samples)), classes, per_class)))
    (out / "report").mkdir(parents=True, exist_ok=True)
    return write_picture(panels, out / "report" / "ablation.png", [n.split("-", 1)[-1] for n in names])
