"""The driver's side of any training run, with either backend: checks, the MLflow run, the run's
directory, the end. No Ray here: `mvar.training.launch` adds Ray Train, `mvar.training.local` runs
the same in this process.

Order matters for users: every check that can fail on bad input (config, inputs, the tracking
store, the checkpoint a rerun resumes from) runs before any worker starts. The MLflow run is
created (or found again by its ``mvar.run_key``, ``run.storage_path/run.name``, for a rerun of the
same command) by the driver; the workers log into it by id, and checkpoints carry the id, so a
resumed run, on either backend, continues the same MLflow run. The run's directory in storage is
cleaned of checkpoints no run resumes from before the run starts and when it ends
(`mvar.training.run_dir`).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from mvar import cluster, tracking
from mvar.config import dump_yaml, flatten, to_dict
from mvar.data.loader import open_shard_set
from mvar.data.verify import check_shard_set
from mvar.data.manifest import describe, read_manifest
from mvar.data.storage import is_local
from mvar.errors import UserError
from mvar.tracking import Store
from mvar.training import run_dir as rundir
from mvar.training.config import RunConfig
from mvar.training.spec import TaskSpec

log = logging.getLogger(__name__)

BACKEND_TAG = "mvar.backend"  # ray | local: what ran the run's latest attempt


class TrainingFailed(UserError):
    """The run stopped: a non-finite loss, a full disk, or failures past the configured retries."""


@dataclass
class TrainOutcome:
    run_id: str
    checkpoint: str           # location of the final (or last good) checkpoint
    step: int
    status: str               # completed (a run that stopped raises TrainingFailed)
    seed: int = 0             # run.seed of the run
    group: str = ""           # its mvar.group tag (mvar.metrics.stats.group_key)
    group_run_id: str = ""    # the group run it is nested under (run.repeats > 1), else ''
    output: str = ""          # what the task wrote after the fit (the tokenizer's `output`), else ''


@dataclass
class FitResult:
    """What a backend's fit left: the latest checkpoint, the ones the run keeps, rank 0's return value."""

    checkpoint: str = ""                  # '' = none
    metrics: dict = field(default_factory=dict)     # those the latest checkpoint was reported with
    kept: list[tuple[str, dict]] = field(default_factory=list)  # (location, report metrics), oldest first
    returned: dict = field(default_factory=dict)    # {'status', 'step', 'ranks' ...}


def storage_location(path: str) -> str:
    """Ray Train needs an absolute path (or a URI) that every node and a later rerun share."""
    return str(Path(path).resolve()) if is_local(path) else path


def run_key(cfg: RunConfig, storage: str) -> str:
    return f"{storage.rstrip('/')}/{cfg.run.name}"


def check_one_run(cfg: RunConfig) -> None:
    """A driver trains one run; several training seeds are ``train_repeats``' (`mvar train --repeats`)."""
    if cfg.run.repeats != 1:
        raise UserError(f"run.repeats: {cfg.run.repeats} training seeds are trained by `mvar train` "
                        f"(mvar.training.train_repeats); this trains one run: set run.repeats=1")


# -- checks ------------------------------------------------------------------------

def resolve_epochs(cfg: RunConfig, num_samples: int) -> None:
    """``run.epochs`` -> ``run.steps`` = ceil(epochs x samples / global batch), in place (before Ray starts)."""
    if not cfg.run.epochs:
        return
    global_batch = cfg.data.batch_size * cfg.scaling.num_workers
    steps = math.ceil(cfg.run.epochs * num_samples / global_batch)
    cfg.run = dataclasses.replace(cfg.run, steps=steps)
    print(f"run.epochs {cfg.run.epochs:g} of {num_samples} samples at {global_batch} a step "
          f"(data.batch_size x scaling.num_workers): run.steps {steps}", flush=True)


def check_paths_in_job(cfg: RunConfig, keys: tuple[str, ...]) -> None:
    """The run's locations under ``keys`` (dotted config keys) and its tracking store, checked for a Ray job."""
    paths = {}
    for key in keys:
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        paths[key] = value
    cluster.check_job_paths(paths, cfg.tracking.uri)


def check_shard_sets(cfg: RunConfig, kind: str, tokenizer_px: int, tokenizer: str, image_size: int = 0,
                     fingerprint: str | None = None, num_classes: int = 0, fix: str = "") -> int:
    """Both shard sets (data.shards, data.eval_shards) of the run: holding ``kind`` (or 'auto') shards,
    their images ``tokenizer_px`` px (what ``tokenizer`` takes), their tokens of the tokenizer with
    ``fingerprint``, no more classes than ``num_classes`` (0: not checked); each error names its key and
    ``fix`` adds a way out. Returns the training set's sample count."""
    samples = 0
    for key, location in (("data.shards", cfg.data.shards), ("data.eval_shards", cfg.data.eval_shards)):
        if not location:
            continue
        try:
            manifest = open_shard_set(location, kind, image_size, fingerprint)
            check_shard_set(location, manifest, verify_checksums=cfg.data.verify_checksums,
                            opener=cfg.data.shard_opener)  # sizes, first samples, checksums: before any worker
        except UserError as err:
            raise UserError(f"{key}: {err}") from None
        if manifest.kind == "images" and manifest.image_size != tokenizer_px:
            raise UserError(f"{key}: '{location}' holds {manifest.image_size} px images but {tokenizer} takes "
                            f"{tokenizer_px} px{fix}")
        if num_classes and manifest.num_classes > num_classes:
            raise UserError(f"{key}: '{location}' has {manifest.num_classes} classes but model.num_classes "
                            f"is {num_classes}")
        if key == "data.shards":
            samples = manifest.num_samples
    return samples


def check_run_dir(cfg, storage: str) -> dict:
    """Before a worker starts: leftovers removed from the run's directory, and the checkpoint it resumes
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


# -- the MLflow run ----------------------------------------------------------------

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


@dataclass
class OpenRun:
    """A run ready for its workers: its store and MLflow run, and the workers' config."""

    store: Store
    run_id: str
    storage: str
    workers: dict         # the loop config of every worker: the spec, the config, the run id, run_dir ...
    evaluator: object = None  # what evaluates each checkpoint (spec.evaluator), None = nothing


def run_provenance(cfg: RunConfig, backend: str) -> dict[str, str]:
    """Device type, model and count, torch / CUDA / NCCL versions (mvar.provenance): the Ray workers' from
    ``scaling.*``, a local run's one device."""
    from mvar.provenance import provenance_tags, scaling_tags
    if backend == "ray":
        return scaling_tags(cfg.scaling)
    return provenance_tags("cuda" if cfg.scaling.use_gpu else "cpu", 1)


def open_run(spec: TaskSpec, cfg: RunConfig, checked: dict, tags: dict[str, str], backend: str) -> OpenRun:
    """The common start of a run on ``backend`` (ray | local) after ``spec.check``: the run directory
    checked, the MLflow run attached (tags: the spec's, then ``tags``), its config and datasets logged."""
    storage = storage_location(cfg.run.storage_path)
    workers_part = check_run_dir(cfg, storage)
    store = Store(cfg.tracking.uri)
    uri = cfg.tracking.uri = store.uri  # workers on other nodes must log to the same absolute store
    run_id, resumed = attach_run(cfg, store, storage, {**spec.tags(cfg), **tags})
    store.set_tags(run_id, {BACKEND_TAG: backend, **run_provenance(cfg, backend)})
    log_config(cfg, store, run_id, resumed)
    log_datasets(cfg, store, run_id)
    print(f"MLflow run {run_id} ({'resumed' if resumed else 'new'}) in {uri}; "
          f"checkpoints under {run_key(cfg, storage)}", flush=True)
    evaluator = spec.evaluator(cfg, run_id, run_key(cfg, storage))
    workers = {**checked, **workers_part, "spec": spec, "train": cfg, "run_id": run_id,
               "checkpoint_eval": evaluator is not None}  # rank 0 asks for each checkpoint's evaluation
    return OpenRun(store=store, run_id=run_id, storage=storage, workers=workers, evaluator=evaluator)


# -- the end -----------------------------------------------------------------------

def _checkpoint_metrics(metrics: dict) -> tuple[int, dict[str, float]]:
    """(step, the metrics a checkpoint was reported with: train/loss, val/* ...)."""
    numbers = {k: float(v) for k, v in metrics.items()
               if "/" in k and isinstance(v, (int, float)) and math.isfinite(float(v))}
    return int(metrics.get("step", 0)), numbers


def best_checkpoint(kept: list[tuple[str, dict]], best_by: str) -> tuple[float, str, dict] | None:
    """(value, location, metrics) of the kept checkpoint best by ``best_by`` (its direction from
    metric_names; the older of equals), or None when none of them has the metric."""
    from mvar.metric_names import BY_KEY
    sign = 1.0 if BY_KEY[best_by].lower_is_better else -1.0
    scored = [(float(m[best_by]), p, m) for p, m in kept
              if isinstance(m.get(best_by), (int, float)) and math.isfinite(float(m[best_by]))]
    if not scored:
        return None
    return min(scored, key=lambda x: sign * x[0])


def _beats(value: float, now: dict | None, run_id: str, best_by: str) -> bool:
    """Whether a version of ``value`` takes alias ``best`` from the version ``now`` names (one of this run's,
    or one without the metric, always yields)."""
    from mvar.metric_names import BY_KEY
    if now is None or now["run_id"] == run_id or best_by not in now:
        return True
    theirs = float(now[best_by])
    return value < theirs if BY_KEY[best_by].lower_is_better else value > theirs


def register_checkpoints(store: Store, run_id: str, name: str, result: FitResult, best_by: str = "val/loss",
                         loadable: bool = False) -> None:
    """The final checkpoint as a version of model ``name`` (alias ``final``; MLflow reserves ``latest`` for the
    newest version, ``models:/NAME/latest``), and the best by ``best_by`` (val/loss, or a metric of the
    checkpoints' evaluation: eval/fid ...) of the checkpoints the run keeps (``run.keep_checkpoints``) too
    (alias ``best``: moved only to a version better than the one the alias names now, or one of this run).
    ``loadable``: each version holds the checkpoint as an MLflow pyfunc. Registry trouble costs the versions,
    not the run."""
    kept, final = result.kept, result.checkpoint
    try:
        step, metrics = _checkpoint_metrics(next((m for p, m in kept if p == final), result.metrics))
        version = store.register_model(name, run_id, final, {"mvar.kind": "final"}, step, metrics, loadable)
        store.set_alias(name, "final", version)
        print(f"model registry: models:/{name}@final is version {version} (step {step})", flush=True)
        best = best_checkpoint(kept, best_by)
        if best is None:
            return
        value, path, best_metrics = best
        step, metrics = _checkpoint_metrics(best_metrics)
        version = store.register_model(name, run_id, path, {"mvar.kind": "best"}, step, metrics, loadable)
        if _beats(value, store.model_version(f"models:/{name}@best"), run_id, best_by):
            store.set_alias(name, "best", version)
            print(f"model registry: models:/{name}@best is version {version} (step {step}, {best_by} {value:.4g})",
                  flush=True)
    except Exception as err:  # noqa: BLE001 - the training itself succeeded
        log.warning("model registry: the checkpoints of run %s were not registered as '%s': %s", run_id, name, err)


def finish(store: Store, run_id: str, result: FitResult, register_as: str = "", best_by: str = "val/loss",
           loadable: bool = False) -> TrainOutcome:
    """The run's final tags and status from what the fit left; a run that stopped is a TrainingFailed."""
    ret, checkpoint = result.returned, result.checkpoint
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
        register_checkpoints(store, run_id, register_as, result, best_by, loadable)
    store.terminate(run_id, "FINISHED")
    return TrainOutcome(run_id=run_id, checkpoint=checkpoint, step=step, status=status)


def end_run(spec: TaskSpec, cfg: RunConfig, opened: OpenRun, result: FitResult) -> TrainOutcome:
    """``finish`` (registering the checkpoints as ``spec.register_as``), then the spec's ``after_fit``."""
    outcome = finish(opened.store, opened.run_id, result, spec.register_as(cfg), spec.best_by(cfg),
                     spec.loadable and cfg.tracking.register_pyfunc)
    return spec.after_fit(cfg, outcome) if spec.after_fit else outcome
