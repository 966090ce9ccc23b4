"""The Ray Train adapter around one training process (`mvar.training.worker.run_rank`).

It supplies the rank, world size and device of Ray Train's context, the restore from Ray
Train's latest checkpoint, and `ray.train.report` at each checkpoint (every rank calls it the
same number of times; rank 0 attaches the checkpoint directory).

With ``config['checkpoint_eval']`` rank 0 asks Ray Train to evaluate each checkpoint it reports
(``validation=True``): Ray Train's controller runs `validate_checkpoint` as a task of its own beside
the training (`mvar.training.checkpoint_eval`), and merges the metrics it returns into the checkpoint's.

Checkpoints (``config['run_dir']`` set: storage on a local or shared path): rank 0 writes each one
straight into the run's directory and reports it without a second copy. On an object store rank 0
writes a local copy that Ray Train uploads.
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
from pathlib import Path

from mvar.training.trainer import Trainer
from mvar.training.worker import Reporter, run_rank

log = logging.getLogger(__name__)


class RayReporter(Reporter):
    """Checkpoints to Ray Train (`ray.train.report`), the restore from `ray.train.get_checkpoint`."""

    def __init__(self, config: dict):
        self.config = config
        self.run_dir = Path(config["run_dir"]) if config.get("run_dir") else None

    def restore(self, trainer: Trainer, rank: int) -> int:
        """The step of Ray Train's latest checkpoint of this run, loaded into ``trainer``; 0 without one.
        A checkpoint the driver found damaged is replaced by the complete one it chose (run_dir)."""
        import ray.train
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return 0
        name = Path(ckpt.path).name
        if name in (self.config.get("skip_checkpoints") or ()):
            fallback = self.run_dir / self.config["resume_from"]
            start = trainer.restore(fallback)
            log.warning("rank %d: resumed at step %d from %s (the latest, %s, is damaged)", rank, start, fallback,
                        name)
            return start
        with ckpt.as_directory() as d:
            start = trainer.restore(Path(d))
        log.info("rank %d: resumed at step %d from %s", rank, start, ckpt.path)
        return start

    @contextlib.contextmanager
    def place(self, name: str):
        if self.run_dir is not None:
            yield self.run_dir / name
            return
        with tempfile.TemporaryDirectory(prefix="mvar-ckpt-") as tmp:  # Ray Train uploads it at the report
            yield Path(tmp) / name

    def report(self, report: dict[str, float], written: Path | None, name: str) -> None:
        import ray.train
        ckpt = ray.train.Checkpoint.from_directory(str(written)) if written is not None else None
        mode = ray.train.CheckpointUploadMode.NO_UPLOAD if self.run_dir else ray.train.CheckpointUploadMode.SYNC
        validate = ckpt is not None and bool(self.config.get("checkpoint_eval"))
        ray.train.report(report, checkpoint=ckpt, checkpoint_dir_name=name, checkpoint_upload_mode=mode,
                         validation=validate)


def validate_checkpoint(checkpoint, evaluator) -> dict:
    """Ray Train's validation function (`TorchTrainer(validation_config=...)`, a task the controller starts):
    the ``evaluator``'s metrics of the reported ``checkpoint`` (a `ray.train.Checkpoint`; a copy of it for an
    object store). An exception marks the checkpoint's validation failed; the training goes on."""
    with checkpoint.as_directory() as d:
        return evaluator(Path(d))


def train_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker for any task: ``config['spec']`` (a `TaskSpec`) says which.
    Returns {'status': 'completed' | 'nonfinite' | 'disk_full', 'step': ..., 'ranks': ...}."""
    import ray.train
    import ray.train.torch

    from mvar import cluster
    cluster.quiet_train_worker()
    spec, cfg = config["spec"], config["train"]
    if not isinstance(cfg, spec.config_type):  # a programming error, not bad input
        raise TypeError(f"train_worker: config['train'] is a {type(cfg).__name__}, expected a "
                        f"{spec.config_type.__name__}")
    ctx = ray.train.get_context()
    rank, world, device = ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()
    config = {**config, "node_rank": ctx.get_node_rank(), "local_rank": ctx.get_local_rank()}  # system metrics per node
    return run_rank(config, spec.build_task, rank, world, device, RayReporter(config))
