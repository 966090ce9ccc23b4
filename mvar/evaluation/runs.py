"""Which MLflow run each evaluated setting is logged to, and the logging itself.

A training run carries the tag ``mvar.checkpoint`` (its final checkpoint directory); ``--run-id``
resolves the checkpoint through it and the results go into that run. ``--model models:/NAME@ALIAS``
resolves it through the model registry (the version's checkpoint) and is evaluated as ``--checkpoint``. Without ``--run-id`` an
evaluation run ``eval-<checkpoint name>`` is made (and found again by a rerun of the same
command). MLflow params are immutable, so one setting goes into the run itself only when the
run has no ``eval.*`` params yet or exactly these; otherwise (several settings, or another one
than already logged) each setting gets a child run (tag ``mlflow.parentRunId``), found again
on reruns through its ``mvar.eval_key`` tag.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import replace
from pathlib import Path

from mvar.errors import UserError
from mvar.files import file_sha256
from mvar.tracking import (
    CHECKPOINT_TAG,
    DatasetRecord,
    MlflowTracker,
    RunRecord,
    Store,
    TrackingConfig,
)

log = logging.getLogger(__name__)


def get_run(run_id: str, uri: str) -> RunRecord:
    try:
        return Store(uri).get(run_id)
    except UserError as err:
        raise UserError(f"{err}; check --run-id and --tracking-uri") from err


def checkpoint_of_run(run_id: str, uri: str) -> str:
    """The run's `mvar.checkpoint` tag: the checkpoint directory its training finished with."""
    path = get_run(run_id, uri).tags.get(CHECKPOINT_TAG, "")
    if not path:
        raise UserError(f"MLflow run '{run_id}' has no '{CHECKPOINT_TAG}' tag (did its training finish a "
                        f"checkpoint?); pass --checkpoint DIR to evaluate a checkpoint directly")
    return path


def checkpoint_of_model(model_uri: str, uri: str) -> str:
    """The checkpoint directory a registered model version (``models:/NAME@ALIAS``, ``models:/NAME/VERSION``)
    points at; a UserError naming the model when the store does not know it."""
    return Store(uri).resolve_model(model_uri)


HASHED_BYTES = 1 << 29   # a reference file up to 512 MiB is hashed for its dataset digest; a larger one by size


def reference_dataset(location: str) -> DatasetRecord:
    """The evaluation's reference as an MLflow dataset: a shard set by its manifest, an .npz file by its bytes."""
    from mvar.data.manifest import describe, read_manifest
    from mvar.data.storage import is_local
    if not location.endswith(".npz"):
        return DatasetRecord(**describe(read_manifest(location), location), context="evaluation")
    path = Path(location).resolve() if is_local(location) else Path(location)
    size = path.stat().st_size
    digest = (file_sha256(path) if size <= HASHED_BYTES
              else hashlib.sha256(f"{path.name}:{size}".encode()).hexdigest())
    return DatasetRecord(path.name, digest[:16], str(path), {"kind": "npz", "num_bytes": size}, "evaluation")


def log_reference(cfg: TrackingConfig, run_ids: list[str], location: str) -> None:
    """The reference as the dataset of each run the evaluation logs to; trouble costs the record only."""
    try:
        record = reference_dataset(location)
        store = Store(cfg.uri)
        for run_id in sorted(set(run_ids)):
            store.log_inputs(run_id, [record])
    except Exception as err:  # noqa: BLE001 - a convenience of the UI, never the evaluation's end
        log.warning("MLflow: the reference '%s' was not logged as a dataset: %s", location, err)


def eval_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_logged(params: dict) -> dict[str, str]:
    return {k: str(v) for k, v in params.items()}


def base_run(cfg: TrackingConfig, run_id: str, checkpoint: str, tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, created by this evaluation?): the given run, else the checkpoint's evaluation run."""
    if run_id:
        get_run(run_id, cfg.uri)
        return run_id, False
    found, _ = Store(cfg.uri).find_or_create(cfg.experiment, {CHECKPOINT_TAG: checkpoint, "mvar.eval_run": "true"},
                                             cfg.run_name or f"eval-{Path(checkpoint).name}", tags)
    return found, True


def setting_runs(cfg: TrackingConfig, base: str, params_per_setting: list[dict], names: list[str],
                 tags: dict[str, str]) -> list[str]:
    """The run of each setting: ``base`` itself when that keeps params immutable, else child runs."""
    store = Store(cfg.uri)
    run = store.get(base)
    logged = {k: v for k, v in run.params.items() if k.startswith("eval.")}
    if len(params_per_setting) == 1 and (not logged or logged == _as_logged(params_per_setting[0])):
        return [base]
    experiment = store.experiment_name(run.experiment_id)
    return [store.find_or_create(experiment, {"mvar.eval_key": eval_key(params)}, f"eval-{name}", tags,
                                 parent=base)[0]
            for params, name in zip(params_per_setting, names)]


def log_setting(cfg: TrackingConfig, run_id: str, params: dict, tags: dict, metrics: dict[str, float], step: int,
                artifacts: list[tuple[Path, str]], finish: bool) -> None:
    """Params, tags, metrics and artifacts of one setting; ``finish`` marks a run this evaluation made FINISHED."""
    t = MlflowTracker(run_id, replace(cfg, retry_s=min(cfg.retry_s, 60.0)))
    t.log_params(params)
    t.set_tags({**tags, "mvar.eval_key": eval_key(params)})
    t.log_metrics(metrics, step)
    for path, artifact_dir in artifacts:
        t.log_artifact(path, artifact_dir)
    t.close(status="FINISHED" if finish else "")
    if t.failures:
        log.warning("MLflow (%s): %d failed calls while logging run %s (see above); the samples and "
                    "metrics.json stay on disk", t.uri, t.failures, run_id)


def terminate(cfg: TrackingConfig, run_ids: list[str], status: str) -> None:
    if not run_ids:
        return
    store = Store(cfg.uri)
    for run_id in run_ids:
        try:
            store.terminate(run_id, status)
        except Exception as err:  # noqa: BLE001 - never hide the evaluation's own outcome
            log.warning("MLflow: could not mark run %s %s: %s", run_id, status, err)
