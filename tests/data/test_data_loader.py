"""Training and evaluation loaders: coverage across ranks and workers, determinism, locations, errors."""
from __future__ import annotations

import dataclasses
import os

import fsspec
import pytest
import torch

from mvar.config import ConfigError, from_dict
from mvar.data.config import DataConfig
from mvar.data.loader import build_eval_loader, build_train_loader, reader_range
from mvar.data.manifest import DataError, read_manifest
from mvar.data.synth import write_synth

WORLD, WORKERS = 2, 2


@pytest.fixture(scope="module")
def few_shards(tmp_path_factory) -> str:
    """3 uneven shards (40, 40, 10): fewer shards than the 4 readers of 2 ranks x 2 workers."""
    out = str(tmp_path_factory.mktemp("few") / "shards")
    write_synth(out, num_images=90, image_size=16, num_classes=4, seed=1, shard_size=40)
    return out


@pytest.mark.parametrize("which", ["synth_set", "few_shards"])
def test_train_gives_equal_steps_on_every_rank(which, request, data_cfg):
    shards = request.getfixturevalue(which)
    cfg = data_cfg(shards, num_workers=WORKERS, steps_per_epoch=5, batch_size=8)
    size = read_manifest(shards).image_size
    firsts = []
    for rank in range(WORLD):
        loader = build_train_loader(cfg, rank, WORLD)
        for epoch in range(2):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 5
            for x, labels in batches:
                assert x.shape == (8, 3, size, size) and x.dtype == torch.float32
                assert labels.shape == (8,) and labels.dtype == torch.int64
                assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
            firsts.append(batches[0][0])
        assert loader.bad_samples.value == 0
    assert not torch.equal(firsts[0], firsts[2])  # ranks read different data


def test_default_steps_per_epoch_is_one_pass(synth_set, data_cfg):
    loader = build_train_loader(data_cfg(synth_set, batch_size=16), 1, 3)
    assert len(loader) == 240 // (16 * 3)


@pytest.mark.parametrize("which", ["synth_set", "few_shards"])
def test_eval_reads_every_sample_exactly_once(which, request, data_cfg):
    shards = request.getfixturevalue(which)
    manifest = read_manifest(shards)
    cfg = data_cfg(shards, num_workers=WORKERS, batch_size=7)
    seen, per_rank = [], []
    for rank in range(WORLD):
        loader = build_eval_loader(cfg, rank, WORLD)
        first = [(index.tolist(), labels.tolist()) for _, labels, index in loader]
        again = [(index.tolist(), labels.tolist()) for _, labels, index in loader]
        assert first == again  # deterministic order
        indices = [i for idx, _ in first for i in idx]
        labels = [c for _, lab in first for c in lab]
        assert len(indices) == loader.num_samples and len(first) == len(loader)
        assert labels == [i % manifest.num_classes for i in indices]  # synth: label = index mod classes
        seen += indices
        per_rank.append(len(indices))
    assert sorted(seen) == list(range(manifest.num_samples))
    assert max(per_rank) - min(per_rank) <= 1


def test_reader_ranges_partition_the_samples():
    for n, readers in [(10, 4), (3, 16), (1000, 7)]:
        ranges = [reader_range(n, r, readers) for r in range(readers)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))


def test_same_seed_and_epoch_give_the_same_stream(synth_set, data_cfg):
    cfg = data_cfg(synth_set, steps_per_epoch=3)
    a, b = build_train_loader(cfg, 0, 2), build_train_loader(cfg, 0, 2)
    a.set_epoch(4)
    b.set_epoch(4)
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b))
    b.set_epoch(5)
    first_b5 = next(iter(b))[0]
    a.set_epoch(4)
    assert not torch.equal(next(iter(a))[0], first_b5)
    assert torch.equal(next(iter(a))[0], first_b5)  # without set_epoch the next iteration is epoch 5


def test_random_flip_mirrors_some_images(synth_set, data_cfg):
    plain = build_train_loader(data_cfg(synth_set, shuffle_buffer=0, random_flip=False, steps_per_epoch=4), 0, 1)
    flipped = build_train_loader(data_cfg(synth_set, shuffle_buffer=0, random_flip=True, steps_per_epoch=4), 0, 1)
    num_flipped = 0
    for (x, _), (xf, _) in zip(plain, flipped):
        for img, imgf in zip(x, xf):
            if torch.equal(img.flip(-1), imgf) and not torch.equal(img, imgf):
                num_flipped += 1
            else:
                assert torch.equal(img, imgf)
    assert 4 < num_flipped < 28  # about half of 32


def test_fsspec_url_and_pipe_opener(synth_set, data_cfg):
    fs = fsspec.filesystem("memory")
    for name in os.listdir(synth_set):
        if not name.startswith("."):
            fs.pipe(f"/synth/{name}", open(os.path.join(synth_set, name), "rb").read())
    remote = build_eval_loader(data_cfg("memory://synth", verify_checksums=True), 0, 1)
    assert sum(len(labels) for _, labels, _ in remote) == 240
    piped = build_eval_loader(data_cfg(synth_set, shard_opener="pipe:cat {url}"), 0, 1)
    assert sum(len(labels) for _, labels, _ in piped) == 240


def test_missing_locations_say_what_and_how(tmp_path, synth_set, data_cfg):
    with pytest.raises(DataError, match=r"nowhere.*does not exist.*mvar data pack"):
        build_train_loader(data_cfg(str(tmp_path / "nowhere")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty.*no manifest.json.*mvar data pack"):
        build_eval_loader(data_cfg(str(tmp_path / "empty")))
    with pytest.raises(DataError, match="set data.shards"):
        build_train_loader(data_cfg(""))
    with pytest.raises(DataError, match="holds images shards but this run reads tokens"):
        build_train_loader(data_cfg(synth_set, kind="tokens"))
    with pytest.raises(DataError, match="32 px images but this run expects 64 px"):
        build_train_loader(data_cfg(synth_set, image_size=64))
    with pytest.raises(ValueError, match="rank 2"):
        build_train_loader(data_cfg(synth_set), 2, 2)


def test_missing_shard_file_is_named(tmp_path, data_cfg):
    out = str(tmp_path / "set")
    write_synth(out, num_images=20, image_size=16, num_classes=2, shard_size=10)
    os.remove(os.path.join(out, "shard-000001.tar"))
    with pytest.raises(DataError, match="shard-000001.tar"):
        build_train_loader(data_cfg(out))


def test_config_errors_name_the_key():
    @dataclasses.dataclass
    class Run:
        data: DataConfig = dataclasses.field(default_factory=DataConfig)

    with pytest.raises(ConfigError, match="'data.batch_size'"):
        from_dict(Run, {"data": {"batch_size": 0}})
    with pytest.raises(ConfigError, match="'data.shard_opener'.*{url}"):
        from_dict(Run, {"data": {"shard_opener": "pipe:aws s3 cp -"}})
    with pytest.raises(ConfigError, match="'data.kind'"):
        from_dict(Run, {"data": {"kind": "latents"}})
