"""Real sweeps on a local Ray: tiny trials (Ray Train + evaluation) tracked in a real MLflow store and a real
Optuna storage (SQLite; PostgreSQL in test_sweep_postgres.py). Each trial costs ~40-60 s on 2 cores, mostly
Ray Train's start, so the end-to-end sweep is also the one that is killed and resumed."""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import optuna
import pytest
import yaml
from optuna.trial import TrialState

from mvar import tracking
from sweeps.run import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]

STUDY = "sweeps/k_depth_tiny.yaml"


@dataclass
class Sweep:
    name: str
    storage: str
    uri: str
    killed_after: int = 0      # the step of the checkpoint the killed attempt had passed

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=self.name, storage=self.storage)

    def runs(self, **tags) -> list:
        c = tracking.client(self.uri)
        exp = c.get_experiment_by_name("sweeps")
        query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in {"mvar.study": self.name, **tags}.items())
        return c.search_runs([exp.experiment_id], filter_string=query)

    def training_run(self, key: int):
        c = tracking.client(self.uri)
        found = c.search_runs([c.get_experiment_by_name("sweeps").experiment_id],
                              filter_string=f"tags.`mvar.run_key` LIKE '%/{self.name}-t{key}'")
        return found[0] if found else None


def states(study: optuna.Study) -> list[str]:
    return [t.state.name for t in study.trials]


def steps(uri: str, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in tracking.client(uri).get_metric_history(run_id, key))


def sweep_process(sweep_inputs, log, extra: list[str]) -> subprocess.Popen:
    """`python -m sweeps.run` in its own process group, joining this module's Ray."""
    import ray
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address,
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    cmd = [sys.executable, "-m", "sweeps.run", STUDY, "--storage", sweep_inputs.storage, *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_past_checkpoint(sweep: Sweep, key: int, storage, proc: subprocess.Popen, log_path, timeout_s: float = 600):
    """Until trial ``key``'s run has a checkpoint registered with Ray Train and has trained past it."""
    snapshot = storage / f"{sweep.name}-t{key}" / "checkpoint_manager_snapshot.json"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run = sweep.training_run(key)
        if run and snapshot.is_file():
            latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]["metrics"]["step"]
            if steps(sweep.uri, run.info.run_id, "train/loss")[-1:] > [latest]:
                return latest
        assert proc.poll() is None, log_path.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"trial {key} did not pass a checkpoint: {log_path.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def k_depth(sweep_inputs) -> Sweep:
    """The shipped tiny k x depth study, 3 trials of 100 steps, as a user runs it: `python -m sweeps.run`,
    SIGKILLed (its whole process group) while trial 1 trains past a checkpoint, then the same command again."""
    sweep = Sweep("kd", sweep_inputs.storage, sweep_inputs.tracking_uri)
    extra = ["--n-trials", "3", *sweep_inputs.args("kd", **{"run.steps": 100, "run.checkpoint_every": 25})]
    log_path = sweep_inputs.root / "kd.log"
    with open(log_path, "wb") as log:
        proc = sweep_process(sweep_inputs, log, extra)
        try:
            sweep.killed_after = wait_past_checkpoint(sweep, 1, sweep_inputs.root / "runs", proc, log_path)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert states(sweep.study()) == ["COMPLETE", "RUNNING"]
    with open(log_path, "ab") as log:
        rerun = sweep_process(sweep_inputs, log, extra)
        assert rerun.wait(900) == 0, log_path.read_text()[-3000:]
    return sweep


def test_three_trial_sweep_end_to_end(k_depth, sweep_inputs, local_ray):
    # the sweep's driver subprocess and its trials' training workers listened on loopback only
    local_ray.assert_listeners_on("127.0.0.1", expect=("sweeps.run", "RayTrainWorker"))
    study = k_depth.study()
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 3 and study.metric_names == ["eval/fid", "infer/peak_mem_mb"]
    assert len({tuple(sorted(t.params.items())) for t in complete}) == 3  # three grid points
    # MLflow: one parent; each trial's training run is its child (no other runs), with its curves and objectives
    [parent] = k_depth.runs(**{"mvar.sweep": "parent"})
    assert parent.info.status == "FINISHED" and parent.data.params["study.storage"] == sweep_inputs.storage
    assert parent.data.metrics["sweep/complete"] == 3
    children = k_depth.runs(**{"mvar.sweep": "trial"})
    assert len(children) == 3
    nested = tracking.Store(k_depth.uri).children(parent.info.run_id)
    assert sorted(nested) == sorted(c.info.run_id for c in children)  # the killed attempt's run too: it resumed
    for trial in complete:
        [train] = [c for c in children if c.data.tags["mvar.trial"] == str(trial.user_attrs["trial_key"])]
        assert train.data.tags["mlflow.parentRunId"] == parent.info.run_id and train.info.status == "FINISHED"
        assert train.info.run_id == trial.user_attrs["train_run_id"] and "mvar.run_key" in train.data.tags
        assert train.data.tags["mvar.trial_state"] == "COMPLETE" and train.data.tags["mvar.budget"] == "steps"
        assert train.data.metrics["eval/fid"] == pytest.approx(trial.values[0])  # the evaluation logged there
        assert train.data.metrics["infer/peak_mem_mb"] == pytest.approx(trial.values[1])
        assert {k: train.data.params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        assert train.data.params["tracking.parent_run_id"] == parent.info.run_id
        assert steps(k_depth.uri, train.info.run_id, "val/loss") == [25, 50, 75, 100]
        assert steps(k_depth.uri, train.info.run_id, "train/loss")[-1] == 100
        hours = train.data.metrics["cost/device_hours"]
        assert hours > 0 and trial.user_attrs["cost/device_hours"] == pytest.approx(hours)
    # the study's training cost: its trials' device-hours summed (the parent's metric, the report's cost.json)
    total = sum(t.user_attrs["cost/device_hours"] for t in complete)
    assert parent.data.metrics["cost/device_hours"] == pytest.approx(total)
    # the parent's report
    c = tracking.client(k_depth.uri)
    assert {a.path for a in c.list_artifacts(parent.info.run_id, "report")} >= {
        "report/trials.csv", "report/pareto_front.png", "report/importances.json"}
    assert {"search_space.yaml", "study.yaml"} <= {a.path for a in c.list_artifacts(parent.info.run_id)}
    report = sweep_inputs.root / "sweeps" / "kd" / "report"
    rows = list(csv.DictReader((report / "trials.csv").read_text().splitlines()))
    assert sorted(r["state"] for r in rows) == ["COMPLETE"] * 3 + ["FAIL"] and "values_eval/fid" in rows[0]
    assert yaml.safe_load((report / "importances.json").read_text()).keys() == {"eval/fid", "infer/peak_mem_mb"}
    assert yaml.safe_load((report / "cost.json").read_text())["total"] == pytest.approx(total)


def test_killed_trial_is_retried_once_and_resumes_its_training_run(k_depth, step_tally):
    study = k_depth.study()
    # the killed attempt failed (no heartbeat), its retry ran first on the rerun, then the last grid point
    assert states(study) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    killed, retry = study.trials[1], study.trials[2]
    assert retry.system_attrs["failed_trial"] == 1 and retry.params == killed.params
    keys = [t.user_attrs["trial_key"] for t in study.trials if t.state == TrialState.COMPLETE]
    assert sorted(keys) == [0, 1, 3]  # nothing completed twice
    # its training resumed from the checkpoint of the killed attempt: every step logged once, one MLflow run
    train = k_depth.training_run(1)
    assert train.info.status == "FINISHED" and int(train.data.tags["mvar.resumes"]) >= 1
    assert 25 <= k_depth.killed_after < 100
    step_tally.of_run(k_depth.uri, train.info.run_id, range(1, 101)).assert_clean()  # 0 lost, 0 duplicated
    assert retry.user_attrs["train_run_id"] == train.info.run_id
    [child] = k_depth.runs(**{"mvar.sweep": "trial", "mvar.trial": "1"})
    assert child.info.run_id == train.info.run_id and child.data.tags["mvar.optuna_trial"] == "2"


def test_rerun_of_a_finished_study_runs_nothing(k_depth, sweep_inputs, capsys):
    args = sweep_inputs.args("kd", **{"run.steps": 100, "run.checkpoint_every": 25})
    assert main([STUDY, "--n-trials", "3", "--storage", sweep_inputs.storage, *args]) == 0
    assert len(k_depth.study().trials) == 4
    assert "3/3 trials finished" in capsys.readouterr().out
    assert len(k_depth.runs(**{"mvar.sweep": "parent"})) == 1 and len(k_depth.runs(**{"mvar.sweep": "trial"})) == 3


def test_pruned_trial_stops_its_training(sweep_inputs, tmp_path):
    """val/loss at the first checkpoint goes to Optuna; a pruner that prunes everything stops the run at once."""
    study_file = tmp_path / "pruned.yaml"
    study_file.write_text(yaml.safe_dump({
        "base_config": "workflows/configs/mvar_tiny_local.yaml",
        "overrides": {"scaling.num_workers": 1, "data.num_workers": 0},
        "search_space": {"model.window_size": [1, 3]}, "objectives": {"val/loss": "minimize"},
        "sampler": {"name": "random"}, "pruner": {"name": "threshold", "upper": 0.0}, "n_trials": 1}))
    args = sweep_inputs.args("pruned", **{"run.steps": 200, "run.checkpoint_every": 5})
    assert main([str(study_file), "--storage", sweep_inputs.storage, *args]) == 0
    sweep = Sweep("pruned", sweep_inputs.storage, sweep_inputs.tracking_uri)
    [trial] = sweep.study().trials
    assert trial.state == TrialState.PRUNED and 5 in trial.intermediate_values
    train = sweep.training_run(0)
    assert train.info.status == "KILLED" and train.data.tags["mvar.stopped"].startswith("pruned by the sweep")
    assert steps(sweep.uri, train.info.run_id, "train/loss")[-1] < 200
    [child] = sweep.runs(**{"mvar.sweep": "trial"})
    assert child.info.status == "KILLED" and child.data.tags["mvar.trial_state"] == "PRUNED"


def test_a_trial_of_two_seeds_is_their_mean_and_its_run_their_group_run(sweep_inputs, tmp_path):
    """`repeats: 2`: one trial trains seeds 0 and 1, each evaluated; the objective is the mean; the pruner saw
    the first seed's val/loss; in MLflow the trial's run is the group run, the seeds' runs nested under it."""
    study_file = tmp_path / "seeds.yaml"
    study_file.write_text(yaml.safe_dump({
        "base_config": "workflows/configs/mvar_tiny_local.yaml",
        "overrides": {"scaling.num_workers": 1, "data.num_workers": 0, "train.sample_images": 0},
        "search_space": {"model.window_size": [3]}, "objectives": {"eval/fid": "minimize"},
        "sampler": {"name": "grid"}, "pruner": {"name": "threshold", "upper": 1.0e9}, "n_trials": 1, "repeats": 2}))
    assert main([str(study_file), "--storage", sweep_inputs.storage, *sweep_inputs.args("seeds")]) == 0
    sweep = Sweep("seeds", sweep_inputs.storage, sweep_inputs.tracking_uri)
    [trial] = sweep.study().trials
    assert trial.state == TrialState.COMPLETE
    [parent] = sweep.runs(**{"mvar.sweep": "parent"})
    [group] = sweep.runs(**{"mvar.sweep": "trial"})
    assert group.info.run_id == trial.user_attrs["train_run_id"] and group.info.status == "FINISHED"
    assert group.data.tags["mlflow.parentRunId"] == parent.info.run_id and group.data.tags["mvar.group_run"] == "true"
    assert group.data.params["run.repeats"] == "2" and "mvar.variant" not in group.data.tags
    seeds = sorted(sweep.runs(**{"mvar.sweep": "seed"}), key=lambda r: r.data.params["run.seed"])
    assert sorted(tracking.Store(sweep.uri).children(group.info.run_id)) == sorted(r.info.run_id for r in seeds)
    assert tracking.Store(sweep.uri).children(parent.info.run_id) == [group.info.run_id]
    assert [(r.info.run_name, r.data.tags["mvar.seed"], r.data.tags["mvar.trial"]) for r in seeds] == [
        ("seeds-t0-seed0", "0", "0"), ("seeds-t0-seed1", "1", "0")]
    for r in seeds:
        assert r.data.tags["mlflow.parentRunId"] == group.info.run_id and r.info.status == "FINISHED"
        assert r.data.tags["mvar.group"] == group.data.tags["mvar.group"] and r.data.tags["mvar.variant"] == "mvar"
    fids = [r.data.metrics["eval/fid"] for r in seeds]  # each seed evaluated into its own run
    assert fids[0] != fids[1]
    assert trial.values[0] == pytest.approx(sum(fids) / 2) == pytest.approx(trial.user_attrs["eval/fid"])
    assert [trial.user_attrs["seed0/eval/fid"], trial.user_attrs["seed1/eval/fid"]] == pytest.approx(fids)
    assert trial.user_attrs["eval/fid_std"] == pytest.approx(abs(fids[0] - fids[1]) / 2 ** 0.5)
    assert trial.user_attrs["seed1/run_id"] == seeds[1].info.run_id
    assert group.data.metrics["eval_fid_mean"] == pytest.approx(trial.values[0]) and group.data.metrics["eval_fid_n"] == 2
    # the pruner was sent the first seed's val/loss curve (checkpoints at steps 3 and 6), not the second's
    curves = [dict((m.step, m.value) for m in tracking.client(sweep.uri).get_metric_history(r.info.run_id, "val/loss"))
              for r in seeds]
    assert trial.intermediate_values == pytest.approx(curves[0]) and sorted(curves[0]) == [3, 6]
    assert curves[0] != curves[1]
