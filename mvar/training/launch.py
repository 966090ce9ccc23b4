"""The driver side of a training run: check everything, attach the MLflow run, run Ray Train, record the result.

Order matters for users: every check that can fail on bad input (config,
tokenizer, shards, resources, tracking store, the checkpoint a rerun resumes
from) runs before any Ray worker starts. The MLflow run is created (or found
again, for a rerun of the same command) by the driver; workers log into it by
id, and checkpoints carry the id, so a resumed run continues the same MLflow run.
The run's directory in storage is cleaned of checkpoints no run resumes from
before the run starts and when it ends (`mvar.training.run_dir`).

Training seeds (`run.repeats` N > 1, `train_repeats`): seeds run.seed + k, k < N, one after the
other, each a run of its own named `<name>-seed<seed>` (a rerun resumes each), nested under a group
run `<name>` (tags `mvar.group`, `mvar.group_run=true`) that a rerun finds again. Every generator run
carries `mvar.group` (runs that differ only in the seed share it) and `mvar.seed`.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

from mvar import cluster, faults, tracking
from mvar.config import dump_yaml, flatten, to_dict
from mvar.data.loader import open_shard_set
from mvar.data.manifest import describe, read_manifest
from mvar.data.storage import is_local
from mvar.data.verify import check_shard_set
from mvar.errors import UserError
from mvar.models.config import split_name
from mvar.tokenizer import TokenizerConfig
from mvar.tracking import Store
from mvar.training import run_dir as rundir
from mvar.training.config import RunConfig, TrainConfig

log = logging.getLogger(__name__)


class TrainingFailed(UserError):
    """The run stopped: a non-finite loss, a full disk, or failures past the configured retries."""


@dataclass
class Prepared:
    tok_cfg: TokenizerConfig
    tokenizer_sha256: str


@dataclass
class TrainOutcome:
    run_id: str
    checkpoint: str           # location of the final (or last good) checkpoint
    step: int
    status: str               # completed (a run that stopped raises TrainingFailed)
    seed: int = 0             # run.seed of the run
    group: str = ""           # its mvar.group tag (mvar.metrics.stats.group_key)
    group_run_id: str = ""    # the group run it is nested under (run.repeats > 1), else ''


def storage_location(path: str) -> str:
    """Ray Train needs an absolute path (or a URI) that every node and a later rerun share."""
    return str(Path(path).resolve()) if is_local(path) else path


def _check_tokenizer(cfg: TrainConfig) -> tuple[TokenizerConfig, str]:
    from mvar.checkpoint import read_tokenizer_config, tokenizer_fingerprint
    tok_cfg = read_tokenizer_config(cfg.tokenizer)
    cfg.check_scales(tuple(tok_cfg.patch_nums))
    return tok_cfg, tokenizer_fingerprint(cfg.tokenizer)


def resolve_epochs(cfg: RunConfig, num_samples: int) -> None:
    """``run.epochs`` -> ``run.steps`` = ceil(epochs x samples / global batch), in place (before Ray starts)."""
    if not cfg.run.epochs:
        return
    global_batch = cfg.data.batch_size * cfg.scaling.num_workers
    steps = math.ceil(cfg.run.epochs * num_samples / global_batch)
    cfg.run = dataclasses.replace(cfg.run, steps=steps)
    print(f"run.epochs {cfg.run.epochs:g} of {num_samples} samples at {global_batch} a step "
          f"(data.batch_size x scaling.num_workers): run.steps {steps}", flush=True)


def _check_shards(cfg: TrainConfig, tok_cfg: TokenizerConfig, sha: str) -> int:
    """Checks both shard sets against the tokenizer and model; returns the training set's sample count."""
    samples = 0
    for key, location in (("data.shards", cfg.data.shards), ("data.eval_shards", cfg.data.eval_shards)):
        if not location:
            continue
        try:
            manifest = open_shard_set(location, cfg.data.kind, cfg.data.image_size, sha)
            check_shard_set(location, manifest, verify_checksums=cfg.data.verify_checksums,
                            opener=cfg.data.shard_opener)
        except UserError as err:
            raise UserError(f"{key}: {err}") from None
        if manifest.kind == "images" and manifest.image_size != tok_cfg.image_size:
            raise UserError(f"{key}: '{location}' holds {manifest.image_size} px images but the tokenizer "
                            f"'{cfg.tokenizer}' takes {tok_cfg.image_size} px")
        if manifest.num_classes > cfg.model.num_classes:
            raise UserError(f"{key}: '{location}' has {manifest.num_classes} classes but model.num_classes "
                            f"is {cfg.model.num_classes}")
        if key == "data.shards":
            samples = manifest.num_samples
    return samples


def _check_init_from(cfg: TrainConfig) -> None:
    if not cfg.init_from:
        return
    from mvar.checkpoint import read_model_config
    theirs = read_model_config(cfg.init_from)
    for attr in ("depth", "width", "heads", "num_classes"):
        if getattr(theirs, attr) != getattr(cfg.model, attr):
            raise UserError(f"init_from: '{cfg.init_from}' has {attr} {getattr(theirs, attr)}, "
                            f"this run's model has {getattr(cfg.model, attr)}")


def check_paths_in_job(cfg: RunConfig, keys: tuple[str, ...]) -> None:
    """The run's locations under ``keys`` (dotted config keys) and its tracking store, checked for a Ray job."""
    paths = {}
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        paths[key] = value
    cluster.check_job_paths(paths, cfg.tracking.uri)


JOB_PATH_KEYS = ("tokenizer", "init_from", "data.shards", "data.eval_shards", "run.storage_path")


def prepare(cfg: TrainConfig) -> Prepared:
    """Every check on the run's inputs; raises UserError naming the key before anything starts."""
    check_paths_in_job(cfg, JOB_PATH_KEYS)
    tok_cfg, sha = _check_tokenizer(cfg)
    resolve_epochs(cfg, _check_shards(cfg, tok_cfg, sha))
    _check_init_from(cfg)
    return Prepared(tok_cfg=tok_cfg, tokenizer_sha256=sha)


def check_resources(cfg: RunConfig, where: str) -> None:
    """On a local Ray a worker that asks for more than the machine has waits forever: refuse instead."""
    have = cluster.cluster_resources()
    s = cfg.scaling
    wants = {"CPU": s.num_workers * s.cpus_per_worker}
    if s.use_gpu:
        wants["GPU"] = s.num_workers * s.gpus_per_worker
    for res, n in wants.items():
        if have.get(res, 0) + 1e-9 < n:
            msg = (f"scaling: {s.num_workers} workers need {n:g} {res} in all but the {where} Ray cluster has "
                   f"{have.get(res, 0):g}; lower scaling.num_workers or scaling.{res.lower()}s_per_worker")
            if where == "local":
                raise UserError(msg)
            log.warning("%s (waiting for the cluster to grow)", msg)


def run_key(cfg: RunConfig, storage: str) -> str:
    return f"{storage.rstrip('/')}/{cfg.run.name}"


def model_tags(cfg: TrainConfig) -> dict[str, str]:
    size = split_name(cfg.model_name)[1] if cfg.model_name else f"d{cfg.model.depth}"
    return {"mvar.variant": cfg.variant, "mvar.model": f"{cfg.variant}-{size}", "mvar.size": size}


def attach_run(cfg: RunConfig, store: Store, storage: str, tags: dict[str, str]) -> tuple[str, bool]:
    """(MLflow run id, resumed?): the run of an earlier attempt of this run name and storage, else a new one;
    nested under ``tracking.parent_run_id`` when set (a sweep's trial: found again under the same parent)."""
    tags = {"mvar.ray_job_id": cluster.job_id() or "none", "mvar.storage": storage, **tags}
    return store.find_or_create(cfg.tracking.experiment, {"mvar.run_key": run_key(cfg, storage)},
                                cfg.tracking.run_name or cfg.run.name, tags, parent=cfg.tracking.parent_run_id or None)


def log_config(cfg: RunConfig, store: Store, run_id: str, resumed: bool) -> None:
    """A new run gets the config as params and config.yaml; a resumed one counts the resume."""
    if resumed:
        run = store.get(run_id)
        changed = {k: (run.params[k], str(v)) for k, v in flatten(cfg).items()
                   if k in run.params and run.params[k] != str(v)}
        if changed:
            log.warning("resuming with changed config (MLflow keeps the first values): %s", changed)
        store.set_tags(run_id, {"mvar.resumes": int(run.tags.get("mvar.resumes", "0")) + 1})
        return
    t = tracking.MlflowTracker(run_id, cfg.tracking)
    t.log_params(to_dict(cfg))
    t.log_text(dump_yaml(cfg), "config.yaml")
    t.close(status="")


def log_datasets(cfg: RunConfig, store: Store, run_id: str) -> None:
    """The run's shard sets as its MLflow datasets (training: data.shards, evaluation: data.eval_shards)."""
    records = [tracking.DatasetRecord(**describe(read_manifest(loc), storage_location(loc)), context=context)
               for context, loc in (("training", cfg.data.shards), ("evaluation", cfg.data.eval_shards)) if loc]
    try:
        store.log_inputs(run_id, records)
    except Exception as err:  # noqa: BLE001 - a convenience of the UI, never the run's end
        log.warning("MLflow: the run's datasets were not logged: %s", err)


def fit(cfg: RunConfig, worker_fn, loop_config: dict, storage: str):
    """Ray Train's TorchTrainer with the run's scaling, storage, checkpoint retention and failure budget."""
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
    # rank 0 prints the run's progress (mvar.training.ray_worker)
    logging_config = LoggingConfig(log_level="INFO" if cluster.verbose() else "WARNING")
    trainer = TorchTrainer(
        worker_fn, train_loop_config=loop_config, torch_config=torch_config(s),
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources,
                                     placement_strategy=s.placement_strategy),
        run_config=RunConfig(name=cfg.run.name, storage_path=storage, logging_config=logging_config,
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
                             failure_config=FailureConfig(max_failures=cfg.run.max_failures)))
    return trainer.fit()


def _checkpoint_metrics(metrics: dict) -> tuple[int, dict[str, float]]:
    """(step, the metrics a checkpoint was reported with: train/loss, val/* ...)."""
    numbers = {k: float(v) for k, v in metrics.items()
               if "/" in k and isinstance(v, (int, float)) and math.isfinite(float(v))}
    return int(metrics.get("step", 0)), numbers


def register_checkpoints(store: Store, run_id: str, name: str, result) -> None:
    """The final checkpoint as a version of model ``name`` (alias ``final``; MLflow reserves ``latest`` for the
    newest version, ``models:/NAME/latest``), and the best by val/loss of
    the checkpoints the run keeps (``run.keep_checkpoints``) too (alias ``best``: moved only to a version with
    a lower val/loss than the alias names now, or one of this run). Registry trouble costs the versions, not
    the run."""
    kept = [(c.path, m or {}) for c, m in (getattr(result, "best_checkpoints", None) or [])]
    final = result.checkpoint.path
    try:
        step, metrics = _checkpoint_metrics(next((m for p, m in kept if p == final), result.metrics or {}))
        version = store.register_model(name, run_id, final, {"mvar.kind": "final"}, step, metrics)
        store.set_alias(name, "final", version)
        print(f"model registry: models:/{name}@final is version {version} (step {step})", flush=True)
        scored = [(m["val/loss"], p, m) for p, m in kept if isinstance(m.get("val/loss"), (int, float))]
        if not scored:
            return
        loss, path, best_metrics = min(scored, key=lambda x: x[0])
        step, metrics = _checkpoint_metrics(best_metrics)
        version = store.register_model(name, run_id, path, {"mvar.kind": "best"}, step, metrics)
        now = store.model_version(f"models:/{name}@best")
        if now is None or now["run_id"] == run_id or loss < float(now.get("val/loss", "inf")):
            store.set_alias(name, "best", version)
            print(f"model registry: models:/{name}@best is version {version} (step {step}, val/loss {loss:.4g})",
                  flush=True)
    except Exception as err:  # noqa: BLE001 - the training itself succeeded
        log.warning("model registry: the checkpoints of run %s were not registered as '%s': %s", run_id, name, err)


def finish(store: Store, run_id: str, result, register_as: str = "") -> TrainOutcome:
    ret = getattr(result, "return_value", None) or {}
    checkpoint = result.checkpoint.path if result.checkpoint is not None else ""
    if checkpoint:
        store.set_tags(run_id, {tracking.CHECKPOINT_TAG: checkpoint})
    if ret.get("ranks"):  # [first step, last step, batches drawn] of the last attempt, per rank
        store.set_tags(run_id, {"mvar.steps_by_rank": json.dumps(ret["ranks"])})
    status = ret.get("status", "completed")
    step = int(ret.get("step", 0))
    stopped = {"nonfinite": f"training stopped at step {step}: the loss or a gradient is NaN/inf (try a lower "
                            f"optim.lr or optim.grad_clip); last good checkpoint: {checkpoint or 'none'}",
               "disk_full": f"training stopped at the checkpoint of step {step}: {ret.get('message', '')}; the last "
                            f"complete checkpoint is {checkpoint or 'none'}: free space and rerun the same "
                            f"command to resume from it"}
    if status in stopped:
        store.set_tags(run_id, {"mvar.stopped": f"{status} at step {step}"})
        store.terminate(run_id, "FAILED")
        raise TrainingFailed(stopped[status])
    if checkpoint and register_as:
        register_checkpoints(store, run_id, register_as, result)
    store.terminate(run_id, "FINISHED")
    return TrainOutcome(run_id=run_id, checkpoint=checkpoint, step=step, status=status)


def check_run_dir(cfg, storage: str) -> dict:
    """Before Ray starts: leftovers removed from the run's directory, and the checkpoint it resumes
    from checked (a damaged one passed over for the newest complete one). Returns the workers' part."""
    if not is_local(storage):
        return {}  # an object store: Ray Train's own handling (mvar.training.run_dir)
    run_dir = Path(run_key(cfg, storage))
    rundir.prune(run_dir)
    point = rundir.resume_point(run_dir)
    for name, problem in point.damaged.items():
        print(f"checkpoint {name} is damaged ({problem}); the run resumes from {point.start} "
              f"(step {point.step})", flush=True)
    return {"run_dir": str(run_dir), "skip_checkpoints": sorted(point.damaged), "resume_from": point.start}


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


def launch(cfg: RunConfig, worker_fn, loop_config: dict, tags: dict[str, str], register_as: str = "") -> TrainOutcome:
    """Attach the MLflow run, start or join Ray, fit, record the final checkpoint (and register it, and the
    best, as versions of model ``register_as`` when given).

    ``worker_fn`` receives ``loop_config`` plus ``train`` (the config itself: Ray's pickling is its one
    serialisation, and the worker does not validate it again) and ``run_id``.
    """
    check_one_run(cfg)
    storage = storage_location(cfg.run.storage_path)
    workers_part = check_run_dir(cfg, storage)
    store = Store(cfg.tracking.uri)
    uri = cfg.tracking.uri = store.uri  # workers on other nodes must log to the same absolute store
    run_id, resumed = attach_run(cfg, store, storage, tags)
    from mvar.provenance import scaling_tags  # the workers' device type and count, the torch build (mvar.provenance)
    store.set_tags(run_id, scaling_tags(cfg.scaling))
    log_config(cfg, store, run_id, resumed)
    log_datasets(cfg, store, run_id)
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {uri}; "
          f"checkpoints under {run_key(cfg, storage)}", flush=True)
    where = cluster.connect(env_vars={"MLFLOW_TRACKING_URI": uri, "RAY_USAGE_STATS_ENABLED": "0",
                                      "MLFLOW_DISABLE_TELEMETRY": "true", **faults.forwarded_env()})
    check_resources(cfg, where)
    s = cfg.scaling
    gpus = f", {s.gpus_per_worker:g} GPU" if s.use_gpu else ""
    print(f"Ray Train: {s.num_workers} workers ({s.cpus_per_worker:g} CPU{gpus} each) on the {where} Ray; "
          f"{cfg.run.steps} steps", flush=True)
    loop_config = {**loop_config, **workers_part, "train": cfg, "run_id": run_id}
    try:
        result = fit(cfg, worker_fn, loop_config, storage)
    except Exception as err:
        from ray.train import TrainingFailedError
        if isinstance(err, TrainingFailedError):
            store.terminate(run_id, "FAILED")
            raise TrainingFailed(f"training failed after {cfg.run.max_failures} retries: {worker_error(err)} "
                                 f"(Ray's report is above)") from err
        raise
    finally:
        if workers_part:
            rundir.prune(Path(workers_part["run_dir"]))
    return finish(store, run_id, result, register_as)


def check_one_run(cfg: RunConfig) -> None:
    """``launch`` trains one run; several training seeds are ``train_repeats``' (`mvar train --repeats`)."""
    if cfg.run.repeats != 1:
        raise UserError(f"run.repeats: {cfg.run.repeats} training seeds are trained by `mvar train` "
                        f"(mvar.training.train_repeats); this trains one run: set run.repeats=1")


def group_key_of(cfg: TrainConfig) -> str:
    """The run's ``mvar.group``: ``mvar.metrics.stats.group_key`` of its params as MLflow logs them."""
    from mvar.metrics.stats import group_key
    return group_key({k: str(v) for k, v in flatten(to_dict(cfg)).items()})


def _train_checked(cfg: TrainConfig, prep: Prepared, group: str) -> TrainOutcome:
    """The generator's Ray Train run of a checked ``cfg``, tagged with its group and seed."""
    from mvar.training.loop import train_worker
    tags = {**model_tags(cfg), "mvar.group": group, "mvar.seed": str(cfg.run.seed)}
    outcome = launch(cfg, train_worker, {"tokenizer_sha256": prep.tokenizer_sha256}, tags, tags["mvar.model"])
    return dataclasses.replace(outcome, seed=cfg.run.seed, group=group)


def train(cfg: TrainConfig) -> TrainOutcome:
    """Check every input, then train the generator with Ray Train: one run (``run.repeats`` 1)."""
    check_one_run(cfg)
    prep = prepare(cfg)
    return _train_checked(cfg, prep, group_key_of(cfg))


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
    outcome, without a Ray Train start; else None."""
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


def train_repeats(cfg: TrainConfig) -> list[TrainOutcome]:
    """``run.repeats`` training seeds of ``cfg`` (run.seed + k), one after the other, each its own run nested
    under the group run, which ends FINISHED when every seed has. One outcome per seed, in seed order; each
    names the group run (``group_run_id``). With run.repeats 1: ``[train(cfg)]``, no group run."""
    if cfg.run.repeats == 1:
        return [train(cfg)]
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
            outcome = finished_outcome(store, one, storage) or _train_checked(one, prep, group)
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
