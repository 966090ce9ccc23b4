"""Training: the run config, a trainer core in plain PyTorch, and the Ray Train driver around it.

    from mvar.training import load_train_config, train
    outcome = train(load_train_config("workflows/configs/mvar_tiny_local.yaml", ["run.steps=20"]))
    outcomes = train_repeats(load_train_config(..., ["run.repeats=3"]))   # seeds 0, 1, 2 under a group run

`trainer` (Trainer, TrainTask, Hooks) runs without Ray or MLflow; `loop` (GeneratorTask) and
`tokenizer_loop` (TokenizerTask) are its tasks; `ray_worker` adapts it to Ray Train; `launch`
checks the inputs and runs it; `run_dir` knows the run's directory in Ray Train storage (which
checkpoints Ray registered, leftovers, the resume point). workflows/train.py is the entry point.
"""
from mvar.training.config import TrainConfig, load_train_config
from mvar.training.launch import TrainingFailed, TrainOutcome, train, train_repeats

__all__ = ["TrainConfig", "TrainOutcome", "TrainingFailed", "load_train_config", "train", "train_repeats"]
