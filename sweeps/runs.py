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

from mvar.config import to_dict
from mvar.tracking import MlflowTracker, Store, TrackingConfig
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


def parent_run(t: SweepTracking, study: StudyConfig, storage_shown: str, sampler: str) -> tuple[str, bool]:
    """(run id, found again?): the study's parent run, reopened on a rerun, else a new one."""
    store = Store(t.uri)
    run_id, found = store.find_or_create(t.cfg.experiment, {"mvar.study_key": t.study_key, "mvar.sweep": "parent"},
                                         t.cfg.run_name or study.study_name, {"mvar.study": study.study_name},
                                         oldest=True)
    if found:
        store.reopen(run_id)
        return run_id, True
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
    store = Store(t.uri)
    run_id, found = store.find_or_create(t.cfg.experiment, {"mvar.trial": str(trial_key)}, f"trial-{trial_key}",
                                         {"mvar.study": t.study_name, "mvar.sweep": "trial"},
                                         parent=t.parent_run_id, oldest=True)
    if found:
        store.reopen(run_id)
        return run_id
    tr = MlflowTracker(run_id, t.cfg)
    tr.log_params(params)
    tr.close(status="")
    return run_id


def link(t: SweepTracking, child_id: str, train_run_id: str, trial_key: int, optuna_number: int) -> None:
    store = Store(t.uri)
    store.set_tags(child_id, {"mvar.train_run_id": train_run_id, "mvar.optuna_trial": optuna_number})
    store.set_tags(train_run_id, {"mvar.study": t.study_name, "mvar.trial": trial_key, "mvar.sweep_run_id": child_id})


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
