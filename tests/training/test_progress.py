"""What rank 0 prints at each log step and checkpoint (the console line of a training run)."""
from __future__ import annotations

from mvar.training.worker import checkpoint_line, progress_line


def test_progress_line_has_step_loss_lr_speed_and_eta(progress_line_pattern):
    metrics = {"train/loss": 2.805523, "train/lr": 1e-3, "perf/step_s": 0.25, "perf/images_per_s": 128.0,
               "train/acc": 0.5}
    line = progress_line(20, 500, metrics)
    assert line == "step 20/500 (4%)  loss 2.8055  lr 1.00e-03  0.250 s/step  128.0 images/s  ETA 0:02:00"
    assert progress_line_pattern.fullmatch(line)  # what the tests of real runs look for
    hours = progress_line(1, 40001, {**metrics, "perf/step_s": 1.0})
    assert hours.endswith("ETA 11:06:40")


def test_checkpoint_line_names_the_checkpoint_and_the_validation_metrics():
    line = checkpoint_line(40, 40, "step_00000040", {"step": 40, "train/loss": 1.9, "val/loss": 2.12341, "val/acc": 0.25})
    assert line == "step 40/40: checkpoint step_00000040, val/acc 0.2500, val/loss 2.1234"
    assert checkpoint_line(20, 40, "step_00000020", {"step": 20}) == "step 20/40: checkpoint step_00000020"
