"""Training on Ray Train: the run config, the per-worker loop and the driver that launches it.

    from mvar.training import load_train_config, train
    outcome = train(load_train_config("workflows/configs/mvar_tiny_local.yaml", ["run.steps=20"]))

Imports ray and mlflow (unlike `mvar.models`); workflows/train.py is the entry point.
"""
from mvar.training.config import TrainConfig, load_train_config
from mvar.training.launch import TrainingFailed, TrainOutcome, train

__all__ = ["TrainConfig", "TrainOutcome", "TrainingFailed", "load_train_config", "train"]
