"""`mvar data ...` through the console script's main: exit codes and one-line errors."""
from __future__ import annotations

from mvar.cli import main
from mvar.data.manifest import read_manifest


def test_synth_then_verify(tmp_path, capsys):
    out = str(tmp_path / "s")
    assert main(["data", "synth", "--out", out, "--num-images", "30", "--image-size", "16",
                 "--num-classes", "3", "--shard-size", "10"]) == 0
    assert read_manifest(out).num_samples == 30
    assert main(["data", "verify", out]) == 0
    assert "ok: 3 shards, 30 samples" in capsys.readouterr().out


def test_pack_cli_reports_skips(make_tree, tmp_path, capsys):
    src = make_tree({"a": 3, "b": 4})
    (tmp_path / "tree" / "c").mkdir()
    out = str(tmp_path / "out")
    assert main(["data", "pack", "--src", src, "--out", out, "--image-size", "16", "--workers", "1",
                 "--no-progress"]) == 0
    assert "packed 7 images of 2 classes" in capsys.readouterr().out
    assert main(["data", "verify", out]) == 0


def test_bad_input_exits_2_naming_the_path(tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert main(["data", "verify", missing]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and missing in err and "mvar data pack" in err
    assert main(["data", "pack", "--src", missing, "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert missing in capsys.readouterr().err
    assert main(["data", "synth", "--out", str(tmp_path / "s"), "--num-images", "0"]) == 2
    assert "--num-images" in capsys.readouterr().err
    assert main(["data", "tokenize", "--tokenizer", missing, "--src", missing, "--out", str(tmp_path / "t")]) == 2
    assert missing in capsys.readouterr().err
