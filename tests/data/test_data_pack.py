"""`mvar data pack`: preprocessing, round trip through the loader, skips, resume."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mvar.data.imaging import center_crop_arr, open_rgb
from mvar.data.loader import build_eval_loader
from mvar.data.manifest import read_manifest
from mvar.data.pack import PackOptions, pack, scan_tree
from mvar.errors import UserError


def _opts(**kw) -> PackOptions:
    return PackOptions(**dict(dict(image_size=32, shard_size=8, workers=1, progress=False), **kw))


def test_center_crop_follows_adm_steps():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (130, 300, 3), dtype=np.uint8))
    # short side 130 >= 2*32: BOX halve to 150x65, again to 75x32; then BICUBIC to short side 32; centre crop
    step = image.resize((150, 65), Image.BOX).resize((75, 32), Image.BOX).resize((75, 32), Image.BICUBIC)
    expected = np.asarray(step)[:, 21:53]
    np.testing.assert_array_equal(center_crop_arr(image, 32), expected)
    small = Image.fromarray(rng.integers(0, 256, (20, 50, 3), dtype=np.uint8))  # upsampled when too small
    assert center_crop_arr(small, 32).shape == (32, 32, 3)


def test_pack_round_trip_pixels_and_labels(make_tree, tmp_path, data_cfg):
    src = make_tree({"cat": 7, "dog": 9, "emu": 5})
    manifest = pack(src, str(tmp_path / "out"), _opts(workers=2))
    assert manifest.num_samples == 21 and manifest.class_names == ["cat", "dog", "emu"]
    assert [s.num_samples for s in manifest.shards] == [8, 8, 5]
    order = scan_tree(src).files  # the order samples were written in
    loader = build_eval_loader(data_cfg(str(tmp_path / "out"), batch_size=4), 0, 1)
    seen = 0
    for x_B3HW, labels_B, index_B in loader:
        assert x_B3HW.dtype == torch.float32 and labels_B.dtype == torch.int64
        for x, label, index in zip(x_B3HW, labels_B.tolist(), index_B.tolist()):
            path, expected_label = order[index]
            expected = center_crop_arr(open_rgb(os.path.join(src, path)), 32)
            assert label == expected_label == manifest.class_names.index(path.split("/")[0])
            torch.testing.assert_close(x, torch.from_numpy(np.array(expected)).permute(2, 0, 1).float() / 127.5 - 1)
            seen += 1
    assert seen == 21


def test_pack_mixes_classes_within_shards(make_tree, tmp_path):
    src = make_tree({"a": 12, "b": 12, "c": 12})
    labels = [label for _, label in scan_tree(src).files[:12]]
    assert len(set(labels)) == 3  # sorted order would put a whole class in the first shard
    assert [lab for _, lab in scan_tree(src, shuffle=False).files[:12]] == [0] * 12


def test_pack_skips_and_counts_bad_inputs(make_tree, tmp_path, caplog):
    src = make_tree({"cat": 4, "dog": 4})
    os.makedirs(os.path.join(src, "empty"))
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / "tree" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    manifest = pack(src, str(tmp_path / "out"), _opts())
    assert manifest.class_names == ["cat", "dog"]  # the empty folder is not a class
    assert manifest.num_samples == 8
    assert manifest.skipped["empty_class_folders"] == ["empty"]
    assert manifest.skipped["non_image_files"] == 1
    assert manifest.skipped["undecodable_images"] == 1
    assert manifest.skipped["undecodable_examples"] == ["dog/broken.jpg"]
    assert "empty class folder" in caplog.text and "broken.jpg" in caplog.text


def test_pack_bad_source_errors_name_the_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(UserError, match="nowhere.*does not exist"):
        pack(missing, str(tmp_path / "out"), _opts())
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "a.jpg").write_bytes(b"")
    with pytest.raises(UserError, match="flat.*no class folders"):
        pack(str(flat), str(tmp_path / "out"), _opts())


def _shard_stats(out: str) -> dict[str, tuple[int, int]]:
    return {n: (os.stat(os.path.join(out, n)).st_ino, os.stat(os.path.join(out, n)).st_mtime_ns)
            for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def _same_files(a: str, b: str) -> None:
    names = sorted(n for n in os.listdir(a) if not n.startswith("."))
    assert names == sorted(n for n in os.listdir(b) if not n.startswith("."))
    for name in names:
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_resume_after_partial_pack_keeps_complete_shards(make_tree, tmp_path):
    src = make_tree({"a": 10, "b": 11, "c": 9})
    clean, resumed = str(tmp_path / "clean"), str(tmp_path / "resumed")
    pack(src, clean, _opts())
    pack(src, resumed, _opts())
    # an interruption: no manifest, the last shards missing (one after its record was
    # written, one before), and a half-written temp file
    os.remove(os.path.join(resumed, "manifest.json"))
    os.remove(os.path.join(resumed, "shard-000003.tar"))
    os.remove(os.path.join(resumed, "shard-000002.tar"))
    os.remove(os.path.join(resumed, ".mvar-data", "shard-000002.tar.json"))
    with open(os.path.join(resumed, "shard-000002.tar.tmp-12345"), "wb") as fh:
        fh.write(b"partial tar bytes")
    kept = _shard_stats(resumed)
    pack(src, resumed, _opts())
    after = _shard_stats(resumed)
    assert all(after[name] == stat for name, stat in kept.items())  # not rewritten
    assert set(after) == {f"shard-{i:06d}.tar" for i in range(4)}
    _same_files(clean, resumed)


def test_resume_after_killed_pack_process(make_tree, tmp_path):
    rng = np.random.default_rng(1)
    src = tmp_path / "big"
    for c in range(3):
        (src / f"class{c}").mkdir(parents=True)
        for i in range(60):  # big enough that the pack runs for a second or two
            arr = rng.integers(0, 256, (360, 480, 3), dtype=np.uint8)
            Image.fromarray(arr).save(src / f"class{c}" / f"{i}.jpg", quality=70)
    out, clean = str(tmp_path / "out"), str(tmp_path / "clean")
    cmd = [sys.executable, "-m", "mvar.cli", "data", "pack", "--src", str(src), "--out", out,
           "--image-size", "64", "--shard-size", "10", "--workers", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not os.path.exists(os.path.join(out, "shard-000001.tar")) and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(os.path.join(out, "manifest.json")), "pack finished before the kill"
    kept = _shard_stats(out)
    assert kept and len(kept) < 18
    pack(str(src), out, PackOptions(image_size=64, shard_size=10, workers=1, progress=False))
    assert all(_shard_stats(out)[name] == stat for name, stat in kept.items())
    pack(str(src), clean, PackOptions(image_size=64, shard_size=10, workers=2, progress=False))
    _same_files(clean, out)
    assert read_manifest(out).num_samples == 180


def test_rerun_with_other_options_is_refused(make_tree, tmp_path):
    src = make_tree({"a": 5, "b": 5})
    out = str(tmp_path / "out")
    pack(src, out, _opts())
    with pytest.raises(UserError, match="shard_size"):
        pack(src, out, _opts(shard_size=9))
