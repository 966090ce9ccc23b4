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

from mvar.data import build_train_loader
from mvar.tracking import MlflowTracker, NullTracker
from mvar.training.config import RunConfig
from mvar.training.trainer import Hooks, Trainer, TrainTask, batches, enable_tf32

log = logging.getLogger(__name__)


class RayHooks(Hooks):
    """Metrics to the run's tracker (rank 0), checkpoints to Ray Train, epoch and bad samples of the loader."""

    def __init__(self, tracker, rank: int, loader, run_id: str, run_name: str):
        self.tracker, self.rank, self.loader, self.run_id, self.run_name = tracker, rank, loader, run_id, run_name

    def data_metrics(self, step: int) -> dict[str, float]:
        return {"train/epoch": step / len(self.loader), "data/bad_samples": float(self.loader.bad_samples.value)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)

    def checkpoint(self, trainer: Trainer, step: int, report: dict[str, float]) -> None:
        import ray.train
        name = f"step_{step:08d}"
        if self.rank != 0:
            ray.train.report(report, checkpoint=None, checkpoint_dir_name=name)
            return
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


def make_tracker(cfg: RunConfig, rank: int, run_id: str, task: TrainTask, start: int):
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
    ``config`` holds ``train`` (the driver's run config, validated there), ``run_id`` and ``tokenizer_sha256``."""
    import ray.train
    import ray.train.torch
    cfg = config["train"]
    if not isinstance(cfg, cfg_type):  # a programming error, not bad input
        raise TypeError(f"run_worker: config['train'] is a {type(cfg).__name__}, expected a {cfg_type.__name__}")
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
    try:
        return trainer.run(batches(loader, start), start, RayHooks(tracker, rank, loader, run_id, cfg.run.name))
    finally:
        tracker.close(status="")  # the driver marks the run finished or failed
