"""One trial: suggest, train, report, prune, evaluate, return the objectives.

    params = suggest(trial, search_space)               # the config keys of the search space
    python -m workflows.train --config BASE ... run.name=<study>-t<N>   # a Ray Train run (subprocess)
        while it runs: val/loss (logged at each checkpoint) -> trial.report -> trial.should_prune
    evaluate(run_id=<its MLflow run>)                    # on the final checkpoint, into the same run
    return [metrics[name] for name in objectives]

Training runs in a child process so that a pruned (or interrupted) trial can be stopped
at once: the process is the Ray driver of the run, and Ray ends the run's workers with it.
The trial's run name comes from the number of the trial's first attempt, so a retried
trial resumes its training run from the latest checkpoint and continues the same MLflow run.

With the study's `repeats: N` > 1 the process trains N seeds (run.repeats, one after the other,
mvar.training.launch.train_repeats): the trial's MLflow run is their group run, each seed's run is
nested under it. Pruning reads the first seed's val/loss; every seed is evaluated; the objectives
are the means over the seeds (user attrs: the mean under the metric's name, `<metric>_std`, and
`seed<seed>/<metric>` per seed).
"""
from __future__ import annotations

import logging
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import optuna

from mvar.config import ConfigError, flatten, from_dict
from mvar.errors import UserError
from mvar.tracking import PARENT_TAG, Store
from mvar.training.config import TrainConfig, load_train_config
from mvar.training.launch import (
    GROUP_RUN_KEY,
    find_group_run,
    run_key,
    seed_configs,
    storage_location,
)
from sweeps import runs
from sweeps.checks import Preflight
from sweeps.runs import SweepTracking
from sweeps.study import KNOWN_METRICS, StudyConfig, override, suggest

log = logging.getLogger(__name__)

STOP = threading.Event()     # set by the sweep's signal handler: running trials stop and are queued again
TERMINATE_WAIT_S = 20.0


class TrialFailed(Exception):
    """The trial's training or evaluation failed; the trial is marked FAIL and the study goes on."""


@dataclass
class SweepContext:
    study: StudyConfig
    pre: Preflight
    tracking: SweepTracking
    env: dict[str, str]      # the training processes' environment: Ray address, MLflow store
    log_dir: Path
    eval_keys: dict          # the trials' `eval.*` keys (an image-set reference replaced by its statistics)


def trial_key(trial: optuna.Trial) -> int:
    """The number of the trial's first attempt (a retry inherits the user attrs of the trial it retries)."""
    return int(trial.user_attrs.get("trial_key", trial.number))


def trial_config(ctx: SweepContext, key: int, params: dict) -> tuple[TrainConfig, list[str]]:
    name = f"{ctx.study.study_name}-t{key}"
    t = ctx.tracking
    overrides = (ctx.pre.overrides + [override(k, v) for k, v in params.items()]
                 + [f"run.name={name}", f"run.storage_path={storage_location(ctx.pre.base.run.storage_path)}",
                    f"tracking.uri={t.uri}", f"tracking.experiment={t.cfg.experiment}", f"tracking.run_name={name}",
                    f"tracking.parent_run_id={t.parent_run_id}", f"run.repeats={ctx.study.repeats}"])
    try:
        return load_train_config(ctx.study.base_config, overrides), overrides
    except ConfigError as err:
        raise TrialFailed(f"trial {key}: {err}") from None


class TrainingRun:
    """The MLflow run of a trial, found under the sweep's run by its key tag once the training driver made it
    there: the training run (`mvar.run_key`), or with repeats the seeds' group run (`mvar.group_run_key`),
    each seed's run nested under it."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.name = cfg, cfg.run.name
        self.store, self.experiment = Store(cfg.tracking.uri), cfg.tracking.experiment
        self.storage = storage_location(cfg.run.storage_path)
        self.key = run_key(cfg, self.storage)
        self.seeds = seed_configs(cfg) if cfg.run.repeats > 1 else []
        self.key_tag = GROUP_RUN_KEY if self.seeds else "mvar.run_key"
        self.run_id = ""
        self.seed_run_ids: dict[int, str] = {}
        self.reported: set[int] = set()

    def find(self) -> str:
        if not self.run_id:
            if self.seeds:
                self.run_id = find_group_run(self.store, self.cfg, self.storage) or ""
            else:
                nested = {PARENT_TAG: self.cfg.tracking.parent_run_id} if self.cfg.tracking.parent_run_id else {}
                self.run_id = self.store.find_run(self.experiment, {"mvar.run_key": self.key, **nested}) or ""
        return self.run_id

    def _seed_run(self, one: TrainConfig) -> str:
        seed = one.run.seed
        if seed not in self.seed_run_ids and self.find():
            found = self.store.find_run(self.experiment, {"mvar.run_key": run_key(one, self.storage),
                                                          PARENT_TAG: self.run_id})
            if found:
                self.seed_run_ids[seed] = found
        return self.seed_run_ids.get(seed, "")

    def runs(self) -> list[tuple[TrainConfig, str]]:
        """(config, MLflow run id or '') of each training run of the trial: its one run, or each seed's."""
        if not self.seeds:
            return [(self.cfg, self.find())]
        return [(one, self._seed_run(one)) for one in self.seeds]

    def first(self) -> str:
        """The run whose val/loss the pruner sees: the trial's training run, or its first seed's."""
        return self.runs()[0][1]

    def new_val_loss(self) -> list[tuple[int, float]]:
        first = self.first()
        if not first:
            return []
        new = sorted({s: v for s, v in self.store.history(first, "val/loss") if s not in self.reported}.items())
        self.reported.update(step for step, _ in new)
        return new

    def curve(self) -> list[tuple[int, float]]:
        first = self.first()
        return sorted(dict(self.store.history(first, "val/loss")).items()) if first else []


def check_same_params(run: TrainingRun, params: dict) -> None:
    """A run of this name with other values means the study was restarted on a fresh storage."""
    if not run.find():
        return
    logged = run.store.get(run.run_id).params
    ours = flatten(run.cfg)
    differ = {k: (logged[k], str(ours[k])) for k in params if k in logged and logged[k] != str(ours[k])}
    if differ:
        raise UserError(f"training run '{run.key}' (MLflow {run.run_id}) exists with other values {differ}: "
                        f"an earlier study of this name on another storage; use another study_name or "
                        f"run.storage_path")


def start_training(ctx: SweepContext, overrides: list[str], log_path: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "sweeps.train_child", str(os.getpid()), "--config", ctx.study.base_config,
           *overrides]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        out.write(("\n$ " + " ".join(cmd[3:]) + "\n").encode())
        out.flush()
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ctx.env, cwd=os.getcwd())


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(TERMINATE_WAIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def report(ctx: SweepContext, trial: optuna.Trial, step: int, value: float) -> bool:
    """Send val/loss to Optuna (single objective: pruning); True when the trial should stop."""
    if len(ctx.study.objectives) > 1:
        return False  # Optuna has no intermediate values for several objectives
    sign = 1.0 if ctx.study.directions[0] == "minimize" else -1.0  # lower val/loss is better either way
    trial.report(sign * value, step)
    return trial.should_prune()


def train(ctx: SweepContext, trial: optuna.Trial, run: TrainingRun, overrides: list[str], key: int) -> None:
    """Run the training process to its end, reporting val/loss; raises TrialPruned or TrialFailed."""
    check_same_params(run, trial.params)
    log_path = ctx.log_dir / f"{run.name}.log"
    proc = start_training(ctx, overrides, log_path)
    try:
        while proc.poll() is None:
            STOP.wait(ctx.study.poll_s)
            if STOP.is_set():
                raise KeyboardInterrupt(f"trial {key} interrupted")
            for step, value in run.new_val_loss():
                if report(ctx, trial, step, value) and proc.poll() is None:
                    stop(proc)
                    mark_pruned(run, step)
                    raise optuna.TrialPruned(f"val/loss {value:.4g} at step {step}")
    finally:
        stop(proc)
    for step, value in run.new_val_loss():
        report(ctx, trial, step, value)
    if proc.returncode != 0:
        raise TrialFailed(f"trial {key}: training exited with code {proc.returncode}; the end of {log_path}:\n"
                          + log_tail(log_path))
    if not run.find():
        raise TrialFailed(f"trial {key}: training finished but no MLflow run has the tag {run.key_tag}={run.key}")


def mark_pruned(run: TrainingRun, step: int) -> None:
    """The trial's run KILLED, and with repeats each seed's run that had not finished."""
    if not run.find():
        return
    for run_id in dict.fromkeys([run.run_id, *(r for _, r in run.runs() if r)]):
        if run_id == run.run_id or run.store.get(run_id).status != "FINISHED":
            run.store.set_tags(run_id, {"mvar.stopped": f"pruned by the sweep at step {step}"})
            run.store.terminate(run_id, "KILLED")


def train_metric(uri: str, run_id: str, name: str, aggregate: str) -> float | None:
    values = [value for _, value in Store(uri).history(run_id, name)]
    if not values:
        return None
    return {"last": values[-1], "max": max(values), "median": statistics.median(values)}[aggregate]


def evaluate_run(ctx: SweepContext, cfg: TrainConfig, run_id: str) -> dict[str, float]:
    """The evaluation of the final checkpoint (the run's `mvar.checkpoint`), logged into the training run."""
    from mvar.evaluation.config import EvaluateConfig
    from mvar.evaluation.run import evaluate
    eval_keys = dict(ctx.eval_keys)
    if eval_keys.get("out_dir"):
        eval_keys["out_dir"] = str(Path(eval_keys["out_dir"]) / cfg.run.name)
    ecfg = from_dict(EvaluateConfig, {"run_id": run_id, "eval": eval_keys, "tracking": {
        "uri": cfg.tracking.uri, "experiment": cfg.tracking.experiment, "system_metrics": False}})
    [result] = evaluate(ecfg)
    return dict(result.metrics)


def measure(ctx: SweepContext, cfg: TrainConfig, run_id: str) -> dict[str, float]:
    """Every known metric the trial's runs hold: the evaluation's, then the training run's."""
    metrics = evaluate_run(ctx, cfg, run_id) if ctx.pre.eval_cfg is not None else {}
    for name, m in KNOWN_METRICS.items():
        if m.source == "train":
            value = train_metric(cfg.tracking.uri, run_id, name, m.aggregate)
            if value is not None:
                metrics[name] = value
    return metrics


def measure_trial(ctx: SweepContext, run: TrainingRun, key: int) -> tuple[dict[str, float], dict[int, dict]]:
    """(the trial's metrics, each seed's by seed): its one run's metrics, or with repeats ``combine_seeds``."""
    per_seed = {}
    for cfg, run_id in run.runs():
        if not run_id:
            raise TrialFailed(f"trial {key}: no MLflow run of '{cfg.run.name}' under the trial's run {run.run_id}")
        per_seed[cfg.run.seed] = measure(ctx, cfg, run_id)
    if not run.seeds:
        return next(iter(per_seed.values())), {}
    return combine_seeds(per_seed), per_seed


def _shared(per_seed: dict[int, dict]) -> list[str]:
    """The metrics every seed has, sorted."""
    return sorted(set.intersection(*(set(m) for m in per_seed.values()))) if per_seed else []


def combine_seeds(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """A trial's metrics over its seeds (two or more): the mean under the metric's name (the objective),
    ``<metric>_std`` (sample standard deviation) and ``seed<seed>/<metric>`` of each seed."""
    out = {}
    for name in _shared(per_seed):
        values = [m[name] for m in per_seed.values()]
        out[name] = statistics.fmean(values)
        out[f"{name}_std"] = statistics.stdev(values)
        out.update({f"seed{seed}/{name}": m[name] for seed, m in per_seed.items()})
    return out


def group_aggregates(per_seed: dict[int, dict[str, float]]) -> dict[str, float]:
    """What the group run shows of its seeds, by the names `mvar report` gives aggregates (eval/fid ->
    eval_fid_mean, eval_fid_std, eval_fid_n)."""
    out = {}
    for name in _shared(per_seed):
        values = [m[name] for m in per_seed.values()]
        slug = name.replace("/", "_")
        out.update({f"{slug}_mean": statistics.fmean(values), f"{slug}_std": statistics.stdev(values),
                    f"{slug}_n": float(len(values))})
    return out


def objective_values(ctx: SweepContext, metrics: dict[str, float], key: int) -> list[float]:
    values = []
    for name in ctx.study.objectives:
        value = metrics.get(name)
        if value is None or math.isnan(value):
            raise TrialFailed(f"trial {key}: objective {name} is {'missing' if value is None else 'NaN'}")
        values.append(float(value))
    return values


class Objective:
    """``study.optimize(Objective(ctx), ...)``; thread-safe, so n_jobs > 1 runs trials side by side."""

    def __init__(self, ctx: SweepContext):
        self.ctx = ctx

    def __call__(self, trial: optuna.Trial):
        ctx, key = self.ctx, trial_key(trial)
        trial.set_user_attr("trial_key", key)
        params = suggest(trial, ctx.study.search_space)
        cfg, overrides = trial_config(ctx, key, params)
        run, state, metrics, per_seed = TrainingRun(cfg), "FAIL", {}, {}
        try:
            t0 = time.monotonic()
            train(ctx, trial, run, overrides, key)
            trial.set_user_attr("train_run_id", run.run_id)
            trial.set_user_attr("mlflow_run_id", run.run_id)
            for one, run_id in run.runs() if run.seeds else ():
                trial.set_user_attr(f"seed{one.run.seed}/run_id", run_id)
            t1 = time.monotonic()
            metrics, per_seed = measure_trial(ctx, run, key)
            metrics.update({"sweep/train_s": t1 - t0, "sweep/eval_s": time.monotonic() - t1})
            for name, value in metrics.items():
                trial.set_user_attr(name, value)
            values = objective_values(ctx, metrics, key)
            state = "COMPLETE"
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        except KeyboardInterrupt:
            state = "INTERRUPTED"  # queued again with the same values: a rerun retries it
            trial.study.enqueue_trial(params, user_attrs={"trial_key": key})
            raise
        finally:
            self._finish(trial, key, run, state, metrics, per_seed)
        seeds = f" (mean of {len(run.seeds)} seeds)" if run.seeds else ""
        print(f"trial {trial.number} ({params}): "
              + ", ".join(f"{n} {v:.4g}" for n, v in zip(ctx.study.objectives, values)) + seeds
              + f" (training {metrics['sweep/train_s']:.0f} s, evaluation {metrics['sweep/eval_s']:.0f} s)", flush=True)
        return values[0] if len(values) == 1 else values

    def _finish(self, trial, key: int, run: TrainingRun, state: str, metrics: dict, per_seed: dict) -> None:
        """The trial's tags and timings on its run (with repeats: the group run, with the seeds' aggregates, and
        the seeds' runs tagged too); never hides the trial's own error."""
        try:
            if run.find():
                runs.finish_trial(self.ctx.tracking, run.run_id, key, trial.number, state, metrics,
                                  group_aggregates(per_seed), [r for _, r in run.runs() if r] if run.seeds else [])
        except Exception as err:  # noqa: BLE001 - MLflow trouble costs the trial's tags, not the trial
            log.warning("MLflow: could not tag the training run of trial %d: %s", trial.number, err)
