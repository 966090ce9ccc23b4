"""Training entry points, and the Ray Train backend of the driver (`launch`).

    train(cfg)                    # the generator, one run on Ray Train; train(cfg, local=True): this process
    train_repeats(cfg)            # run.repeats training seeds, each its own run under a group run
    train_tokenizer(cfg)          # the tokenizer (its `output` written after the fit)
    launch(spec, cfg)             # any task spec (mvar.training.tasks) on Ray Train

Ray Train's part (`launch`, `fit`): join or start Ray (`mvar.cluster.connect`), check that the
cluster can hold the workers, run `TorchTrainer` with the run's scaling, storage, checkpoint
retention and failure budget; the rest (checks, the MLflow run, the run's directory, the end)
is the driver's, shared with the local backend (`mvar.training.driver`, `mvar.training.local`).
Ray is imported only when a run starts on it.

Training seeds (`run.repeats` N > 1, `train_repeats`): seeds run.seed + k, k < N, one after the
other, each a run of its own named `<name>-seed<seed>` (a rerun resumes each), nested under a group
run `<name>` (tags `mvar.group`, `mvar.group_run=true`) that a rerun finds again. Every generator run
carries `mvar.group` (runs that differ only in the seed share it) and `mvar.seed`.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path

from mvar import cluster, faults, tracking
from mvar.config import flatten, to_dict
from mvar.errors import UserError
from mvar.tracking import Store
from mvar.training import run_dir as rundir
from mvar.training.config import RunConfig, TrainConfig
from mvar.training.driver import (  # noqa: F401 - also this module's names, as before the driver had its own
    FitResult,
    TrainingFailed,
    TrainOutcome,
    attach_run,
    check_one_run,
    check_paths_in_job,
    check_run_dir,
    end_run,
    finish,
    log_config,
    log_datasets,
    open_run,
    register_checkpoints,
    resolve_epochs,
    run_key,
    storage_location,
)
from mvar.training.local import check_local, run_local
from mvar.training.ray_worker import train_worker
from mvar.training.spec import TaskSpec
from mvar.training.tasks import (  # noqa: F401 - the generator's checks, as before
    GENERATOR,
    JOB_PATH_KEYS,
    TOKENIZER,
    Prepared,
    model_tags,
    prepare,
)

log = logging.getLogger(__name__)


def check_resources(cfg: RunConfig, where: str, evaluator=None) -> None:
    """On a local Ray a worker that asks for more than the machine has waits forever: refuse instead. With
    ``evaluator`` the checkpoints' evaluation task counts too (it runs beside the workers)."""
    have = cluster.cluster_resources()
    s = cfg.scaling
    wants = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        wants["GPU"] = s.num_workers * s.gpus_per_worker
    if evaluator is not None:
        wants["CPU"] += evaluator.ecfg.cpus_per_worker
        if evaluator.ecfg.use_gpu:
            wants["GPU"] = wants.get("GPU", 0) + 1
    also = " and the checkpoints' evaluation (checkpoint_eval.cpus_per_worker)" if evaluator is not None else ""
    for res, n in wants.items():
        if have.get(res, 0) + 1e-9 < n:
            msg = (f"scaling: {s.num_workers} workers{also} need {n:g} {res} in all but the {where} Ray cluster "
                   f"has {have.get(res, 0):g}; lower scaling.num_workers or scaling.{res.lower()}s_per_worker")
            if where == "local":
                raise UserError(msg)
            log.warning("%s (waiting for the cluster to grow)", msg)


def validation_config(evaluator):
    """Ray Train's checkpoint validation running ``evaluator`` (`mvar.training.checkpoint_eval`) on each
    checkpoint reported with ``validation=True``: a task of its own with the evaluation's resources
    (checkpoint_eval.cpus_per_worker, one GPU with use_gpu), cancelled after checkpoint_eval.timeout_s."""
    import functools

    from ray.train import ValidationConfig, ValidationTaskConfig

    from mvar.training.ray_worker import validate_checkpoint
    ecfg = evaluator.ecfg
    return ValidationConfig(fn=functools.partial(validate_checkpoint, evaluator=evaluator),
                            task_config=ValidationTaskConfig(timeout_s=ecfg.timeout_s or None),
                            ray_remote_kwargs={"num_cpus": ecfg.cpus_per_worker, "num_gpus": 1 if ecfg.use_gpu else 0,
                                               "name": "mvar-checkpoint-eval"})


def fit(cfg: RunConfig, worker_fn, loop_config: dict, storage: str, evaluator=None):
    """Ray Train's TorchTrainer with the run's scaling, storage, checkpoint retention and failure budget; with
    ``evaluator``, each checkpoint's evaluation as Ray Train's checkpoint validation."""
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from mvar.training.backend import torch_config
    s = cfg.scaling
    resources = {"CPU": s.cpus_per_worker, **({"GPU": s.gpus_per_worker} if s.use_gpu else {})}
    # Ray Train's own INFO lines (worker group starts, each report and checkpoint) only when verbose:
    # rank 0 prints the run's progress (mvar.training.worker)
    logging_config = LoggingConfig(log_level="INFO" if cluster.verbose() else "WARNING")
    trainer = TorchTrainer(
        worker_fn, train_loop_config=loop_config, torch_config=torch_config(s),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage, logging_config=logging_config,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)),
        validation_config=validation_config(evaluator) if evaluator is not None else None)
    return trainer.fit()


def fit_result(result) -> FitResult:
    """What Ray Train's ``Result`` says of the run, for the driver's end."""
    kept = [(c.path, m or {}) for c, m in (getattr(result, "best_checkpoints", None) or [])]
    return FitResult(checkpoint=result.checkpoint.path if result.checkpoint is not None else "",
                     metrics=result.metrics or {}, kept=kept,
                     returned=getattr(result, "return_value", None) or {})


def worker_error(err: Exception) -> str:
    """One line for a failed Ray Train run: the first worker's UserError (a full disk ...) if any."""
    for failure in getattr(err, "worker_failures", {}).values():
        seen = failure
        while seen is not None:
            if isinstance(seen, UserError):
                return str(seen)
            seen = getattr(seen, "cause", None) or seen.__cause__
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def launch(spec: TaskSpec, cfg: RunConfig, checked: dict | None = None, tags: dict[str, str] | None = None
           ) -> TrainOutcome:
    """Check every input (``spec.check``, unless ``checked`` holds its result), attach the MLflow run, start
    or join Ray, fit on Ray Train, record the end (``spec.register_as``, ``spec.after_fit``). ``tags`` are
    added to the spec's.

    Every worker runs `mvar.training.ray_worker.train_worker` on the driver's loop config: the spec, the
    config itself (``train``: Ray's pickling is its one serialisation, and the worker does not validate it
    again), ``run_id``, what ``spec.check`` returned and the run directory's part.
    """
    check_one_run(cfg)
    checked = spec.check(cfg) if checked is None else checked
    opened = open_run(spec, cfg, checked, tags or {}, backend="ray")
    where = cluster.connect(env_vars={"MLFLOW_TRACKING_URI": cfg.tracking.uri, "RAY_USAGE_STATS_ENABLED": "0",
                                      "MLFLOW_DISABLE_TELEMETRY": "true", **faults.forwarded_env()})
    check_resources(cfg, where, opened.evaluator)
    s = cfg.scaling
    gpus = f", {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
    print(f"Ray Train: {s.num_workers} workers ({s.cpus_per_worker:g} CPU{gpus} each) on the {where} Ray; "
          f"{cfg.run.steps} steps", flush=True)
    try:
        result = fit(cfg, train_worker, opened.workers, opened.storage, opened.evaluator)
    except Exception as err:
        from ray.train import TrainingFailedError
        if isinstance(err, TrainingFailedError):
            opened.store.terminate(opened.run_id, "FAILED")
            raise TrainingFailed(f"training failed after {cfg.run.max_failures} retries: {worker_error(err)} "
                                 f"(Ray's report is above)") from err
        raise
    finally:
        if opened.workers.get("run_dir"):
            rundir.prune(Path(opened.workers["run_dir"]))
    return end_run(spec, cfg, opened, fit_result(result))


def backend(local: bool):
    """The driver of a run: ``launch`` (Ray Train) or `mvar.training.local.run_local` (this process)."""
    return run_local if local else launch


def train_tokenizer(cfg, local: bool = False) -> tuple[TrainOutcome, Path]:
    """Check every input, train the tokenizer (Ray Train, or this process with ``local``), write it to
    `output`; (outcome, output dir)."""
    outcome = backend(local)(TOKENIZER, cfg)
    return outcome, Path(outcome.output)


def group_key_of(cfg: TrainConfig) -> str:
    """The run's ``mvar.group``: ``mvar.metrics.stats.group_key`` of its params as MLflow logs them."""
    from mvar.metrics.stats import group_key
    return group_key({k: str(v) for k, v in flatten(to_dict(cfg)).items()})


def _train_checked(cfg: TrainConfig, prep: Prepared, group: str, local: bool = False) -> TrainOutcome:
    """The generator's run of a checked ``cfg``, tagged with its group and seed."""
    tags = {"mvar.group": group, "mvar.seed": str(cfg.run.seed)}
    outcome = backend(local)(GENERATOR, cfg, {"tokenizer_sha256": prep.tokenizer_sha256}, tags)
    return dataclasses.replace(outcome, seed=cfg.run.seed, group=group)


def train(cfg: TrainConfig, local: bool = False) -> TrainOutcome:
    """Check every input, then train the generator with Ray Train (or in this process with ``local``): one
    run (``run.repeats`` 1)."""
    check_one_run(cfg)
    if local:
        check_local(cfg)
    prep = prepare(cfg)
    return _train_checked(cfg, prep, group_key_of(cfg), local)


GROUP_RUN_KEY = "mvar.group_run_key"  # a group run's key tag (its runs' storage/name), as mvar.run_key is a run's


def seed_configs(cfg: TrainConfig, group_run_id: str = "") -> list[TrainConfig]:
    """One config per training seed run.seed + k (k < run.repeats): named `<name>-seed<seed>` (its run
    resumes by that name), one run each (run.repeats 1), nested under ``group_run_id``."""
    out = []
    for k in range(cfg.run.repeats):
        seed = cfg.run.seed + k
        one = copy.deepcopy(cfg)
        one.run = dataclasses.replace(cfg.run, seed=seed, name=f"{cfg.run.name}-seed{seed}", repeats=1)
        shown = f"{cfg.tracking.run_name}-seed{seed}" if cfg.tracking.run_name else ""
        one.tracking = dataclasses.replace(cfg.tracking, parent_run_id=group_run_id, run_name=shown)
        out.append(one)
    return out


def find_group_run(store: Store, cfg: TrainConfig, storage: str) -> str | None:
    """The group run of ``cfg``'s seeds (nested under ``tracking.parent_run_id`` when set), if made already."""
    nested = {tracking.PARENT_TAG: cfg.tracking.parent_run_id} if cfg.tracking.parent_run_id else {}
    return store.find_run(cfg.tracking.experiment, {GROUP_RUN_KEY: run_key(cfg, storage), **nested})


def attach_group(cfg: TrainConfig, store: Store, storage: str, group: str) -> tuple[str, bool]:
    """(group run id, found again?): the run that holds the seeds' runs, with the config as its params; a
    rerun (more seeds, say) finds it again and reopens it."""
    seeds = {"mvar.repeats": str(cfg.run.repeats),
             "mvar.seeds": ",".join(str(cfg.run.seed + k) for k in range(cfg.run.repeats))}
    tags = {"mvar.group": group, "mvar.group_run": "true", "mvar.storage": storage, **seeds}
    run_id, found = store.find_or_create(cfg.tracking.experiment, {GROUP_RUN_KEY: run_key(cfg, storage)},
                                         cfg.tracking.run_name or cfg.run.name, tags,
                                         parent=cfg.tracking.parent_run_id or None)
    if found:
        store.reopen(run_id)
        store.set_tags(run_id, seeds)
    log_config(cfg, store, run_id, found)
    if not found:
        log_datasets(cfg, store, run_id)
    return run_id, found


def finished_outcome(store: Store, cfg: TrainConfig, storage: str) -> TrainOutcome | None:
    """A seed's run that a rerun has nothing left to train (FINISHED, its final checkpoint at run.steps): its
    outcome, without a training start; else None."""
    from mvar.checkpoint import read_checkpoint_meta
    run_id = store.find_run(cfg.tracking.experiment, {"mvar.run_key": run_key(cfg, storage),
                                                      tracking.PARENT_TAG: cfg.tracking.parent_run_id})
    run = store.get(run_id) if run_id else None
    if run is None or run.status != "FINISHED" or not run.tags.get(tracking.CHECKPOINT_TAG):
        return None
    checkpoint = run.tags[tracking.CHECKPOINT_TAG]
    try:
        step = int(read_checkpoint_meta(checkpoint)["train"]["step"])
    except (UserError, KeyError, TypeError, ValueError):
        return None  # not readable here (an object store): Ray Train resumes it
    if step < cfg.run.steps:
        return None
    print(f"run '{cfg.run.name}' (seed {cfg.run.seed}) is finished already: MLflow run {run_id}, step {step}",
          flush=True)
    return TrainOutcome(run_id=run_id, checkpoint=checkpoint, step=step, status="completed", seed=cfg.run.seed,
                        group=run.tags.get("mvar.group", ""))


def train_repeats(cfg: TrainConfig, local: bool = False) -> list[TrainOutcome]:
    """``run.repeats`` training seeds of ``cfg`` (run.seed + k), one after the other, each its own run nested
    under the group run, which ends FINISHED when every seed has. One outcome per seed, in seed order; each
    names the group run (``group_run_id``). With run.repeats 1: ``[train(cfg)]``, no group run. ``local``:
    each seed in this process (`mvar.training.local`), else on Ray Train."""
    if cfg.run.repeats == 1:
        return [train(cfg, local)]
    if local:
        check_local(cfg)
    prep = prepare(cfg)  # once, before the group run is made: the seeds share every input
    storage = storage_location(cfg.run.storage_path)
    store = Store(cfg.tracking.uri)
    cfg.tracking.uri = store.uri
    group = group_key_of(cfg)
    group_id, found = attach_group(cfg, store, storage, group)
    seeds = seed_configs(cfg, group_id)
    print(f"group run {group_id} ({'found again' if found else 'new'}, mvar.group {group}): {len(seeds)} training "
          f"seeds ({', '.join(str(c.run.seed) for c in seeds)}) of '{cfg.run.name}', one after the other", flush=True)
    outcomes = []
    try:
        for one in seeds:
            outcome = finished_outcome(store, one, storage) or _train_checked(one, prep, group, local)
            outcomes.append(dataclasses.replace(outcome, group_run_id=group_id))
    except BaseException as err:
        _end_group(store, group_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    store.terminate(group_id, "FINISHED")
    return outcomes


def _end_group(store: Store, group_id: str, status: str) -> None:
    try:
        store.terminate(group_id, status)
    except Exception as err:  # noqa: BLE001 - never hide the seed's own error
        log.warning("MLflow: the group run %s was not marked %s: %s", group_id, status, err)
