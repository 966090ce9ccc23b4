"""Damaged shards: skipped and counted, fatal past the limit, caught by checksums and `verify`."""
from __future__ import annotations

import os
import shutil

import pytest

from mvar.cli import main
from mvar.data.loader import build_eval_loader, build_train_loader
from mvar.data.manifest import DataError
from mvar.data.tario import ShardWriter, iter_tar_samples


@pytest.fixture
def damaged(tmp_path, synth_set):
    """A private copy of the synthetic set (240 samples, shards of 50) to damage."""
    out = str(tmp_path / "set")
    shutil.copytree(synth_set, out, ignore=shutil.ignore_patterns(".mvar-data"))
    return out


def _truncate(path: str, keep_fraction: float = 0.5) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(int(os.path.getsize(path) * keep_fraction))


def _rewrite_with_bad_image(path: str, bad_key_index: int) -> str:
    """Rewrite a shard with one sample's PNG replaced by junk; returns that key."""
    with open(path, "rb") as fh:
        samples = list(iter_tar_samples(fh))
    key = samples[bad_key_index][0]
    samples[bad_key_index][1]["png"] = b"\x89PNG\r\n\x1a\n but then junk"
    writer = ShardWriter(os.path.dirname(path), os.path.basename(path))
    for k, sample in samples:
        writer.add(k, sample)
    writer.commit()
    return key


def _count(loader) -> int:
    return sum(len(batch[1]) for batch in loader)


def test_truncated_tar_is_skipped_and_counted(damaged, data_cfg):
    _truncate(os.path.join(damaged, "shard-000001.tar"))
    loader = build_eval_loader(data_cfg(damaged, num_workers=2, max_bad_samples=1000), 0, 1)
    read = _count(loader)
    assert read < 240
    assert loader.bad_samples.value == 240 - read  # the lost tail, summed over both workers


def test_undecodable_image_is_skipped_and_counted_once(damaged, data_cfg):
    _rewrite_with_bad_image(os.path.join(damaged, "shard-000000.tar"), 3)
    loader = build_eval_loader(data_cfg(damaged, max_bad_samples=5), 0, 1)
    assert _count(loader) == 239 and loader.bad_samples.value == 1
    train = build_train_loader(data_cfg(damaged, max_bad_samples=1, steps_per_epoch=60), 0, 1)
    assert _count(train) == 480  # two passes over the data: the same bad sample counts once
    assert train.bad_samples.value == 1


def test_past_max_bad_samples_the_job_fails_naming_the_shard(damaged, data_cfg):
    _rewrite_with_bad_image(os.path.join(damaged, "shard-000002.tar"), 0)
    loader = build_eval_loader(data_cfg(damaged, num_workers=2, max_bad_samples=0), 0, 1)
    with pytest.raises(DataError, match=r"shard-000002.tar.*max_bad_samples"):
        _count(loader)


def test_train_fails_instead_of_hanging_when_nothing_decodes(damaged, data_cfg):
    for name in os.listdir(damaged):
        if name.endswith(".tar"):
            with open(os.path.join(damaged, name), "wb") as fh:
                fh.write(b"this is not a tar file" * 100)
    loader = build_train_loader(data_cfg(damaged, max_bad_samples=10 ** 6, steps_per_epoch=3), 0, 1)
    with pytest.raises(DataError, match="could be read"):
        _count(loader)


def test_checksum_mismatch_fails_at_start_when_asked(damaged, data_cfg):
    path = os.path.join(damaged, "shard-000003.tar")
    with open(path, "r+b") as fh:  # one flipped byte inside a PNG payload: still a valid tar
        fh.seek(2000)
        byte = fh.read(1)
        fh.seek(2000)
        fh.write(bytes([byte[0] ^ 0xFF]))
    build_train_loader(data_cfg(damaged), 0, 1)  # without verification: starts
    with pytest.raises(DataError, match=r"shard-000003.tar: sha256 [0-9a-f]{64}, manifest says [0-9a-f]{64}"):
        build_train_loader(data_cfg(damaged, verify_checksums=True), 0, 1)
    with pytest.raises(DataError, match="shard-000003.tar"):
        # rank 1 of 2 checks shards 1 and 3
        build_eval_loader(data_cfg(damaged, verify_checksums=True), 1, 2)


def test_verify_names_each_bad_shard(damaged, capsys):
    assert main(["data", "verify", damaged]) == 0
    _truncate(os.path.join(damaged, "shard-000001.tar"))
    key = _rewrite_with_bad_image(os.path.join(damaged, "shard-000004.tar"), 7)
    capsys.readouterr()
    assert main(["data", "verify", damaged, "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert "BAD shard-000001.tar" in err and "unreadable" in err
    assert "BAD shard-000004.tar" in err and f"sample {key}" in err and "sha256" in err
    assert "shard-000000.tar" not in err and "2 of 5 shards bad" in err
