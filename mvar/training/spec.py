"""What the driver needs to know of a training task: one ``TaskSpec`` each (`mvar.training.tasks`).

    from mvar.training.tasks import GENERATOR
    outcome = launch(GENERATOR, cfg)      # Ray Train (mvar.training.launch)
    outcome = run_local(GENERATOR, cfg)   # this process, one device (mvar.training.local)

A spec says how to build the task on a rank (the trainer core's ``TrainTask``), what to check
before any worker starts, how to tag its MLflow run, and what to do after the fit; the driver
(`mvar.training.driver`, with either backend) does everything else the same way for every task:
the MLflow run, the checkpoints in ``run.storage_path/run.name``, the resume, the final status.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


def _no_name(cfg) -> str:
    return ""


def _no_evaluator(cfg, run_id: str, run_dir: str):
    return None


def _by_val_loss(cfg) -> str:
    return "val/loss"


@dataclass(frozen=True)
class TaskSpec:
    name: str                      # 'generator', 'tokenizer'
    config_type: type              # the run config's dataclass (TrainConfig ...)
    # (cfg, device, rank, world) -> the TrainTask of one rank
    build_task: Callable[..., Any]
    # every check of the run's inputs (a UserError naming the key), before any worker starts; returns
    # what the workers need from them (the tokenizer's fingerprint ...), added to their config
    check: Callable[[Any], dict]
    # the tags of the task's MLflow runs (mvar.variant, mvar.model ...)
    tags: Callable[[Any], dict[str, str]]
    # the model registry name the final (and best) checkpoint is registered as; '' = none
    register_as: Callable[[Any], str] = _no_name
    # its versions hold an MLflow pyfunc (mvar.generator_pyfunc): mlflow.pyfunc.load_model(models:/NAME@final)
    loadable: bool = False
    # (cfg, outcome) -> outcome, after the run ended FINISHED (the tokenizer writes its `output`)
    after_fit: Callable[[Any, Any], Any] | None = None
    # (cfg, MLflow run id, run directory) -> what evaluates each checkpoint into the run
    # (`mvar.training.checkpoint_eval.CheckpointEvaluator`), or None: checkpoints are not evaluated
    evaluator: Callable[[Any, str, str], Any] = _no_evaluator
    # the metric of the checkpoints that `models:/NAME@best` follows (each in its direction: metric_names)
    best_by: Callable[[Any], str] = _by_val_loss
