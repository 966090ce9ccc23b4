"""One training process around `Trainer.run`, the same with Ray Train or without.

A rank gets its share of the shards, restores the run's latest checkpoint (model, optimizer,
schedule, scaler, step: the data position is the step), wraps the task in DDP when a process group
is up, logs to the MLflow run that the driver attached (rank 0; a restarted run skips the steps
already logged) and, at each checkpoint, writes it and hands it to a ``Reporter``: Ray Train's
(`mvar.training.ray_worker`: ``ray.train.report``) or the one-process run's (`mvar.training.local`:
the run's checkpoint record, as Ray Train keeps it). Every rank reports the same number of times;
rank 0 writes the checkpoint.

Checkpoints on a local or shared path are written straight into the run's directory, under a
partial name renamed when complete (`mvar.checkpoint.staged_dir`), so a process killed mid-write
leaves only a partial directory, which the next start removes. A full disk stops every rank at that
checkpoint (one all-reduced flag) with status ``disk_full``: retrying could only fill the disk again.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from mvar.data import build_train_loader
from mvar.errors import DiskFull
from mvar.tracking import MlflowTracker, NodeTracker, NullTracker, system_metrics_node
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


class Reporter:
    """Where a rank's checkpoints go, and where a restarted rank finds the latest."""

    def restore(self, trainer: Trainer, rank: int) -> int:
        """The step of the run's latest checkpoint, loaded into ``trainer``; 0 without one."""
        raise NotImplementedError

    def place(self, name: str):
        """A context manager: the directory that rank 0 writes checkpoint ``name`` to."""
        raise NotImplementedError

    def report(self, report: dict[str, float], written: Path | None, name: str) -> None:
        """On every rank once per checkpoint; ``written`` (rank 0): the complete checkpoint directory."""
        raise NotImplementedError


class RunHooks(Hooks):
    """Metrics to the run's tracker (rank 0), checkpoints to the ``reporter``, epoch and bad samples of
    the loader. Rank 0 also prints a progress line at each log step and checkpoint: a Ray worker's
    output reaches the driver's console and `ray job logs`."""

    def __init__(self, tracker, rank: int, loader, config: dict, run_name: str, total_steps: int,
                 reporter: Reporter):
        self.tracker, self.rank, self.loader, self.run_name = tracker, rank, loader, run_name
        self.total_steps, self.reporter = total_steps, reporter
        self.run_id = config.get("run_id", "")
        self.taken = set(config.get("skip_checkpoints") or ())  # names Ray still holds (damaged ones)

    def data_metrics(self, step: int) -> dict[str, float]:
        return {"train/epoch": step / len(self.loader), "data/bad_samples": float(self.loader.bad_samples.value)}

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.tracker.log_metrics(metrics, step)
        if self.rank == 0 and self.total_steps and "perf/step_s" in metrics:  # interval metrics, not val/*
            progress.info(progress_line(step, self.total_steps, metrics))

    def checkpoint(self, trainer: Trainer, step: int, report: dict[str, float]) -> None:
        name = rundir.checkpoint_name(step, self.taken)
        if self.rank == 0:
            self.log_samples(trainer, step)
        with (self.reporter.place(name) if self.rank == 0 else contextlib.nullcontext()) as out:
            written, error = None, ""
            if self.rank == 0:
                try:
                    written = self._write(trainer, step, out)
                except DiskFull as err:
                    error = str(err)
            if not all_ranks_ok(trainer.device, not error):
                raise RunStopped("disk_full", step, error or "rank 0 could not write the checkpoint")
            self.reporter.report(report, written, name)
        if self.rank == 0 and self.total_steps:
            progress.info(checkpoint_line(step, self.total_steps, name, report))

    def log_samples(self, trainer: Trainer, step: int) -> None:
        """The task's sample grid (if it has one) as MLflow image ``samples`` at this step (rank 0)."""
        grid = trainer.task.sample_grid()
        if grid is not None:
            self.tracker.log_image(grid.mul(255).round().byte().permute(1, 2, 0).numpy(), "samples", step)

    def _write(self, trainer: Trainer, step: int, out: Path) -> Path:
        # the metrics of every step up to this one reach MLflow before the checkpoint exists: a run
        # resumed from it (after a worker was killed) would not compute those steps again
        self.tracker.flush()
        n = len(self.loader)
        meta = {"epoch": step // n, "batch_in_epoch": step % n, "steps_per_epoch": n,
                "mlflow_run_id": self.run_id, "run_name": self.run_name}
        # overwrite: a step_N that was never registered (its writer died before the report) is rewritten
        return trainer.save(out, step, meta, overwrite=True)


def make_tracker(cfg: RunConfig, rank: int, run_id: str, task: TrainTask, start: int, node_rank: int = 0,
                 local_rank: int = 0):
    """Rank 0 logs the run; the first rank of each other node its node's system metrics (the ranks of one
    node share its machine: one sampler a node); the other ranks nothing."""
    if not run_id:
        return NullTracker()
    node = system_metrics_node(node_rank)
    if rank != 0:
        return NodeTracker(run_id, cfg.tracking, node) if local_rank == 0 and node_rank != 0 else NullTracker()
    # a restarted run (also one killed before its first checkpoint) skips, per key, the steps already logged
    tracker = MlflowTracker(run_id, cfg.tracking, skip_logged=True)
    tracker.start_system_metrics(node)
    if not start:
        tracker.log_metrics(task.first_metrics(), 0)
    return tracker


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


def run_rank(config: dict, build_task, rank: int, world: int, device, reporter: Reporter) -> dict:
    """One rank of a run: ``build_task(cfg, device, rank, world)`` trained to ``run.steps`` from the latest
    checkpoint. ``config`` holds ``train`` (the driver's run config, validated there), ``run_id``,
    ``tokenizer_sha256``, and from the driver's check of the run directory ``run_dir``,
    ``skip_checkpoints``, ``resume_from``; from Ray Train, this rank's ``node_rank`` and ``local_rank``.
    Returns {'status', 'step', 'ranks' ...}."""
    cfg = config["train"]
    if device.type == "cuda":
        enable_tf32(cfg.train.tf32)
    if rank == 0 and config.get("run_dir"):
        rundir.prune(Path(config["run_dir"]), partial_only=True)  # left by a rank 0 killed mid-write
    task = build_task(cfg, device, rank, world)
    loader = build_train_loader(cfg.data, rank, world, tokenizer_fingerprint=config.get("tokenizer_sha256"))
    trainer = Trainer(task, cfg, device, rank, world)
    start = reporter.restore(trainer, rank)
    task.distribute()
    tracker = make_tracker(cfg, rank, config.get("run_id", ""), task, start, config.get("node_rank", 0),
                           config.get("local_rank", 0))
    if rank == 0:  # the workers' own device (the driver may have none of that kind)
        from mvar.provenance import provenance_tags
        tracker.set_tags(provenance_tags(device, world))
    data = Counted(batches(loader, start))
    try:
        hooks = RunHooks(tracker, rank, loader, config, cfg.run.name, cfg.run.steps, reporter)
        try:
            result = trainer.run(data, start, hooks)
        except RunStopped as stop:
            result = {"status": stop.status, "step": stop.step, "message": str(stop)}
        result["ranks"] = steps_by_rank(start, result, data.n)
        log.info("rank %d of %d: %s at step %d (steps %d..%d, %d batches drawn)", rank, world, result["status"],
                 result["step"], start + 1, result["step"], data.n)
        return result
    finally:
        tracker.close(status="")  # the driver marks the run finished or failed
