"""The MLflow side of a sweep: one parent run per study, one child run per trial.

The parent (tags `mvar.study`, `mvar.sweep=parent`, `mvar.study_key` = storage#study) is found
again by a rerun of the same study. A child (tags `mvar.sweep=trial`, `mvar.trial` = the
trial's number, or for a retried trial the number of the trial it retries) is found again
the same way, so a retried trial keeps its child. The child links to the trial's training
run (tag `mvar.train_run_id`); the training run gets `mvar.study`, `mvar.trial` and
`mvar.sweep_run_id` back.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, replace

import yaml

from mvar import tracking
from mvar.config import to_dict
from mvar.tracking import MlflowTracker, TrackingConfig
from sweeps.study import StudyConfig

log = logging.getLogger(__name__)


@dataclass
class SweepTracking:
    cfg: TrackingConfig          # the base training config's store and experiment
    study_name: str
    study_key: str               # masked storage URL + '#' + study name
    parent_run_id: str = ""

    @property
    def uri(self) -> str:
        return self.cfg.uri


def _find(t: SweepTracking, tags: dict[str, str]) -> str | None:
    c = tracking.client(t.uri)
    exp = tracking.experiment_id(t.cfg.experiment, t.uri)
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    found = c.search_runs([exp], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1)
    return found[0].info.run_id if found else None


def parent_run(t: SweepTracking, study: StudyConfig, storage_shown: str, sampler: str) -> tuple[str, bool]:
    """(run id, found again?): the study's parent run, reopened on a rerun, else a new one."""
    found = _find(t, {"mvar.study_key": t.study_key, "mvar.sweep": "parent"})
    if found:
        tracking.client(t.uri).update_run(found, status="RUNNING")
        return found, True
    tags = {"mvar.study": study.study_name, "mvar.study_key": t.study_key, "mvar.sweep": "parent"}
    run_id = tracking.start_run(t.cfg, study.study_name, tags=tags)
    tr = MlflowTracker(run_id, t.cfg)
    tr.log_params({"study.name": study.study_name, "study.storage": storage_shown, "study.sampler": sampler,
                   "study.pruner": study.pruner.name, "study.n_trials": study.n_trials,
                   "study.base_config": study.base_config, "study.objectives": json.dumps(study.objectives),
                   "study.search_space": json.dumps(study.search_space)})
    tr.log_text(yaml.safe_dump(study.search_space, sort_keys=False), "search_space.yaml")
    tr.log_text(yaml.safe_dump(to_dict(study), sort_keys=False), "study.yaml")
    tr.close(status="")
    return run_id, False


def child_run(t: SweepTracking, trial_key: int, params: dict) -> str:
    """The child run of trial ``trial_key`` (the first attempt's number), made on its first attempt."""
    found = _find(t, {"mlflow.parentRunId": t.parent_run_id, "mvar.trial": str(trial_key)})
    if found:
        tracking.client(t.uri).update_run(found, status="RUNNING")
        return found
    tags = {"mvar.study": t.study_name, "mvar.sweep": "trial", "mvar.trial": str(trial_key)}
    run_id = tracking.start_run(replace(t.cfg, run_name=""), f"trial-{trial_key}", tags=tags,
                                parent_run_id=t.parent_run_id)
    tr = MlflowTracker(run_id, t.cfg)
    tr.log_params(params)
    tr.close(status="")
    return run_id


def link(t: SweepTracking, child_id: str, train_run_id: str, trial_key: int, optuna_number: int) -> None:
    c = tracking.client(t.uri)
    c.set_tag(child_id, "mvar.train_run_id", train_run_id)
    c.set_tag(child_id, "mvar.optuna_trial", str(optuna_number))
    for key, value in (("mvar.study", t.study_name), ("mvar.trial", str(trial_key)), ("mvar.sweep_run_id", child_id)):
        c.set_tag(train_run_id, key, value)


def finish_child(t: SweepTracking, child_id: str, state: str, metrics: dict[str, float] | None = None,
                 tags: dict[str, str] | None = None, curve: list[tuple[int, float]] = ()) -> None:
    """Objectives (and the evaluation's other numbers) as metrics; FINISHED, KILLED (pruned) or FAILED."""
    tr = MlflowTracker(child_id, replace(t.cfg, retry_s=min(t.cfg.retry_s, 60.0)))
    tr.set_tags({"mvar.trial_state": state, **(tags or {})})
    for step, value in curve:
        tr.log_metrics({"val/loss": value}, step)
    if metrics:
        tr.log_metrics(metrics, 0)
    tr.close(status={"COMPLETE": "FINISHED", "PRUNED": "KILLED"}.get(state, "FAILED"))


def finish_parent(t: SweepTracking, status: str, metrics: dict[str, float], tags: dict[str, str],
                  files: list) -> None:
    tr = MlflowTracker(t.parent_run_id, t.cfg)
    tr.set_tags(tags)
    tr.log_metrics(metrics, 0)
    for path in files:
        tr.log_artifact(path, "report")
    tr.close(status=status)
