"""A training run in this process, without Ray: `mvar train --local`, `run_local(spec, cfg)`.

    from mvar.training.local import run_local
    from mvar.training.tasks import GENERATOR
    outcome = run_local(GENERATOR, load_train_config("workflows/configs/mvar_tiny_local.yaml"))

The same run as on Ray Train with one worker (`mvar.training.launch.launch`), on one device (CUDA
with ``scaling.use_gpu``, else the CPU) and with no process group: the same checks first, the same
MLflow run (found again by ``mvar.run_key``, the same params, tags and metrics through the same
hooks, `mvar.training.worker`), the same checkpoints in ``run.storage_path/run.name`` and the same
record of them that Ray Train keeps there (`mvar.training.run_dir.record_checkpoint`): Ray Train
resumes a local run's checkpoints and a local run resumes Ray Train's, into the same MLflow run.
Nothing imports or starts Ray. ``scaling.num_workers`` is taken as 1 (one process).

With ``checkpoint_eval.every_checkpoint`` each checkpoint is evaluated right after it is written, in
this process (the loop waits for it; on Ray Train it runs beside the training), recorded as pending
first, as Ray Train records a validation: a run stopped mid-evaluation evaluates it when it resumes,
locally or on Ray Train (`mvar.training.checkpoint_eval`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

from mvar.data.storage import is_local
from mvar.errors import UserError
from mvar.training import run_dir as rundir
from mvar.training.driver import (
    FitResult,
    TrainOutcome,
    check_one_run,
    end_run,
    open_run,
)
from mvar.training.spec import TaskSpec
from mvar.training.trainer import Trainer
from mvar.training.worker import Reporter, run_rank

log = logging.getLogger(__name__)


def one_process(cfg) -> None:
    """``scaling.num_workers`` -> 1, in place, before the checks (``run.epochs`` counts the global batch)."""
    if cfg.scaling.num_workers != 1:
        print(f"--local: one process on one device: scaling.num_workers {cfg.scaling.num_workers} is taken as 1 "
              f"(a global batch of {cfg.data.batch_size})", flush=True)
        cfg.scaling = dataclasses.replace(cfg.scaling, num_workers=1)


def local_device(cfg):
    """CUDA device 0 with ``scaling.use_gpu`` (refused without one), else the CPU."""
    import torch
    if not cfg.scaling.use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("scaling.use_gpu: true, but this machine has no CUDA device for the local run; "
                        "set scaling.use_gpu=false to train on the CPU")
    return torch.device("cuda", 0)


class LocalReporter(Reporter):
    """Checkpoints into the run's directory, registered in its record as Ray Train registers them; with an
    ``evaluator`` each one evaluated after its write, its metrics recorded with it."""

    def __init__(self, run_dir: Path, resume_from: str | None, keep: int, evaluator=None):
        self.run_dir, self.resume_from, self.keep = Path(run_dir), resume_from, keep
        self.evaluator = evaluator

    def restore(self, trainer: Trainer, rank: int) -> int:
        if not self.resume_from:
            return 0
        start = trainer.restore(self.run_dir / self.resume_from)
        log.info("resumed at step %d from %s", start, self.run_dir / self.resume_from)
        return start

    @contextlib.contextmanager
    def place(self, name: str):
        yield self.run_dir / name

    def report(self, report: dict[str, float], written: Path | None, name: str) -> None:
        if written is None:
            return
        rundir.record_checkpoint(self.run_dir, name, dict(report), self.keep, validate=self.evaluator is not None)
        if self.evaluator is not None:
            self.evaluate(name)

    def evaluate(self, name: str) -> None:
        """Checkpoint ``name``'s pending evaluation, and its end in the record (failed: None). Torch's random
        state is put back after it: the training goes on as it would without the evaluation (and as on Ray
        Train, where the evaluation has a process of its own)."""
        import torch
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
        with torch.random.fork_rng(devices=devices):
            metrics = self.evaluator.safely(self.run_dir / name)
        rundir.record_validation(self.run_dir, name, metrics, self.keep)

    def evaluate_pending(self) -> None:
        """The evaluations a stopped run left pending (asked for, not ended), oldest first."""
        pending = rundir.pending_validations(self.run_dir) if self.evaluator is not None else []
        for name in pending:
            print(f"checkpoint {name}: its evaluation was pending when the run stopped; evaluating it now", flush=True)
            self.evaluate(name)


def fit_result(run_dir: Path, returned: dict) -> FitResult:
    """What the run's record holds at the end, as a backend's fit leaves it."""
    reg = rundir.registered(run_dir)
    kept = [(str(run_dir / n), reg.metrics.get(n, {})) for n in reg.names]
    latest = str(run_dir / reg.latest) if reg.latest else ""
    return FitResult(checkpoint=latest, metrics=reg.metrics.get(reg.latest, {}), kept=kept, returned=returned)


def check_local(cfg):
    """What a local run needs besides its task's checks (``scaling.num_workers`` set to 1 in place, a local
    ``run.storage_path``, the device); returns the device."""
    one_process(cfg)
    if not is_local(cfg.run.storage_path):
        raise UserError(f"run.storage_path: a local run writes its checkpoints to a local (or shared) path, "
                        f"got '{cfg.run.storage_path}'; train on Ray for an object store")
    return local_device(cfg)


def run_local(spec: TaskSpec, cfg, checked: dict | None = None, tags: dict[str, str] | None = None) -> TrainOutcome:
    """Check every input (``spec.check``, unless ``checked`` holds its result), attach the MLflow run, train
    to ``run.steps`` in this process from the latest checkpoint, record the end (``spec.register_as``,
    ``spec.after_fit``). ``tags`` are added to the spec's."""
    check_one_run(cfg)
    device = check_local(cfg)
    checked = spec.check(cfg) if checked is None else checked
    opened = open_run(spec, cfg, checked, tags or {}, backend="local")
    run_dir = Path(opened.workers["run_dir"])
    print(f"local run: one process on {device}; {cfg.run.steps} steps", flush=True)
    reporter = LocalReporter(run_dir, opened.workers.get("resume_from"), cfg.run.keep_checkpoints, opened.evaluator)
    try:
        reporter.evaluate_pending()
        returned = run_rank(opened.workers, spec.build_task, 0, 1, device, reporter)
    except BaseException as err:  # a bug's traceback stays as it is: this process is the worker
        _end(opened, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        rundir.prune(run_dir)
    return end_run(spec, cfg, opened, fit_result(run_dir, returned))


def _end(opened, status: str) -> None:
    try:
        opened.store.terminate(opened.run_id, status)
    except Exception as err:  # noqa: BLE001 - never hide the run's own error
        log.warning("MLflow: the run %s was not marked %s: %s", opened.run_id, status, err)
