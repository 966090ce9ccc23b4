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
    got = capsys.readouterr()
    assert "ok: 3 shards, 30 samples" in got.out and "verify" not in got.err  # stderr is no terminal: no bar


def test_verify_draws_a_bar_over_the_samples_unless_told_not_to(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / "s")
    assert main(["data", "synth", "--out", out, "--num-images", "30", "--image-size", "16",
                 "--num-classes", "3", "--shard-size", "10", "--seed", "1"]) == 0
    monkeypatch.setenv("MVAR_PROGRESS", "1")  # as on a terminal (mvar.progress)
    assert main(["data", "verify", out, "--workers", "2"]) == 0
    err = capsys.readouterr().err
    assert f"verify {out}: 100%" in err and "30/30 " in err
    assert main(["data", "verify", out, "--no-progress"]) == 0
    assert "verify" not in capsys.readouterr().err


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


def test_tokenize_takes_a_registered_tokenizer_version(tmp_path, capsys):
    from mvar import tracking
    from mvar.checkpoint import save_tokenizer, tokenizer_fingerprint
    from mvar.data.synth import write_synth
    from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
    cfg = TokenizerConfig.tiny()
    tok = save_tokenizer(tmp_path / "tok", MultiScaleVQVAE(cfg), cfg)
    write_synth(str(tmp_path / "images"), num_images=4, image_size=64, num_classes=2, seed=0, shard_size=4)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = tracking.Store(uri)
    run_id = store.create_run("t", "tokenizer")
    store.set_alias("tokenizer-vae-tiny", "final", store.register_model("tokenizer-vae-tiny", run_id, str(tok)))
    out = str(tmp_path / "tokens")
    capsys.readouterr()
    assert main(["data", "tokenize", "--tokenizer", "models:/tokenizer-vae-tiny@final", "--tracking-uri", uri,
                 "--src", str(tmp_path / "images"), "--out", out, "--no-progress"]) == 0
    assert f"models:/tokenizer-vae-tiny@final: {tok}" in capsys.readouterr().out
    assert read_manifest(out).tokens["tokenizer_sha256"] == tokenizer_fingerprint(tok)
