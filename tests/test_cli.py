"""The `mvar` commands of the model core, end to end on the authors' tiny weights."""
import argparse
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

from mvar.checkpoint import load_checkpoint, read_checkpoint_meta, tokenizer_fingerprint
from mvar.cli import build_parser, main
from mvar.sampling import make_generator, sample_images


@pytest.fixture(scope="module")
def imported(ref_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ck") / "tiny"
    rc = main(["import-var", "--vae", str(ref_dir / "vqvae_state_dict.pt"), "--var", str(ref_dir / "var_state_dict.pt"),
               "--out", str(out), "--attention", "mvar", "--window-size", "3", "--markov-from-scale", "2"])
    assert rc == 0
    return out


def test_import_var_then_load_reproduces_the_reference_samples(imported, ref_expected):
    meta = read_checkpoint_meta(imported)
    assert meta["model"]["depth"] == 2 and meta["model"]["attention"] == "mvar"
    assert meta["tokenizer_sha256"] == tokenizer_fingerprint(imported)
    for attention in ("var", "mvar"):
        model, tok, cfg, tok_cfg = load_checkpoint(imported, overrides={"attention": attention})
        assert tok_cfg.patch_nums == (1, 2, 3, 4) and tok_cfg.image_size == 64
        imgs = sample_images(model, tok, ref_expected["inputs.labels"], cfg=1.5, top_k=1, top_p=0.0,
                             generator=make_generator(0, torch.device("cpu")))
        assert (imgs - ref_expected[f"{attention}.greedy_samples"]).abs().max() < 1e-3


def test_sample_writes_a_reproducible_grid(imported, tmp_path):
    args = ["sample", "--checkpoint", str(imported), "--classes", "1,2,3", "--cfg", "1.5", "--top-k", "900",
            "--top-p", "0.96", "--seed", "0"]
    assert main(args + ["--out", str(tmp_path / "a.png")]) == 0
    assert main(args + ["--out", str(tmp_path / "b.png")]) == 0
    assert main(args[:-1] + ["1", "--out", str(tmp_path / "c.png")]) == 0
    a, b, c = (Image.open(tmp_path / f"{n}.png") for n in "abc")
    assert a.size == (3 * 64 + 4 * 2, 64 + 2 * 2)
    assert a.tobytes() == b.tobytes() and a.tobytes() != c.tobytes()


def test_sample_and_eval_take_a_registered_model(imported, tmp_path, capsys):
    from mvar.tracking import Store
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    store = Store(uri)
    store.set_alias("mvar-tiny", "best", store.register_model("mvar-tiny", store.create_run("t", "train"), str(imported)))
    args = ["--classes", "1,2", "--seed", "0"]
    assert main(["sample", "--checkpoint", str(imported), *args, "--out", str(tmp_path / "a.png")]) == 0
    for model in ("models:/mvar-tiny@best", "models:/mvar-tiny/1"):
        assert main(["sample", "--model", model, "--tracking-uri", uri, *args, "--out", str(tmp_path / "b.png")]) == 0
        assert Image.open(tmp_path / "a.png").tobytes() == Image.open(tmp_path / "b.png").tobytes()
    assert main(["eval", "--model", "models:/mvar-tiny@best", "--tracking-uri", uri, "--no-metrics", "--check"]) == 0
    assert f"OK: checkpoint {imported}" in capsys.readouterr().out
    for cmd in (["sample", "--out", str(tmp_path / "c.png")], ["eval", "--no-metrics", "--check"]):
        assert main([*cmd, "--model", "models:/mvar-tiny@nope", "--tracking-uri", uri]) == 2
        err = capsys.readouterr().err
        assert "'models:/mvar-tiny@nope' is not a registered model version" in err and "mvar-tiny" in err


def test_sample_defaults_come_from_the_checkpoint_and_flags_win(imported, tmp_path, capsys):
    import shutil

    import yaml
    own = tmp_path / "own"
    shutil.copytree(imported, own)
    meta = yaml.safe_load((own / "checkpoint.yaml").read_text())
    (own / "checkpoint.yaml").write_text(yaml.safe_dump({**meta, "sampling": {"cfg": 0.5, "top_k": 3, "top_p": 0.5}}))
    args = ["sample", "--checkpoint", str(own), "--classes", "1", "--out", str(tmp_path / "a.png")]
    assert main(args) == 0
    assert "cfg 0.5, top-k 3, top-p 0.5," in capsys.readouterr().out
    assert main(args + ["--cfg", "1.5"]) == 0
    assert "cfg 1.5, top-k 3, top-p 0.5," in capsys.readouterr().out
    assert main(["sample", "--checkpoint", str(imported), "--classes", "1", "--out", str(tmp_path / "b.png")]) == 0
    assert "cfg 1.5, top-k 900, top-p 0.96," in capsys.readouterr().out  # imported weights: VAR's FID setting


def test_bad_input_is_one_clear_line(imported, ref_dir, tmp_path, capsys):
    assert main(["sample", "--checkpoint", str(imported), "--classes", "1,99", "--out", str(tmp_path / "x.png")]) == 2
    assert "ids [99] are outside [0, 9]" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a model checkpoint" in capsys.readouterr().err
    vae = str(ref_dir / "vqvae_state_dict.pt")
    assert main(["import-var", "--vae", vae, "--var", str(tmp_path / "none.pth"), "--out", str(tmp_path / "o")]) == 2
    assert "none.pth' does not exist" in capsys.readouterr().err
    truncated = tmp_path / "cut.pth"
    truncated.write_bytes((ref_dir / "var_state_dict.pt").read_bytes()[:1000])
    assert main(["import-var", "--vae", vae, "--var", str(truncated), "--out", str(tmp_path / "o")]) == 2
    assert "cannot read weights file" in capsys.readouterr().err
    assert main(["import-var", "--vae", vae, "--var", str(ref_dir / "var_state_dict.pt"), "--out", str(imported)]) == 2
    assert "exists already" in capsys.readouterr().err
    assert not list(tmp_path.glob(".o.partial-*"))  # nothing half-written left behind


def test_bench_tiny_all_variants(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "mvar.cli", "bench", "--size", "tiny", "--resolution", "64",
                           "--batch", "2", "--repeats", "1", "--json", str(out), "--plot", str(tmp_path / "s.png")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "| variant" in proc.stdout and "VmHWM" in proc.stdout
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"var", "scale_markov", "mvar"}
    assert results["var"]["kv_cache_mb"] > 0 and results["mvar"]["kv_cache_mb"] == 0
    assert results["var"]["attn_gflops"] > results["scale_markov"]["attn_gflops"] > results["mvar"]["attn_gflops"]
    assert set(results["var"]["train_steps"]) == {"full"}
    assert set(results["mvar"]["train_steps"]) == {"cycle_small", "cycle_s2", "cycle_s3", "packed"}  # mvar-tiny: 8 x (0, 1), (2,), (3,)
    for r in results.values():
        assert r["infer_latency_s"] > 0 and r["train_step_s"] > 0 and r["infer_peak_mb"] >= 0
    assert results["var"]["train_pyramid_s"] == results["var"]["train_steps"]["full"]["step_s"]
    kinds = results["mvar"]["train_steps"]  # a pyramid: one small-scales step plus one per windowed scale
    assert results["mvar"]["train_pyramid_s"] == pytest.approx(sum(kinds[k]["step_s"] for k in
                                                                   ("cycle_small", "cycle_s2", "cycle_s3")))
    assert results["mvar"]["train_pyramid_s"] > results["mvar"]["train_step_s"]
    assert "train s/pyramid" in proc.stdout and all(r["train_tokens_per_s"] > 0 for r in results.values())
    assert (tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"


def test_bench_resolutions_and_batches_pair_up_or_fail_before_measuring(capsys):
    assert main(["bench", "--resolution", "256,512", "--batch", "8,2,1"]) == 2
    assert "--batch: 3 values for 2 resolutions" in capsys.readouterr().err
    assert main(["bench", "--resolution", "256,x"]) == 2
    assert "--resolution: expected integers" in capsys.readouterr().err


def test_unknown_variant_fails_before_measuring(capsys):
    assert main(["bench", "--variants", "var,foo"]) == 2
    assert "unknown ['foo']" in capsys.readouterr().err


def test_each_benchmark_entry_point_is_a_bench_subcommand_with_the_same_flags():
    subs = {path.split()[-1]: p for path, p in walk(build_parser(), "mvar") if path.startswith("mvar bench ")}
    modules = entry_parsers()
    pairs = {"window": "tools.bench_window", "compare-authors": "tools.compare_authors", "gpu": "workflows.bench_gpu",
             "train": "workflows.bench_train", "data": "mvar.data.bench", "profile": "tools.profile_generate"}
    assert set(subs) == set(pairs)

    def flags(parser):
        return {(a.dest, repr(a.default)) for a in parser._actions if a.option_strings and a.help != argparse.SUPPRESS}
    for sub, module in pairs.items():
        assert flags(subs[sub]) == flags(modules[module]) and len(flags(subs[sub])) > 1, sub


def test_benchmark_and_quickstart_bad_input_is_one_line_exit_2(capsys):
    from tools import bench_window
    from workflows import bench_gpu, quickstart
    cases = [(lambda: main(["bench", "window", "--sides", "13,x"]), "mvar bench: error: --sides: expected integers"),
             (lambda: bench_window.main(["--sides", "0"]), "tools.bench_window: error: --sides: expected positive"),
             (lambda: bench_gpu.main(["--variants", "var,foo", "--device", "cpu"]),
              "workflows.bench_gpu: error: --variants: unknown ['foo']"),
             (lambda: quickstart.main(["--workers", "0"]), "workflows.quickstart: error: --workers: must be at least 1"),
             (lambda: quickstart.main(["--seeds", "0"]), "workflows.quickstart: error: --seeds: must be at least 1")]
    for call, line in cases:
        assert call() == 2
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, err


def test_checkpoint_of_another_architecture_is_refused(imported, tmp_path, capsys):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(imported, other)
    sd = torch.load(other / "model.pt", weights_only=True)
    sd["head.weight"] = torch.zeros(33, 64)
    torch.save(sd, other / "model.pt")
    assert main(["sample", "--checkpoint", str(other), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "model.pt' does not fit this NextScaleTransformer" in err and "'head.weight' has shape (33, 64)" in err
    assert main(["bench", "--size", "d17"]) == 2
    assert "--size: unknown 'd17'" in capsys.readouterr().err


# -- the command surface --------------------------------------------------------------------

def entry_parsers() -> dict[str, argparse.ArgumentParser]:
    """`mvar` and the parsers of the module entry points (`python -m workflows.train` ...)."""
    from mvar.commands import evaluate, standalone, sweep, train
    from mvar.data import bench as data_bench
    from tools import bench_window, compare_authors, profile_generate
    from workflows import bench_gpu, bench_train, quickstart
    return {"mvar": build_parser(),
            "workflows.train": standalone("workflows.train", "", train.configure_train),
            "workflows.train_tokenizer": standalone("workflows.train_tokenizer", "", train.configure_train_tokenizer),
            "workflows.evaluate": standalone("workflows.evaluate", "", evaluate.configure),
            "sweeps.run": standalone("sweeps.run", "", sweep.configure),
            "workflows.quickstart": standalone("workflows.quickstart", "", quickstart.configure),
            **{name: standalone(name, "", module.configure) for name, module in (
                ("workflows.bench_train", bench_train), ("workflows.bench_gpu", bench_gpu),
                ("tools.compare_authors", compare_authors), ("tools.bench_window", bench_window),
                ("tools.profile_generate", profile_generate),
                ("mvar.data.bench", data_bench))}}


def walk(parser, path: str):
    """(path, parser) of ``parser`` and every sub-command below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in dict.items(action._name_parser_map):
                yield from walk(sub, f"{path} {name}")


def test_every_flag_and_argument_of_every_command_has_help():
    missing, seen = [], 0
    for name, top in entry_parsers().items():
        for path, parser in walk(top, name):
            for action in parser._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                seen += 1
                if not (action.help or "").strip():
                    missing.append(f"{path} {'/'.join(action.option_strings) or action.dest}")
    assert seen > 150 and not missing, "without help text:\n" + "\n".join(missing)


def test_help_shows_defaults_and_every_config_command_has_check_and_print_config():
    parsers = {path: p for name, top in entry_parsers().items() for path, p in walk(top, name)}
    text = parsers["mvar sample"].format_help()
    assert "images per class id (default: 1)" in " ".join(text.split())
    assert "(default: None)" not in text and "(default: False)" not in text
    for path in ("mvar train", "mvar train-tokenizer", "mvar eval", "mvar sweep", "workflows.train",
                 "workflows.train_tokenizer", "workflows.evaluate", "sweeps.run"):
        flags = {s for a in parsers[path]._actions for s in a.option_strings}
        assert {"--check", "--print-config"} <= flags, path


def test_a_command_module_that_fails_to_import_is_an_error_not_a_missing_command(monkeypatch):
    import importlib

    import mvar
    import mvar.cli
    monkeypatch.delattr(mvar, "stack")
    monkeypatch.setitem(sys.modules, "mvar.stack", None)  # as if importing it raised
    try:
        with pytest.raises(ImportError, match="mvar.stack"):
            importlib.reload(mvar.cli)
    finally:
        monkeypatch.undo()
        importlib.reload(mvar.cli)


def test_eval_takes_overrides_positionally_and_flags_as_shorthands_of_keys(tmp_path, capsys):
    import yaml
    base = ["eval", "--checkpoint", str(tmp_path), "--no-metrics", "--print-config"]
    assert main(base + ["eval.seed=3", "--num-workers", "0", "eval.classes=[1,2]", "--seed", "2"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["eval"]["seed"], cfg["eval"]["num_workers"], cfg["eval"]["classes"]) == (3, 0, [1, 2])  # key wins
    assert cfg["checkpoint"] == str(tmp_path) and cfg["eval"]["metrics"] is False
    assert main(base + ["--set", "eval.seed=4"]) == 0  # the deprecated spelling still works
    assert yaml.safe_load(capsys.readouterr().out)["eval"]["seed"] == 4
    assert main(base + ["eval.sed=1"]) == 2
    assert "unknown config key 'eval.sed'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "make-reff", "--out", "x.npz"])  # neither a helper command nor an override
    assert "invalid choice: 'make-reff'" in capsys.readouterr().err


def test_mvar_train_and_the_workflow_module_are_one_command(capsys):
    from workflows.train import main as workflow_main
    argv = ["--config", "workflows/configs/mvar_tiny_local.yaml", "run.steps=7", "--print-config", "model.depth=3"]
    assert main(["train", *argv]) == 0
    ours = capsys.readouterr().out
    assert workflow_main(argv) == 0
    assert capsys.readouterr().out == ours and "steps: 7" in ours and "depth: 3" in ours
    assert main(["train", "--config", "workflows/configs/mvar_tiny_local.yaml", "run.stepz=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mvar train: error: unknown config key 'run.stepz'; allowed under")
