"""The MLflow side of a sweep: one parent run per study; each trial's training run is its child.

The parent (tags `mvar.study`, `mvar.sweep=parent`, `mvar.study_key` = storage#study) is found
again by a rerun of the same study. A trial's training process gets the parent's id
(`tracking.parent_run_id`), so its driver makes the training run nested under the parent (or
finds it again there by its `mvar.run_key`: a retried trial, or a rerun of the sweep, continues
the same run, with its curves). When the trial ends, the run gets the tags `mvar.sweep=trial`,
`mvar.trial` (the first attempt's number), `mvar.optuna_trial`, `mvar.trial_state`.
With repeats the trial's run is the seeds' group run (made by the training driver under the
parent): it gets those tags and the seeds' aggregates (`eval_fid_mean` ...), each seed's run
`mvar.sweep=seed` and `mvar.trial`.
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
    budget: str = "steps"        # what its trials hold equal (tag mvar.budget): run.steps, unless searched over

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


def finish_trial(t: SweepTracking, train_run_id: str, trial_key: int, optuna_number: int, state: str,
                 metrics: dict[str, float] | None = None, aggregates: dict[str, float] | None = None,
                 seed_run_ids: list[str] = ()) -> None:
    """The trial's training run (nested under the parent since its driver made it) gets the trial's tags and
    the sweep's timings; its objectives are its own metrics already (training, evaluation). A group run
    gets its seeds' ``aggregates``, the seeds' runs their trial's tags. A pruned run was marked KILLED when
    it was stopped; the training driver set the status of every other one."""
    store = Store(t.uri)
    store.set_tags(train_run_id, {"mvar.study": t.study_name, "mvar.sweep": "trial", "mvar.trial": trial_key,
                                  "mvar.optuna_trial": optuna_number, "mvar.trial_state": state,
                                  "mvar.budget": t.budget})
    for run_id in seed_run_ids:
        store.set_tags(run_id, {"mvar.study": t.study_name, "mvar.sweep": "seed", "mvar.trial": trial_key,
                                "mvar.budget": t.budget})
    logged = {**{k: v for k, v in (metrics or {}).items() if k.startswith("sweep/")}, **(aggregates or {})}
    if logged:
        tr = MlflowTracker(train_run_id, replace(t.cfg, retry_s=min(t.cfg.retry_s, 60.0)))
        tr.log_metrics(logged, 0)
        tr.close(status="")


def finish_parent(t: SweepTracking, status: str, metrics: dict[str, float], tags: dict[str, str],
                  files: list) -> None:
    tr = MlflowTracker(t.parent_run_id, t.cfg)
    tr.set_tags(tags)
    tr.log_metrics(metrics, 0)
    for path in files:
        tr.log_artifact(path, "report")
    tr.close(status=status)
