"""Every file the project reads, corrupted: the real command exits 2 with one line naming the file.

Each case makes a small valid set of inputs (a tiny checkpoint, image and token shards, a stack state
file ...), damages one file the way a crash, a full disk or a hand edit does (cut in half, garbage
bytes, an edited value) and runs the command that reads it through its entry point's ``main``.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mvar.checkpoint import load_train_state, save_checkpoint
from mvar.cli import main as mvar_main
from mvar.data.synth import write_synth
from mvar.data.tokens import tokenize
from mvar.errors import UserError
from mvar.metrics.fidelity import Reference, save_reference
from mvar.models import NextScaleTransformer, named_model
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from sweeps.run import main as sweep_main
from workflows.train import main as train_main

GARBAGE = b"\x00\xff\xfe garbage \x89PNG {[: \n" * 8


@dataclass
class Inputs:
    root: Path
    checkpoint: Path   # a tiny MVAR model checkpoint (random weights)
    images: Path       # 8 synthetic 64 px images, one shard
    tokens: Path       # their token shards
    weights: Path      # a torch file that passes the Inception weights check (never loaded here)
    reference: Path    # a `mvar eval make-ref`-format file with random statistics


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Inputs:
    root = tmp_path_factory.mktemp("files")
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.tiny()
    model = NextScaleTransformer(named_model("mvar-tiny"), tok_cfg.vocab_size, tok_cfg.z_channels, tok_cfg.patch_nums)
    save_checkpoint(root / "ckpt", model, MultiScaleVQVAE(tok_cfg), tok_cfg)
    write_synth(str(root / "images"), num_images=8, image_size=64, num_classes=10, seed=0, shard_size=8)
    tokenize(str(root / "ckpt"), str(root / "images"), str(root / "tokens"), progress=False)
    torch.save({"w": torch.zeros(1)}, root / "weights.pt")
    rng = np.random.default_rng(0)
    save_reference(root / "ref.npz", Reference(mu=rng.normal(size=4), sigma=np.eye(4),
                                               features=torch.zeros(20, 4), image_size=64, weights_sha256="0" * 64,
                                               source="test"))
    return Inputs(root, root / "ckpt", root / "images", root / "tokens", root / "weights.pt", root / "ref.npz")


def fresh(inputs: Inputs, tmp_path: Path, name: str) -> Path:
    """A private copy of one of the inputs, to damage."""
    return Path(shutil.copytree(getattr(inputs, name), tmp_path / name))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: max(1, path.stat().st_size // 2)])


def garbage(path: Path) -> None:
    path.write_bytes(GARBAGE)


def edit_yaml(key: str, value):
    def edit(path: Path) -> None:
        data = yaml.safe_load(path.read_text())
        data[key] = value
        path.write_text(yaml.safe_dump(data))
    return edit


def train_config(tmp_path: Path) -> Path:
    path = tmp_path / "train.yaml"
    shutil.copy("workflows/configs/mvar_tiny_local.yaml", path)
    return path


# (case id, what to damage: a function of (inputs, tmp_path) -> (file, argv builder)), how, the command
def sample_cmd(ckpt: Path, tmp_path: Path) -> tuple:
    return mvar_main, "mvar sample", ["sample", "--checkpoint", str(ckpt), "--classes", "1", "--out",
                                      str(tmp_path / "grid.png")]


def case_checkpoint_file(inputs, tmp_path, name):
    ckpt = fresh(inputs, tmp_path, "checkpoint")
    return ckpt / name, sample_cmd(ckpt, tmp_path)


def case_config(inputs, tmp_path):
    path = train_config(tmp_path)
    return path, (train_main, "workflows.train", ["--config", str(path)])


def case_eval_config(inputs, tmp_path):
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump({"eval": {"num_per_class": 1}}))
    return path, (mvar_main, "mvar eval", ["eval", "--config", str(path), "--checkpoint", str(inputs.checkpoint)])


def case_study(inputs, tmp_path):
    path = tmp_path / "study.yaml"
    shutil.copy("sweeps/k_depth_tiny.yaml", path)
    return path, (sweep_main, "sweeps.run", [str(path), "--check"])


def case_manifest(inputs, tmp_path, name):
    shards = fresh(inputs, tmp_path, name)
    argv = ["--config", str(train_config(tmp_path)), f"tokenizer={inputs.checkpoint}", f"data.shards={shards}",
            f"run.storage_path={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    return shards / "manifest.json", (train_main, "workflows.train", argv)


def case_verify_manifest(inputs, tmp_path):
    shards = fresh(inputs, tmp_path, "images")
    return shards / "manifest.json", (mvar_main, "mvar data", ["data", "verify", str(shards)])


def synth_argv(out: Path) -> list[str]:
    return ["data", "synth", "--out", str(out), "--num-images", "8", "--image-size", "64", "--num-classes", "10",
            "--shard-size", "8"]


def case_data_state(inputs, tmp_path, name):
    shards = fresh(inputs, tmp_path, "images")
    return shards / ".mvar-data" / name, (mvar_main, "mvar data", synth_argv(shards))


def case_stack_state(inputs, tmp_path):
    d = tmp_path / "stack"
    d.mkdir()
    (d / "stack.json").write_text(json.dumps({"dir": str(d), "mlflow_port": 5999}))
    return d / "stack.json", (mvar_main, "mvar stack", ["stack", "status", "--dir", str(d)])


def eval_argv(inputs, reference: Path, weights: Path, tmp_path: Path) -> list[str]:
    return ["eval", "--checkpoint", str(inputs.checkpoint), "--reference", str(reference),
            "--feature-extractor-weights", str(weights), "--no-tracking", "--num-workers", "0",
            "--out", str(tmp_path / "eval")]


def case_reference(inputs, tmp_path):
    ref = Path(shutil.copy(inputs.reference, tmp_path / "ref.npz"))
    return ref, (mvar_main, "mvar eval", eval_argv(inputs, ref, inputs.weights, tmp_path))


def case_inception_weights(inputs, tmp_path):
    weights = Path(shutil.copy(inputs.weights, tmp_path / "weights.pt"))
    return weights, (mvar_main, "mvar eval", eval_argv(inputs, inputs.reference, weights, tmp_path))


CASES = {
    "checkpoint.yaml": lambda i, t: case_checkpoint_file(i, t, "checkpoint.yaml"),
    "model.pt": lambda i, t: case_checkpoint_file(i, t, "model.pt"),
    "tokenizer.yaml": lambda i, t: case_checkpoint_file(i, t, "tokenizer/tokenizer.yaml"),
    "tokenizer.pt": lambda i, t: case_checkpoint_file(i, t, "tokenizer/tokenizer.pt"),
    "train config": case_config,
    "eval config": case_eval_config,
    "study file": case_study,
    "token shard manifest": lambda i, t: case_manifest(i, t, "tokens"),
    "image shard manifest": case_verify_manifest,
    "data job plan": lambda i, t: case_data_state(i, t, "plan.json"),
    "data shard record": lambda i, t: case_data_state(i, t, "shard-000000.tar.json"),
    "stack state": case_stack_state,
    "eval reference": case_reference,
    "inception weights": case_inception_weights,
}
DAMAGE = {"truncated": truncate, "garbage": garbage}
# a config cut in half may still parse: then the key checks speak, naming the key that is now wrong
CONFIG_CASES = ("train config", "eval config", "study file")


@pytest.mark.parametrize("damage", sorted(DAMAGE))
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_damaged_file_is_one_line_naming_it_and_exit_2(inputs, tmp_path, capsys, case, damage):
    path, (main, prog, argv) = CASES[case](inputs, tmp_path)
    assert path.is_file(), f"the case must damage a file that exists: {path}"
    DAMAGE[damage](path)
    line = assert_one_line_error(main, prog, argv, capsys)
    if not (case in CONFIG_CASES and damage == "truncated" and "config key '" in line):
        assert str(path) in line, line


def assert_one_line_error(main, prog, argv, capsys, *words) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("case,key,value", [
    ("checkpoint.yaml", "model", "not a mapping"),
    ("checkpoint.yaml", "format", "mvar-checkpoint/0"),
    ("tokenizer.yaml", "config", {"vocab_size": "many"}),
    ("tokenizer.yaml", "format", None),
])
def test_an_edited_checkpoint_record_is_one_line_naming_it(inputs, tmp_path, capsys, case, key, value):
    path, (main, prog, argv) = CASES[case](inputs, tmp_path)
    edit_yaml(key, value)(path)
    assert_one_line_error(main, prog, argv, capsys, str(path))


@pytest.mark.parametrize("edit", ["num_samples", "shard count", "tokens section"])
def test_an_edited_token_manifest_is_one_line_naming_it(inputs, tmp_path, capsys, edit):
    path, (main, prog, argv) = CASES["token shard manifest"](inputs, tmp_path)
    data = json.loads(path.read_text())
    if edit == "num_samples":
        data["num_samples"] = "many"
    elif edit == "shard count":
        data["shards"][0]["num_samples"] = [8]
    else:
        del data["tokens"]["patch_nums"]
    path.write_text(json.dumps(data))
    assert_one_line_error(main, prog, argv, capsys, str(path))


def test_an_edited_tokenizer_sha256_is_refused_with_both_digests(inputs, tmp_path, capsys):
    path, (main, prog, argv) = CASES["tokenizer.yaml"](inputs, tmp_path)
    recorded = yaml.safe_load(path.read_text())["sha256"]
    edit_yaml("sha256", "0" * 64)(path)
    line = assert_one_line_error(main, prog, argv, capsys, str(path), "0" * 64, recorded)
    assert "tokenizer.pt" in line
    # the data and training commands check it too (both fingerprint the tokenizer)
    argv = ["data", "tokenize", "--tokenizer", str(path.parent), "--src", str(inputs.images),
            "--out", str(tmp_path / "t"), "--no-progress"]
    assert_one_line_error(mvar_main, "mvar data", argv, capsys, str(path), recorded)


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_train_state_is_a_user_error_naming_it(tmp_path, damage):
    path = tmp_path / "train_state.pt"
    torch.save({"optimizer": {}, "scheduler": {}, "step": 3}, path)
    assert load_train_state(path)["step"] == 3
    DAMAGE[damage](path)
    with pytest.raises(UserError, match=str(path)):
        load_train_state(path)
    torch.save({"step": 3}, path)
    with pytest.raises(UserError, match="lacks optimizer, scheduler"):
        load_train_state(path)
