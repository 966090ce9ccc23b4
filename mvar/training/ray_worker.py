"""The Ray Train adapter around the trainer core: what one Ray worker adds to `Trainer.run`.

It supplies the rank, world size and device of Ray Train's context, the rank's share
of the shards, the restore from Ray Train's latest checkpoint (model, optimizer,
schedule, scaler, step: the data position is the step), DDP, the MLflow tracker
(rank 0 logs into the driver's run; a restarted run skips the steps already logged)
and `ray.train.report` at each checkpoint (every rank calls it the same number of
times; rank 0 attaches the checkpoint directory).

Checkpoints (``config['run_dir']`` set: storage on a local or shared path): rank 0 writes each one
straight into the run's directory, under a partial name renamed when complete
(`mvar.checkpoint.staged_dir`), and reports it without a second copy; a worker killed mid-write
leaves only a partial directory, which the next rank 0 removes when it starts. On an object store
rank 0 writes a local copy that Ray Train uploads. A full disk stops every rank at that checkpoint
(one all-reduced flag) with status ``disk_full``: retrying could only fill the disk again.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from mvar.data import build_train_loader
from mvar.errors import DiskFull
from mvar.tracking import MlflowTracker, NullTracker
from mvar.training import run_dir as rundir
from mvar.training.config import RunConfig
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


def checkpoint_line(step: int, total: int, name: str, report: dict[str, float]) -> str:
    vals = "".join(f", {k} {v:.4f}" for k, v in sorted(report.items()) if k.startswith("val/"))
    return f"step {step}/{total}: checkpoint {name}{vals}"


class RunStopped(Exception):
    """Raised on every rank at once to end the run with ``status`` (not a failure Ray retries)."""

    def __init__(self, status: str, step: int, message: str):
        super().__init__(message)
        self.status, self.step = status, step


def all_ranks_ok(device, ok: bool) -> bool:
    """One 1-element all-reduce (MIN): False on every rank when any rank says False."""
    import torch
    import torch.distributed as dist
    flag = torch.tensor([1.0 if ok else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


class RayHooks(Hooks):
    """Metrics to the run's tracker (rank 0), checkpoints to Ray Train, epoch and bad samples of the loader.
    Rank 0 also prints a progress line at each log step and checkpoint: worker output reaches the
    driver's console and `ray job logs`."""

    def __init__(self, tracker, rank: int, loader, config: dict, run_name: str, total_steps: int = 0):
        self.tracker, self.rank, self.loader, self.run_name = tracker, rank, loader, run_name
        self.total_steps = total_steps
        self.run_id = config.get("run_id", "")
        self.run_dir = Path(config["run_dir"]) if config.get("run_dir") else None
        self.taken = set(config.get("skip_checkpoints") or ())  # names Ray still holds (damaged ones)

    def data_metrics(self, step: int) -> dict[str, float]:
        return {"train/epoch": step / len(self.loader), "data/bad_samples": float(self.loader.bad_samples.value)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.rank == 0 and self.total_steps and "perf/step_s" in metrics:  # interval metrics, not val/*
            progress.info(progress_line(step, self.total_steps, metrics))

    def checkpoint(self, trainer: Trainer, step: int, report: dict[str, float]) -> None:
        import ray.train
        name = rundir.checkpoint_name(step, self.taken)
        if self.rank == 0:
            self.log_samples(trainer, step)
        # on an object store rank 0 writes a local copy that Ray Train uploads
        local = tempfile.TemporaryDirectory(prefix="mvar-ckpt-") if self.rank == 0 and not self.run_dir else None
        with local or contextlib.nullcontext():
            ckpt, error = None, ""
            if self.rank == 0:
                try:
                    ckpt = self._write(trainer, step, (self.run_dir or Path(local.name)) / name)
                except DiskFull as err:
                    error = str(err)
            if not all_ranks_ok(trainer.device, not error):
                raise RunStopped("disk_full", step, error or "rank 0 could not write the checkpoint")
            mode = ray.train.CheckpointUploadMode.NO_UPLOAD if self.run_dir else ray.train.CheckpointUploadMode.SYNC
            ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=name, checkpoint_upload_mode=mode)
        if self.rank == 0 and self.total_steps:
            progress.info(checkpoint_line(step, self.total_steps, name, report))

    def log_samples(self, trainer: Trainer, step: int) -> None:
        """The task's sample grid (if it has one) as MLflow image ``samples`` at this step (rank 0)."""
        grid = trainer.task.sample_grid()
        if grid is not None:
            self.tracker.log_image(grid.mul(255).round().byte().permute(1, 2, 0).numpy(), "samples", step)

    def _write(self, trainer: Trainer, step: int, out: Path):
        import ray.train
        # the metrics of every step up to this one reach MLflow before the checkpoint exists: a run
        # resumed from it (after a worker was killed) would not compute those steps again
        self.tracker.flush()
        n = len(self.loader)
        meta = {"epoch": step // n, "batch_in_epoch": step % n, "steps_per_epoch": n,
                "mlflow_run_id": self.run_id, "run_name": self.run_name}
        # overwrite: a step_N that Ray never registered (its writer died before the report) is rewritten
        return ray.train.Checkpoint.from_directory(str(trainer.save(out, step, meta, overwrite=True)))


def make_tracker(cfg: RunConfig, rank: int, run_id: str, task: TrainTask, start: int):
    if rank != 0 or not run_id:
        return NullTracker()
    # a restarted run (also one killed before its first checkpoint) skips, per key, the steps already logged
    tracker = MlflowTracker(run_id, cfg.tracking, skip_logged=True)
    tracker.start_system_metrics()
    if not start:
        tracker.log_metrics(task.first_metrics(), 0)
    return tracker


def restore_latest(trainer: Trainer, rank: int, config: dict) -> int:
    """The step of Ray Train's latest checkpoint of this run, loaded into ``trainer``; 0 without one.
    A checkpoint the driver found damaged is replaced by the complete one it chose (run_dir)."""
    import ray.train
    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0
    name = Path(ckpt.path).name
    if name in (config.get("skip_checkpoints") or ()):
        fallback = Path(config["run_dir"]) / config["resume_from"]
        start = trainer.restore(fallback)
        log.warning("rank %d: resumed at step %d from %s (the latest, %s, is damaged)", rank, start, fallback, name)
        return start
    with ckpt.as_directory() as d:
        start = trainer.restore(Path(d))
    log.info("rank %d: resumed at step %d from %s", rank, start, ckpt.path)
    return start


class Counted:
    """An iterator that counts what it hands out (the batches a rank drew)."""

    def __init__(self, it):
        self.it, self.n = it, 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.n += 1
        return item


def steps_by_rank(start: int, result: dict, drawn: int) -> list[list[int]]:
    """[first step, last step, batches drawn] of this attempt on every rank (rank 0 gets them all)."""
    import torch.distributed as dist
    mine = [start + 1, int(result.get("step", start)), drawn]
    if not dist.is_initialized():
        return [mine]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return out


def run_worker(config: dict, cfg_type: type, build_task) -> dict:
    """Ray Train's train_loop_per_worker for any task: ``build_task(cfg, device, rank, world)``.
    ``config`` holds ``train`` (the driver's run config, validated there), ``run_id``, ``tokenizer_sha256``,
    and from the driver's check of the run directory ``run_dir``, ``skip_checkpoints``, ``resume_from``."""
    import ray.train
    import ray.train.torch

    from mvar import cluster
    cluster.quiet_train_worker()
    cfg = config["train"]
    if not isinstance(cfg, cfg_type):  # a programming error, not bad input
        raise TypeError(f"run_worker: config['train'] is a {type(cfg).__name__}, expected a {cfg_type.__name__}")
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    if device.type == "cuda":
        enable_tf32(cfg.train.tf32)
    if rank == 0 and config.get("run_dir"):
        rundir.prune(Path(config["run_dir"]), partial_only=True)  # left by a rank 0 killed mid-write
    task = build_task(cfg, device, rank, world)
    loader = build_train_loader(cfg.data, rank, world, tokenizer_fingerprint=config.get("tokenizer_sha256"))
    trainer = Trainer(task, cfg, device, rank, world)
    start = restore_latest(trainer, rank, config)
    task.distribute()
    tracker = make_tracker(cfg, rank, config.get("run_id", ""), task, start)
    data = Counted(batches(loader, start))
    try:
        try:
            result = trainer.run(data, start, RayHooks(tracker, rank, loader, config, cfg.run.name, cfg.run.steps))
        except RunStopped as stop:
            result = {"status": stop.status, "step": stop.step, "message": str(stop)}
        result["ranks"] = steps_by_rank(start, result, data.n)
        log.info("rank %d of %d: %s at step %d (steps %d..%d, %d batches drawn)", rank, world, result["status"],
                 result["step"], start + 1, result["step"], data.n)
        return result
    finally:
        tracker.close(status="")  # the driver marks the run finished or failed
