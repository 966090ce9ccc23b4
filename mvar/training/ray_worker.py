"""The Ray Train adapter around the trainer core: what one Ray worker adds to `Trainer.run`.

It supplies the rank, world size and device of Ray Train's context, the rank's share
of the shards, the restore from Ray Train's latest checkpoint (model, optimizer,
schedule, scaler, step: the data position is the step), DDP, the MLflow tracker
(rank 0 logs into the driver's run; a restarted run skips the steps already logged)
and `ray.train.report` at each checkpoint (every rank calls it the same number of
times; rank 0 attaches the checkpoint directory that Ray Train persists).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from mvar.config import from_dict
from mvar.data import build_train_loader
from mvar.tracking import MlflowTracker, NullTracker
from mvar.training.trainer import Hooks, Trainer, TrainTask, batches, enable_tf32

log = logging.getLogger(__name__)
# rank 0's progress lines: a logger, as Ray Train sends a worker's prints to its root logger anyway (and,
# where something has wrapped sys.stdout, to the stream as well: each line twice)
progress = logging.getLogger("mvar.progress")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """One console line of a log step from its interval metrics: step/total, loss, lr, speed and ETA
    (the steps left at this interval's seconds per step)."""
    step_s = metrics.get("perf/step_s", 0.0)
    parts = [f"step {step}/{total} ({100 * step / total:.0f}%)"]
    if "train/loss" in metrics:
        parts.append(f"loss {metrics['train/loss']:.4f}")
    if "train/lr" in metrics:
        parts.append(f"lr {metrics['train/lr']:.2e}")
    parts += [f"{step_s:.3f} s/step", f"{metrics.get('perf/images_per_s', 0.0):.1f} images/s",
              f"ETA {_duration((total - step) * step_s)}"]
    return "  ".join(parts)


def checkpoint_line(step: int, total: int, report: dict[str, float]) -> str:
    vals = "".join(f", {k} {v:.4f}" for k, v in sorted(report.items()) if k.startswith("val/"))
    return f"step {step}/{total}: checkpoint step_{step:08d}{vals}"


class RayHooks(Hooks):
    """Metrics to the run's tracker (rank 0), checkpoints to Ray Train, epoch and bad samples of the loader.
    Rank 0 also prints a progress line at each log step and checkpoint: worker output reaches the
    driver's console and `ray job logs`."""

    def __init__(self, tracker, rank: int, loader, run_id: str, run_name: str, total_steps: int = 0):
        self.tracker, self.rank, self.loader, self.run_id, self.run_name = tracker, rank, loader, run_id, run_name
        self.total_steps = total_steps

    def data_metrics(self, step: int) -> dict[str, float]:
        return {"train/epoch": step / len(self.loader), "data/bad_samples": float(self.loader.bad_samples.value)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.rank == 0 and self.total_steps and "perf/step_s" in metrics:  # interval metrics, not val/*
            progress.info(progress_line(step, self.total_steps, metrics))

    def checkpoint(self, trainer: Trainer, step: int, report: dict[str, float]) -> None:
        import ray.train
        name = f"step_{step:08d}"
        if self.rank != 0:
            ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
            return
        if self.total_steps:
            progress.info(checkpoint_line(step, self.total_steps, report))
        # the metrics of every step up to this one reach MLflow before the checkpoint exists: a run
        # resumed from it (after a worker was killed) would not compute those steps again
        self.tracker.flush()
        n = len(self.loader)
        meta = {"epoch": step // n, "batch_in_epoch": step % n, "steps_per_epoch": n,
                "mlflow_run_id": self.run_id, "run_name": self.run_name}
        with tempfile.TemporaryDirectory(prefix="mvar-ckpt-") as tmp:
            out = trainer.save(Path(tmp) / "ckpt", step, meta)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(str(out)),
                             checkpoint_dir_name=name)


def make_tracker(cfg, rank: int, run_id: str, task: TrainTask, start: int):
    if rank != 0 or not run_id:
        return NullTracker()
    # a restarted run (also one killed before its first checkpoint) skips, per key, the steps already logged
    tracker = MlflowTracker(run_id, cfg.tracking, skip_logged=True)
    tracker.start_system_metrics()
    if not start:
        tracker.log_metrics(task.first_metrics(), 0)
    return tracker


def restore_latest(trainer: Trainer, rank: int) -> int:
    """The step of Ray Train's latest checkpoint of this run, loaded into ``trainer``; 0 without one."""
    import ray.train
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d:
        start = trainer.restore(Path(d))
    log.info("rank %d: resumed at step %d from %s", rank, start, ckpt.path)
    return start


def run_worker(config: dict, cfg_type: type, build_task) -> dict:
    """Ray Train's train_loop_per_worker for any task: ``build_task(cfg, device, rank, world)``.
    ``config`` holds ``train`` (the run config as a dict), ``run_id`` and ``tokenizer_sha256``."""
    import ray.train
    import ray.train.torch

    from mvar import cluster
    cluster.quiet_train_worker()
    cfg = from_dict(cfg_type, config["train"])
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    if device.type == "cuda":
        enable_tf32(cfg.train.tf32)
    task = build_task(cfg, device, rank, world)
    loader = build_train_loader(cfg.data, rank, world, tokenizer_fingerprint=config.get("tokenizer_sha256"))
    trainer = Trainer(task, cfg, device, rank, world)
    start = restore_latest(trainer, rank)
    task.distribute()
    run_id = config.get("run_id", "")
    tracker = make_tracker(cfg, rank, run_id, task, start)
    hooks = RayHooks(tracker, rank, loader, run_id, cfg.run.name, cfg.run.steps)
    try:
        return trainer.run(batches(loader, start), start, hooks)
    finally:
        tracker.close(status="")  # the driver marks the run finished or failed
