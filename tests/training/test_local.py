"""`mvar train --local`: the run in one process without Ray (mvar.training.local), tracked in a real MLflow
store; its checkpoints resume on Ray Train, and Ray Train's resume locally, to the same weights."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mvar import tracking
from mvar.checkpoint import load_state_dict, read_checkpoint_meta
from mvar.training import load_train_config
from mvar.training import run_dir as rundir
from mvar.training.launch import TrainingFailed, group_key_of, train

ROOT = Path(__file__).resolve().parents[2]
MVAR = "workflows/configs/mvar_tiny_local.yaml"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One intra-op thread, as a Ray worker of 0.5 CPU has (OMP_NUM_THREADS=1): a 2-core machine that other
    jobs share, and the same reduction order in both backends."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key))


def run_of(inputs, name: str) -> str:
    storage = str((inputs.root / "runs").resolve())
    run_id = tracking.Store(inputs.tracking_uri).find_run("tests", {"mvar.run_key": f"{storage}/{name}"})
    assert run_id, name
    return run_id


NO_RAY = """
import json, os, sys
os.environ["OMP_NUM_THREADS"] = "1"
from mvar.cli import main
rc = main(sys.argv[1:])
print(json.dumps({"rc": rc, "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


LOAD_PYFUNC = """
import json, sys
import mlflow.pyfunc
images = mlflow.pyfunc.load_model("models:/mvar-tiny@final").predict({"class_id": [0, 9, 9], "seed": 1})
print(json.dumps({"shape": list(images.shape), "dtype": str(images.dtype),
                  "ray": sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))}))
"""


def test_a_local_run_trains_tracks_checkpoints_and_resumes_without_ray(tiny_inputs):
    """`mvar train --local` in a fresh process: no Ray module imported; one MLflow run with the params, tags and
    metrics of a Ray Train run, FINISHED; checkpoints and Ray Train's record of them in run.storage_path/run.name
    (run.keep_checkpoints kept). Then a longer run of the same name resumes it into the same MLflow run."""
    name = "local-fit"
    argv = ["train", "--local", "--config", MVAR, *tiny_inputs.overrides(name, **{
        "run.steps": 6, "run.checkpoint_every": 2, "run.log_every": 1, "train.sample_images": 2,
        "data.eval_shards": tiny_inputs.eval_tokens})]
    done = subprocess.run([sys.executable, "-c", NO_RAY, *argv], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "ray": []}, done.stdout[-2000:]
    assert "scaling.num_workers 2 is taken as 1" in done.stdout and "local run: one process on cpu" in done.stdout

    uri, run_id = tiny_inputs.tracking_uri, run_of(tiny_inputs, name)
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    tags, params = run.data.tags, run.data.params
    assert (tags["mvar.backend"], tags["mvar.variant"], tags["mvar.model"], tags["mvar.seed"]) == (
        "local", "mvar", "mvar-tiny", "0")
    cfg = load_train_config(MVAR, tiny_inputs.overrides(name, **{
        "run.steps": 6, "run.checkpoint_every": 2, "run.log_every": 1, "train.sample_images": 2,
        "data.eval_shards": tiny_inputs.eval_tokens, "scaling.num_workers": 1}))
    assert tags["mvar.group"] == group_key_of(cfg)
    assert params["run.steps"] == "6" and params["scaling.num_workers"] == "1"
    assert [s for s, _ in history(uri, run_id, "train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [s for s, _ in history(uri, run_id, "val/loss")] == [2, 4, 6]
    for key in ("train/acc", "train/lr", "perf/step_s", "model/params_m", "model/attn_gflops", "train/epoch"):
        assert key in run.data.metrics, key
    assert "config.yaml" in {a.path for a in tracking.client(uri).list_artifacts(run_id)}
    images = [a.path for a in tracking.client(uri).list_artifacts(run_id, "images")]
    assert len([p for p in images if p.startswith("images/samples+") and p.endswith(".png")]) == 3, images

    run_dir = Path(tags["mvar.checkpoint"]).parent
    assert Path(tags["mvar.checkpoint"]).name == "step_00000006"
    assert run_dir == (tiny_inputs.root / "runs" / name).resolve()
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]
    reg = rundir.registered(run_dir)
    assert (reg.names, reg.latest) == (["step_00000004", "step_00000006"], "step_00000006")
    assert reg.metrics["step_00000006"]["step"] == 6 and "val/loss" in reg.metrics["step_00000006"]
    meta = read_checkpoint_meta(tags["mvar.checkpoint"])
    assert meta["train"]["step"] == 6 and meta["train"]["mlflow_run_id"] == run_id
    store = tracking.Store(uri)
    assert store.resolve_model("models:/mvar-tiny@final") == tags["mvar.checkpoint"]
    # the registered version loads with MLflow's own loader, in a process that imports no Ray, and samples
    loaded = subprocess.run([sys.executable, "-c", LOAD_PYFUNC], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "MLFLOW_TRACKING_URI": uri})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert json.loads(loaded.stdout.strip().splitlines()[-1]) == {"shape": [3, 64, 64, 3], "dtype": "uint8",
                                                                  "ray": []}, loaded.stdout[-2000:]

    longer = train(load_train_config(MVAR, tiny_inputs.overrides(name, **{
        "run.steps": 8, "run.checkpoint_every": 2, "run.log_every": 1, "train.sample_images": 0,
        "data.eval_shards": tiny_inputs.eval_tokens, "tracking.register_pyfunc": "false"})), local=True)
    assert (longer.run_id, longer.step) == (run_id, 8)
    final = store.model_version("models:/mvar-tiny@final")  # registered without a pyfunc: it names the checkpoint
    assert final["source"] == final["mvar.checkpoint"] == longer.checkpoint
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mvar.resumes"] == "1"
    assert [s for s, _ in history(uri, run_id, "train/loss")] == list(range(1, 9))  # steps 7, 8 added, none twice
    assert rundir.registered(run_dir).names == ["step_00000006", "step_00000008"]


def test_bad_input_to_a_local_run_is_one_line_naming_the_key(tiny_inputs, capsys):
    from mvar.cli import main
    base = ["train", "--local", "--config", MVAR]
    assert main([*base, *tiny_inputs.overrides("bad", **{"run.storage_path": "s3://bucket/runs"})]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "mvar train: error: run.storage_path: a local run writes its checkpoints to a local (or shared) path, got "
        "'s3://bucket/runs'; train on Ray for an object store"]
    if not torch.cuda.is_available():
        assert main([*base, *tiny_inputs.overrides("bad", **{"scaling.use_gpu": "true"})]) == 2
        assert "scaling.use_gpu: true, but this machine has no CUDA device" in capsys.readouterr().err


def weights(checkpoint: str) -> dict[str, torch.Tensor]:
    return load_state_dict(Path(checkpoint) / "model.pt")


def assert_same_weights(a: str, b: str) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    worst = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)
    assert worst <= 1e-6, f"{a} and {b} differ by up to {worst:g}"


@pytest.mark.slow
def test_local_and_ray_train_resume_each_other_to_the_weights_of_an_uninterrupted_run(tiny_inputs, local_ray):
    """8 steps on Ray Train (1 worker) against: 4 steps locally (a NaN loss stops the run at step 5, after the
    checkpoint of step 4), resumed on Ray Train to 8; and 4 steps on Ray Train, resumed locally to 8."""
    def cfg(name: str, **extra):
        return load_train_config(MVAR, tiny_inputs.overrides(name, **{
            "run.steps": 8, "run.checkpoint_every": 4, "run.log_every": 2, "scaling.num_workers": 1,
            "train.sample_images": 0, **extra}))

    straight = train(cfg("straight"))
    assert straight.step == 8

    with pytest.raises(TrainingFailed, match="stopped at step 5"):
        train(cfg("local-then-ray", **{"run.fault_nan_at_step": 5}), local=True)
    resumed = train(cfg("local-then-ray"))
    assert resumed.step == 8 and resumed.run_id == run_of(tiny_inputs, "local-then-ray")
    assert_same_weights(resumed.checkpoint, straight.checkpoint)
    uri = tiny_inputs.tracking_uri
    run = tracking.client(uri).get_run(resumed.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags["mvar.backend"], run.data.tags["mvar.resumes"]) == ("ray", "1")
    assert [s for s, _ in history(uri, resumed.run_id, "train/loss")] == [2, 4, 6, 8]

    with pytest.raises(TrainingFailed, match="stopped at step 5"):
        train(cfg("ray-then-local", **{"run.fault_nan_at_step": 5}))
    back = train(cfg("ray-then-local"), local=True)
    assert back.step == 8 and back.run_id == run_of(tiny_inputs, "ray-then-local")
    assert_same_weights(back.checkpoint, straight.checkpoint)
    assert tracking.client(uri).get_run(back.run_id).data.tags["mvar.backend"] == "local"


def test_train_tokenizer_local_writes_the_tokenizer_and_tags_its_run(tiny_inputs, capsys):
    from mvar.checkpoint import load_tokenizer, tokenizer_fingerprint
    from mvar.cli import main
    out = tiny_inputs.root / "tok-local-out"
    argv = ["train-tokenizer", "--local", "--config", "workflows/configs/tokenizer_tiny_local.yaml",
            *tiny_inputs.overrides("tok-local", **{"data.shards": tiny_inputs.images, "output": out, "run.steps": 2,
                                                   "run.checkpoint_every": 2, "run.log_every": 1,
                                                   "data.batch_size": 4})]
    argv.remove(f"tokenizer={tiny_inputs.tokenizer}")  # the generator's key
    assert main(argv) == 0
    assert f"tokenizer: {out}" in capsys.readouterr().out
    run = tracking.client(tiny_inputs.tracking_uri).get_run(run_of(tiny_inputs, "tok-local"))
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert (tags["mvar.task"], tags["mvar.backend"], tags["mvar.tokenizer"]) == ("tokenizer", "local", str(out))
    assert tags["mvar.tokenizer_sha256"] == tokenizer_fingerprint(out)
    assert Path(tags["mvar.checkpoint"]).name == "step_00000002"
    load_tokenizer(out)
