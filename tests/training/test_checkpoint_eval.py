"""Each checkpoint of a training run evaluated while it trains (`checkpoint_eval.*`,
mvar.training.checkpoint_eval): eval/fid, eval/class_acc ... in the training run at each checkpoint's step,
once, in a local run; a run killed mid-evaluation evaluates that checkpoint when it resumes;
models:/NAME@best follows eval/fid when asked; bad input named before anything starts. On Ray Train
(beside the training: Ray Train's checkpoint validation) the tiny VAR run of tests/training/test_train.py
has it too (a Ray Train start of its own would cost ~40 s); the MLflow UI's eval/fid chart of such a run:
tests/ui/test_mlflow_ui.py. Real parts: the tiny generator trained on the synthetic set, the classifier
feature extractor, torch-fidelity, a SQLite MLflow store."""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mvar import tracking
from mvar.config import ConfigError
from mvar.training import load_train_config
from mvar.training import run_dir as rundir

ROOT = Path(__file__).resolve().parents[2]
VAR = "workflows/configs/var_tiny_local.yaml"
QUALITY = ("eval/fid", "eval/kid", "eval/precision", "eval/recall", "eval/is", "eval/class_acc")


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key))


def run_of(inputs, uri: str, name: str) -> str:
    storage = str((inputs.root / "runs").resolve())
    run_id = tracking.Store(uri).find_run("tests", {"mvar.run_key": f"{storage}/{name}"})
    assert run_id, name
    return run_id


def own_store(tmp_path) -> str:
    """A store of the test's own: models:/var-tiny@best is the registry's, shared by every run in a store."""
    return f"sqlite:///{tmp_path}/mlflow.db"


def assert_evaluated_once_at(uri: str, run_id: str, steps: list[int]) -> dict[int, float]:
    """Each quality metric holds one finite value per checkpoint step, no other; returns eval/fid by step."""
    for key in QUALITY:
        values = history(uri, run_id, key)
        assert [s for s, _ in values] == steps, (key, values)
        assert all(math.isfinite(v) for _, v in values), (key, values)
    return dict(history(uri, run_id, "eval/fid"))


def test_best_by_an_evaluation_metric_needs_the_evaluation_and_a_known_name():
    with pytest.raises(ConfigError, match=r"'checkpoint_eval.best_by': 'eval/fid' is logged by the checkpoints' "
                                          r"evaluation: set checkpoint_eval.every_checkpoint=true"):
        load_train_config(VAR, ["checkpoint_eval.best_by=eval/fid"])
    with pytest.raises(ConfigError, match=r"'checkpoint_eval.best_by': must be '' \(val/loss\) or one of val/loss, "
                                          r"eval/fid.*got 'eval/fidd'"):
        load_train_config(VAR, ["checkpoint_eval.best_by=eval/fidd"])
    with pytest.raises(ConfigError, match=r"'checkpoint_eval.cfg': a checkpoint is evaluated at one setting"):
        load_train_config(VAR, ["checkpoint_eval.every_checkpoint=true", "checkpoint_eval.reference=x",
                                "checkpoint_eval.cfg=[1.0,2.0]"])


def test_a_missing_reference_or_classifier_is_one_line_naming_the_key_before_training(tiny_inputs, tiny_classifier,
                                                                                      checkpoint_eval_keys, capsys):
    from mvar.cli import main
    base = ["train", "--local", "--config", VAR]
    missing = tiny_inputs.root / "no-such-images"
    keys = checkpoint_eval_keys(tiny_inputs, tiny_classifier, **{"checkpoint_eval.reference": missing})
    assert main([*base, *tiny_inputs.overrides("bad-ref", **keys)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        f"mvar train: error: checkpoint_eval.reference: shard directory '{missing}' does not exist"), err
    gone = tiny_inputs.root / "no-such-classifier.pt"
    keys = checkpoint_eval_keys(tiny_inputs, tiny_classifier, **{"checkpoint_eval.feature_extractor_weights": gone})
    assert main([*base, *tiny_inputs.overrides("bad-clf", **keys)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("mvar train: error: checkpoint_eval.feature_extractor_weights") \
        and str(gone) in err[0], err
    assert not (tiny_inputs.root / "runs" / "bad-ref").exists()  # nothing started


KILLED_IN_EVAL = """
import os, sys
os.environ["OMP_NUM_THREADS"] = "1"
from mvar.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_local_run_evaluates_each_checkpoint_once_and_resumes_a_pending_evaluation(
        tiny_inputs, tiny_classifier, checkpoint_eval_keys, tmp_path):
    """`mvar train --local` with checkpoint_eval: killed (SIGKILL) in the evaluation of its last checkpoint
    (step 4), after step 2's was logged; the same command again evaluates step 4 (pending in the record)
    before anything else, and a longer run adds step 6's: one eval/* value per checkpoint step in the run,
    none twice. @best follows the lowest eval/fid."""
    name = "ckpt-eval-local"
    uri = own_store(tmp_path)
    evaluated = checkpoint_eval_keys(tiny_inputs, tiny_classifier, **{"checkpoint_eval.best_by": "eval/fid"})
    keys = {"run.steps": 4, "run.checkpoint_every": 2, "run.log_every": 2, "train.sample_images": 0,
            "tracking.uri": uri, **evaluated}
    argv = ["train", "--local", "--config", VAR, *tiny_inputs.overrides(name, **keys)]
    env = {**os.environ, "MVAR_FAULT": "abort-checkpoint-eval@4"}
    killed = subprocess.run([sys.executable, "-c", KILLED_IN_EVAL, *argv], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert killed.returncode == -9, (killed.returncode, killed.stderr[-3000:])
    run_id = run_of(tiny_inputs, uri, name)
    assert [s for s, _ in history(uri, run_id, "eval/fid")] == [2]
    run_dir = tiny_inputs.root / "runs" / name
    assert rundir.pending_validations(run_dir) == ["step_00000004"]

    from mvar.cli import main
    assert main(argv) == 0  # nothing left to train: the pending evaluation, then the end
    assert rundir.pending_validations(run_dir) == []
    assert main(["train", "--local", "--config", VAR, *tiny_inputs.overrides(name, **{**keys, "run.steps": 6})]) == 0
    fid = assert_evaluated_once_at(uri, run_id, [2, 4, 6])
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["mvar.resumes"] == "2"
    reg = rundir.registered(run_dir)  # the record holds each kept checkpoint's evaluation, as Ray Train's does
    assert reg.names == ["step_00000004", "step_00000006"]
    assert [reg.metrics[n]["eval/fid"] for n in reg.names] == pytest.approx([fid[4], fid[6]])
    best = tracking.Store(uri).model_version("models:/var-tiny@best")  # of the kept ones (run.keep_checkpoints 2)
    assert best["run_id"] == run_id and best["mvar.step"] == str(min((4, 6), key=fid.get))
    assert float(best["eval/fid"]) == pytest.approx(min(fid[4], fid[6]), rel=1e-4)
    grids = sorted(p.relative_to(run_dir).as_posix() for p in run_dir.glob("checkpoint_eval/*/*/grid.png"))
    assert [g.split("/")[1] for g in grids] == ["step_00000002", "step_00000004", "step_00000006"]
    assert not list(run_dir.glob("checkpoint_eval/*/*/samples"))  # the samples go once measured
