"""Decoding one shard sample (images or tokens) into tensors, and batching them."""
from __future__ import annotations

import io
import random

import numpy as np
import torch

from mvar.data.imaging import decode, to_unit_range
from mvar.data.tario import Sample

IMAGE_EXTS = ("png", "jpg")
TOKEN_EXT, TOKEN_FLIP_EXT = "npy", "flip.npy"  # token shards: `KEY.npy`, `KEY.flip.npy`, `KEY.cls`


def label_of(sample: Sample, num_classes: int) -> int:
    if "cls" not in sample:
        raise ValueError(f"no .cls member (has {', '.join(sorted(sample))})")
    label = int(sample["cls"])
    if not 0 <= label < num_classes:
        raise ValueError(f"class {label} outside [0, {num_classes})")
    return label


def decode_image(sample: Sample, image_size: int, flip: bool) -> torch.Tensor:
    """float32 (3, S, S) in [-1, 1]; raises ValueError/OSError on a bad sample."""
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise ValueError(f"no image member (has {', '.join(sorted(sample))})")
    arr_HW3 = decode(sample[ext])
    if arr_HW3.shape != (image_size, image_size, 3):
        raise ValueError(f"image is {arr_HW3.shape[1]}x{arr_HW3.shape[0]}, expected {image_size}x{image_size}")
    if flip:
        arr_HW3 = arr_HW3[:, ::-1]
    return to_unit_range(arr_HW3)


def encode_tokens(idx_L: np.ndarray) -> bytes:
    """Flat code indices of all scales -> .npy bytes (dtype kept: uint16 for vocab <= 65536)."""
    buf = io.BytesIO()
    np.save(buf, idx_L, allow_pickle=False)
    return buf.getvalue()


def decode_tokens(sample: Sample, num_tokens: int, vocab_size: int, flip: bool) -> torch.Tensor:
    """int64 (L,) of the stored (or stored flipped) code indices; L = sum(pn * pn)."""
    ext = TOKEN_FLIP_EXT if flip and TOKEN_FLIP_EXT in sample else TOKEN_EXT
    if ext not in sample:
        raise ValueError(f"no .{TOKEN_EXT} member (has {', '.join(sorted(sample))})")
    idx_L = np.load(io.BytesIO(sample[ext]), allow_pickle=False)
    if idx_L.shape != (num_tokens,):
        raise ValueError(f"token array has shape {idx_L.shape}, expected ({num_tokens},)")
    idx_L = torch.from_numpy(idx_L.astype(np.int64))
    if int(idx_L.max()) >= vocab_size:
        raise ValueError(f"token index {int(idx_L.max())} >= vocab_size {vocab_size}")
    return idx_L


def split_scales(idx_BL: torch.Tensor, patch_nums: tuple[int, ...] | list[int]) -> list[torch.Tensor]:
    """Flat (B, L) indices -> one (B, pn * pn) tensor per scale, coarsest first."""
    sizes = [pn * pn for pn in patch_nums]
    if idx_BL.shape[-1] != sum(sizes):
        raise ValueError(f"{idx_BL.shape[-1]} tokens do not match patch_nums {tuple(patch_nums)} ({sum(sizes)})")
    return list(torch.split(idx_BL, sizes, dim=-1))


class SampleDecoder:
    """Turns a raw sample into (x, label): image (3, S, S) float or tokens (L,) int64."""

    def __init__(self, kind: str, num_classes: int, image_size: int, tokens: dict):
        self.kind, self.num_classes, self.image_size = kind, num_classes, image_size
        self.num_tokens = sum(pn * pn for pn in tokens.get("patch_nums", ()))
        self.vocab_size = int(tokens.get("vocab_size", 0))

    def __call__(self, sample: Sample, rng: random.Random | None) -> tuple[torch.Tensor, int]:
        flip = rng is not None and rng.random() < 0.5  # rng given only when flips are wanted
        label = label_of(sample, self.num_classes)
        if self.kind == "tokens":
            return decode_tokens(sample, self.num_tokens, self.vocab_size, flip), label
        return decode_image(sample, self.image_size, flip), label


def collate(items: list[tuple[torch.Tensor, int, int]], with_index: bool) -> tuple[torch.Tensor, ...]:
    """[(x, label, global index)] -> (x_B..., labels_B int64[, index_B int64])."""
    x = torch.stack([item[0] for item in items])
    labels = torch.tensor([item[1] for item in items], dtype=torch.int64)
    if not with_index:
        return x, labels
    return x, labels, torch.tensor([item[2] for item in items], dtype=torch.int64)
