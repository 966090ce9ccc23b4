"""Which MLflow run each evaluated setting is logged to, and the logging itself.

A training run carries the tag ``mvar.checkpoint`` (its final checkpoint directory); ``--run-id``
resolves the checkpoint through it and the results go into that run. Without ``--run-id`` an
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

from mvar import tracking
from mvar.errors import UserError
from mvar.tracking import MlflowTracker, TrackingConfig

log = logging.getLogger(__name__)

CHECKPOINT_TAG = "mvar.checkpoint"


def get_run(run_id: str, uri: str):
    c = tracking.client(uri)
    try:
        return c.get_run(run_id)
    except Exception as err:
        raise UserError(f"MLflow run '{run_id}' not found in {tracking.resolve_uri(uri)} "
                        f"({type(err).__name__}: {str(err)[:200]}); check --run-id and --tracking-uri") from err


def checkpoint_of_run(run_id: str, uri: str) -> str:
    """The run's `mvar.checkpoint` tag: the checkpoint directory its training finished with."""
    run = get_run(run_id, uri)
    path = run.data.tags.get(CHECKPOINT_TAG, "")
    if not path:
        raise UserError(f"MLflow run '{run_id}' has no '{CHECKPOINT_TAG}' tag (did its training finish a "
                        f"checkpoint?); pass --checkpoint DIR to evaluate a checkpoint directly")
    return path


def eval_key(params: dict) -> str:
    return hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _as_logged(params: dict) -> dict[str, str]:
    return {k: str(v) for k, v in params.items()}


def _find_run(c, experiment_ids: list[str], filters: dict[str, str]) -> str | None:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in filters.items())
    found = c.search_runs(experiment_ids, filter_string=query, order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


def base_run(cfg: TrackingConfig, run_id: str, checkpoint: str, tags: dict[str, str]) -> tuple[str, bool]:
    """(run id, created by this evaluation?): the given run, else the checkpoint's evaluation run."""
    if run_id:
        get_run(run_id, cfg.uri)
        return run_id, False
    c = tracking.client(cfg.uri)
    exp = tracking.experiment_id(cfg.experiment, cfg.uri)
    found = _find_run(c, [exp], {CHECKPOINT_TAG: checkpoint, "mvar.eval_run": "true"})
    if found:
        return found, True
    name = f"eval-{Path(checkpoint).name}"
    return tracking.start_run(cfg, name, tags={**tags, CHECKPOINT_TAG: checkpoint, "mvar.eval_run": "true"}), True


def setting_runs(cfg: TrackingConfig, base: str, params_per_setting: list[dict], names: list[str],
                 tags: dict[str, str]) -> list[str]:
    """The run of each setting: ``base`` itself when that keeps params immutable, else child runs."""
    c = tracking.client(cfg.uri)
    run = c.get_run(base)
    logged = {k: v for k, v in run.data.params.items() if k.startswith("eval.")}
    if len(params_per_setting) == 1 and (not logged or logged == _as_logged(params_per_setting[0])):
        return [base]
    exp_id = run.info.experiment_id
    child_cfg = replace(cfg, experiment=c.get_experiment(exp_id).name, run_name="")
    out = []
    for params, name in zip(params_per_setting, names):
        key = eval_key(params)
        found = _find_run(c, [exp_id], {"mlflow.parentRunId": base, "mvar.eval_key": key})
        out.append(found or tracking.start_run(child_cfg, f"eval-{name}", tags={**tags, "mvar.eval_key": key},
                                               parent_run_id=base))
    return out


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
    c = tracking.client(cfg.uri)
    for run_id in run_ids:
        try:
            c.set_terminated(run_id, status)
        except Exception as err:  # noqa: BLE001 - never hide the evaluation's own outcome
            log.warning("MLflow: could not mark run %s %s: %s", run_id, status, err)
