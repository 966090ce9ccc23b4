"""The synthetic set: deterministic, and classes that differ while their images vary."""
from __future__ import annotations

import os

import numpy as np

from mvar.data.manifest import read_manifest
from mvar.data.synth import synth_images, write_synth


def _files(directory: str) -> dict[str, bytes]:
    return {n: open(os.path.join(directory, n), "rb").read()
            for n in sorted(os.listdir(directory)) if not n.startswith(".")}


def test_same_seed_gives_identical_bytes(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    write_synth(a, num_images=120, image_size=32, num_classes=5, seed=7, shard_size=50)
    write_synth(b, num_images=120, image_size=32, num_classes=5, seed=7, shard_size=50)
    write_synth(c, num_images=120, image_size=32, num_classes=5, seed=8, shard_size=50)
    assert _files(a) == _files(b)
    assert [s.sha256 for s in read_manifest(a).shards] == [s.sha256 for s in read_manifest(b).shards]
    assert [s.sha256 for s in read_manifest(a).shards] != [s.sha256 for s in read_manifest(c).shards]
    assert read_manifest(a).num_samples == 120 and [s.num_samples for s in read_manifest(a).shards] == [50, 50, 20]


def test_an_image_depends_only_on_seed_and_index():
    whole = list(synth_images(3, 0, 300, 10, 24))
    part = list(synth_images(3, 250, 260, 10, 24))
    for (i, label, img), (j, label2, img2) in zip(whole[250:260], part):
        assert i == j and label == label2 and np.array_equal(img, img2)


def _nearest_centroid_accuracy(features: np.ndarray, labels: np.ndarray, num_classes: int) -> float:
    train, test = slice(0, len(labels) * 2 // 3), slice(len(labels) * 2 // 3, None)
    centroids = np.stack([features[train][labels[train] == c].mean(0) for c in range(num_classes)])
    dist = ((features[test][:, None] - centroids[None]) ** 2).sum(-1)
    return float((dist.argmin(1) == labels[test]).mean())


def test_classes_are_distinct_yet_varied():
    num_classes = 10
    data = list(synth_images(0, 0, 900, num_classes, 32))
    x = np.stack([img for _, _, img in data]).astype(np.float32) / 255  # (N, 32, 32, 3)
    labels = np.array([label for _, label, _ in data])
    assert np.bincount(labels).tolist() == [90] * num_classes
    # the colour of the most saturated pixels (the shape) tells the class apart ...
    sat = x.max(-1) - x.min(-1)
    mask = (sat > np.quantile(sat.reshape(len(x), -1), 0.85, axis=1)[:, None, None])[..., None]
    shape_colour = (x * mask).sum((1, 2)) / mask.sum((1, 2))
    assert _nearest_centroid_accuracy(shape_colour, labels, num_classes) > 0.7
    # ... while pixels vary within a class (position, scale, background): no single template
    assert all(x[labels == c].std(0).mean() > 0.08 for c in range(num_classes))
    pixels = x.reshape(len(x), 8, 4, 8, 4, 3).mean((2, 4)).reshape(len(x), -1)
    assert 0.25 < _nearest_centroid_accuracy(pixels, labels, num_classes) < 0.95


def test_a_manifest_whose_total_disagrees_with_its_shards_is_refused(tmp_path):
    import json

    import pytest

    from mvar.data.manifest import DataError
    out = str(tmp_path / "s")
    write_synth(out, num_images=30, image_size=16, num_classes=3, seed=0, shard_size=20)
    path = os.path.join(out, "manifest.json")
    data = json.loads(open(path).read())
    data["num_samples"] = 300
    open(path, "w").write(json.dumps(data))
    with pytest.raises(DataError, match=r"num_samples 300 disagrees with its shards, which hold 30"):
        read_manifest(out)
