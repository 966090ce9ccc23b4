"""Fixtures for the data tests: real shard sets and image trees in temporary directories."""
from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from mvar.config import from_dict
from mvar.data.config import DataConfig
from mvar.data.synth import write_synth


@pytest.fixture(scope="session")
def synth_set(tmp_path_factory) -> str:
    """240 images, 32 px, 6 classes, 5 shards of 50 (the last one 40): read-only for tests."""
    out = str(tmp_path_factory.mktemp("synth") / "shards")
    write_synth(out, num_images=240, image_size=32, num_classes=6, seed=0, shard_size=50)
    return out


def _write_tree(root: str, num_per_class: dict[str, int], seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for name, count in num_per_class.items():
        os.makedirs(os.path.join(root, name), exist_ok=True)
        for i in range(count):
            h, w = (int(v) for v in rng.integers(40, 140, 2))
            arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            ext = "png" if i % 3 == 0 else "jpg"  # mixed inputs, as in real trees
            Image.fromarray(arr).save(os.path.join(root, name, f"img{i:03d}.{ext}"))


@pytest.fixture
def make_tree(tmp_path):
    """make_tree({'cat': 10, 'dog': 12}) -> path of an ImageFolder tree of random images."""
    def make(num_per_class: dict[str, int], name: str = "tree", seed: int = 0) -> str:
        root = str(tmp_path / name)
        _write_tree(root, num_per_class, seed)
        return root
    return make


@pytest.fixture
def data_cfg():
    """data_cfg(shards, **overrides) -> DataConfig through the project's config loader."""
    def make(shards: str, **overrides) -> DataConfig:
        return from_dict(DataConfig, dict(dict(shards=shards, batch_size=8, num_workers=0,
                                               shuffle_buffer=64), **overrides))
    return make
