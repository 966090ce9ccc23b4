"""The sweep itself, once every check passed: study, parent run, Ray, trials, report.

    study = create_study(...)           # the one place the Optuna study is made (or loaded again)
    parent = runs.parent_run(...)       # MLflow: found again by a rerun
    recover_interrupted(study)          # dead trials of an earlier run: FAIL, queued again
    optimize(study, Objective(ctx))     # until n_trials are complete or pruned
    report -> the parent run's artifacts
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import replace
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

from mvar import cluster, tracking
from mvar.errors import UserError
from sweeps import report, runs
from sweeps.checks import Preflight
from sweeps.objective import STOP, Objective, SweepContext, TrialFailed
from sweeps.runs import SweepTracking
from sweeps.storage import masked, quiet_experimental
from sweeps.study import StudyConfig

log = logging.getLogger(__name__)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def make_sampler(study: StudyConfig) -> optuna.samplers.BaseSampler:
    s = study.sampler
    if s.name == "grid":
        return optuna.samplers.GridSampler({k: list(v) for k, v in study.search_space.items()}, seed=s.seed)
    if s.name == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=s.population_size, seed=s.seed)
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    return optuna.samplers.TPESampler(n_startup_trials=s.n_startup_trials, seed=s.seed)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    p = study.pruner
    if p.name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)
    if p.name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=p.min_resource)
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=p.min_resource)
    if p.name == "threshold":
        return optuna.pruners.ThresholdPruner(upper=p.upper)
    return optuna.pruners.NopPruner()


def create_study(study: StudyConfig, storage) -> optuna.Study:
    """The Optuna study of this name, made on the first run and loaded again by every later one."""
    with quiet_experimental():
        s = optuna.create_study(study_name=study.study_name, storage=storage, directions=study.directions,
                                sampler=make_sampler(study), pruner=make_pruner(study), load_if_exists=True)
        if [d.name.lower() for d in s.directions] != study.directions:
            raise UserError(f"study '{study.study_name}' exists in the storage with directions "
                            f"{[d.name.lower() for d in s.directions]}, the study file asks {study.directions}; "
                            f"use another study_name for other objectives")
        s.set_metric_names(list(study.objectives))
    if not s.user_attrs:
        s.set_user_attr("search_space", study.search_space)
        s.set_user_attr("objectives", study.objectives)
    elif s.user_attrs.get("search_space") != study.search_space:
        log.warning("the search space differs from the one study '%s' started with (%s)", study.study_name,
                    s.user_attrs.get("search_space"))
    return s


def count(s: optuna.Study, states) -> int:
    return len(s.get_trials(deepcopy=False, states=states))


def recover_interrupted(s: optuna.Study, study: StudyConfig) -> None:
    """Trials left RUNNING by a process that died are failed once their heartbeat is older than the
    grace period, and queued again (RetryFailedTrialCallback); live ones of other workers stay."""
    running = count(s, (TrialState.RUNNING,))
    if not running:
        return
    r = study.resume
    print(f"{running} trial(s) RUNNING in the storage: waiting up to {r.grace_period_s + r.heartbeat_interval_s} s "
          f"to tell interrupted ones (no heartbeat) from live ones", flush=True)
    deadline = time.monotonic() + r.grace_period_s + r.heartbeat_interval_s
    with quiet_experimental():
        while count(s, (TrialState.RUNNING,)) and time.monotonic() < deadline:
            time.sleep(r.heartbeat_interval_s)
            optuna.storages.fail_stale_trials(s)


def concurrency(study: StudyConfig, pre: Preflight, where: str) -> int:
    """Trials at once: what the cluster's free CPUs/GPUs fit of one trial's training (or evaluation) workers."""
    import ray
    s, e = pre.base.scaling, pre.eval_cfg
    need = {"CPU": s.num_workers * s.cpus_per_worker, **({"GPU": s.num_workers * s.gpus_per_worker} if s.use_gpu else {})}
    if e is not None and e.num_workers > 0:
        need["CPU"] = max(need["CPU"], e.num_workers * e.cpus_per_worker)
        if e.use_gpu:
            need["GPU"] = max(need.get("GPU", 0), e.num_workers)
    free = ray.available_resources()
    fits = min(int(free.get(res, 0) / n + 1e-9) for res, n in need.items())
    wanted = study.n_parallel or max(fits, 1)
    if wanted > fits:
        msg = (f"n_parallel: {wanted} trials at once need {wanted} x {need} but the {where} Ray cluster has "
               f"{ {k: free.get(k, 0) for k in need} } free; lower n_parallel or scaling.*")
        if where == "local":
            raise UserError(msg)
        log.warning("%s (waiting for the cluster to grow)", msg)
    return wanted


def trial_env(uri: str) -> dict[str, str]:
    """The training processes join this sweep's Ray cluster and MLflow store."""
    import ray
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_TRACKING_URI": uri}
    if not env.get("RAY_ADDRESS") and not cluster.in_ray_job():
        env["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    host = env.get("RAY_ADDRESS", "").split("://")[-1].rsplit(":", 1)[0]
    if host in ("127.0.0.1", "localhost"):
        env.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # as `mvar stack`'s env does
    return env


def shared_reference(study: StudyConfig, pre: Preflight, out: Path) -> dict:
    """The trials' eval keys. The statistics of an image-set reference are computed here once, not
    by every trial under its own output directory."""
    from mvar.evaluation.run import metrics_device
    from mvar.metrics.fidelity import (
        Reference,
        cache_name,
        compute_reference,
        save_reference,
    )
    keys = dict(study.eval)
    if pre.eval_cfg is None or pre.reference is None or isinstance(pre.reference, Reference):
        return keys
    images = pre.reference
    path = out / cache_name(images.location, pre.weights.sha256)
    if not path.is_file():
        print(f"reference statistics of {images.num_images} images of {images.location} -> {path}", flush=True)
        out.mkdir(parents=True, exist_ok=True)
        ref = compute_reference(images.location, pre.weights, metrics_device(pre.eval_cfg),
                                pre.eval_cfg.feature_batch_size)
        save_reference(path, ref)
    keys["reference"] = str(path)
    return keys


def optimize(s: optuna.Study, objective: Objective, study: StudyConfig, n_parallel: int) -> None:
    """Rounds of `study.optimize` until n_trials are finished; a round that finishes none ends the sweep."""
    while (remaining := study.n_trials - count(s, FINISHED)) > 0:
        before = count(s, FINISHED)
        with quiet_experimental():
            s.optimize(objective, n_trials=remaining, n_jobs=n_parallel, catch=(TrialFailed,), gc_after_trial=True,
                       callbacks=[MaxTrialsCallback(study.n_trials, states=FINISHED)])
        waiting = count(s, (TrialState.WAITING,))
        if count(s, FINISHED) == before and not waiting:
            raise UserError(f"no trial of the last {remaining} finished (see the trial logs and the FAIL "
                            f"trials' errors above); fix the cause and rerun to continue the study")
        if study.sampler.name == "grid" and not waiting:
            return  # the grid is done: another round would repeat points


def summary(s: optuna.Study) -> dict[str, float]:
    return {"sweep/complete": count(s, (TrialState.COMPLETE,)), "sweep/pruned": count(s, (TrialState.PRUNED,)),
            "sweep/failed": count(s, (TrialState.FAIL,)), "sweep/pareto_size": len(s.best_trials)
            if count(s, (TrialState.COMPLETE,)) else 0, report.COST: report.study_device_hours(s)}


def finish(s: optuna.Study, study: StudyConfig, t: SweepTracking, out: Path, status: str) -> None:
    """The report into the parent run, whatever happened to the trials."""
    try:
        files = report.write_report(s, study.objectives, out / "report")
        best = ",".join(str(b.number) for b in s.best_trials) if count(s, (TrialState.COMPLETE,)) else ""
        runs.finish_parent(t, status, summary(s), {"mvar.best_trials": best}, files)
    except Exception as err:  # noqa: BLE001 - never hide the sweep's own outcome
        log.warning("the sweep's report was not (completely) logged: %s", err)


@contextlib.contextmanager
def interrupt_on_signals():
    """SIGTERM (`kill PID`) stops the sweep as Ctrl-C does: running trials stop their training and are
    queued again. Installed after Ray's driver start, which sets handlers of its own."""
    STOP.clear()

    def handler(signum, frame):
        STOP.set()
        raise KeyboardInterrupt(f"signal {signum}")
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def run_study(study: StudyConfig, pre: Preflight, url: str, storage) -> int:
    import ray
    uri = tracking.resolve_uri(pre.base.tracking.uri)
    started_ray = not ray.is_initialized()
    where = cluster.connect(env_vars={"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0",
                                      "MLFLOW_DISABLE_TELEMETRY": "true"})
    try:
        n_parallel = concurrency(study, pre, where)  # the last check on the input: before the study is touched
        s = create_study(study, storage)
        t = SweepTracking(replace(pre.base.tracking, uri=uri, system_metrics=False, run_name=""), study.study_name,
                          f"{masked(url)}#{study.study_name}",
                          budget="mixed: run.steps searched" if "run.steps" in study.search_space else "steps")
        t.parent_run_id, again = runs.parent_run(t, study, masked(url), type(s.sampler).__name__)
        print(f"study '{study.study_name}' in {masked(url)}: {count(s, FINISHED)}/{study.n_trials} trials "
              f"finished; MLflow parent run {t.parent_run_id} ({'found again' if again else 'new'}) in {uri}; "
              f"{n_parallel} trial(s) at once", flush=True)
        out = Path(study.log_dir).resolve() / study.study_name
        ctx = SweepContext(study, pre, t, trial_env(uri), out, shared_reference(study, pre, out))
        with interrupt_on_signals():
            run_trials(s, ctx, n_parallel)
    finally:
        if started_ray:
            cluster.shutdown()
    for b in s.best_trials:
        print(f"best: trial {b.number} {b.params} -> {dict(zip(study.objectives, b.values))}", flush=True)
    return 0


def run_trials(s: optuna.Study, ctx: SweepContext, n_parallel: int) -> None:
    """Recover, optimize, and report into the parent run whatever happens."""
    status = "FAILED"
    try:
        recover_interrupted(s, ctx.study)
        optimize(s, Objective(ctx), ctx.study, n_parallel)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        finish(s, ctx.study, ctx.tracking, ctx.log_dir, status)
