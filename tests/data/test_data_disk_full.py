"""A full disk under `mvar data pack` (the writer every data job shares): one line naming the shard,
no half file left or taken as complete, and a rerun after freeing space gives the same shard set
as a pack that never stopped."""
from __future__ import annotations

import os
import re
from pathlib import Path

from mvar.cli import main as mvar_main
from mvar.data.manifest import MANIFEST_NAME, read_manifest
from mvar.data.writer import STATE_DIR

PAGE = 4096  # tmpfs charges whole pages per file


def _pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE) * PAGE


def _pack_args(src: str, out: Path) -> list[str]:
    return ["data", "pack", "--src", src, "--out", str(out), "--image-size", "32", "--shard-size", "4",
            "--workers", "1", "--no-progress"]


def _room_for_two_shards_and_a_half(clean: Path) -> int:
    """Bytes of a tmpfs that holds the job's state, shards 0 and 1 with their records, half of shard 2."""
    state = clean / STATE_DIR
    files = [state / "plan.json", state / "lock", *(state / f"shard-00000{i}.tar.json" for i in (0, 1)),
             *(clean / f"shard-00000{i}.tar" for i in (0, 1))]
    return sum(_pages(f) for f in files) + _pages(clean / "shard-000002.tar") // 2 + 2 * PAGE


def _left_temps(out: Path) -> list[str]:
    return [n for d in (out, out / STATE_DIR) for n in os.listdir(d) if ".tmp-" in n]


def test_a_full_disk_while_packing_is_one_line_and_a_rerun_finishes_the_same_set(
        make_tree, tmp_path, capsys, monkeypatch, disk_full, small_disk):
    src = make_tree({"a": 12, "b": 12})  # 24 images: 6 shards of 4
    clean, out = tmp_path / "clean", tmp_path / "small"
    assert mvar_main(_pack_args(src, clean)) == 0
    if disk_full == "tmpfs":
        small_disk.mount(out, _room_for_two_shards_and_a_half(clean))
    else:
        monkeypatch.setenv("MVAR_FAULT", "enospc-shard@2")
    capsys.readouterr()
    assert mvar_main(_pack_args(src, out)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    found = re.fullmatch(rf"mvar data: error: no space left on the device of '{out}' while writing "
                         r"shard-00000(\d)\.tar \(.* free\); it was removed, the (\d) shard\(s\) before it are "
                         r"complete: free space and rerun the same command to write the rest", err)
    assert found and found[1] == found[2] and int(found[1]) >= 1, err
    # no half file: no temp left, no manifest (the set is not complete), every visible shard whole
    assert _left_temps(out) == [] and not (out / MANIFEST_NAME).exists()
    kept = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
    assert kept == [f"shard-00000{i}.tar" for i in range(int(found[1]))]
    assert all((out / n).read_bytes() == (clean / n).read_bytes() for n in kept)

    if disk_full == "tmpfs":
        small_disk.grow(out, 64 << 20)
    monkeypatch.delenv("MVAR_FAULT", raising=False)
    assert mvar_main(_pack_args(src, out)) == 0
    names = sorted(n for n in os.listdir(clean) if not n.startswith("."))
    assert names == sorted(n for n in os.listdir(out) if not n.startswith("."))
    assert all((out / n).read_bytes() == (clean / n).read_bytes() for n in names)
    assert read_manifest(str(out)).num_samples == 24
