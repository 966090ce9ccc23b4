"""The training core: one optimizer step and one loop, in plain PyTorch (no Ray, no MLflow).

    task = GeneratorTask(cfg, model, tokenizer, device)     # or TokenizerTask: what is trained
    trainer = Trainer(task, cfg, device)                    # AdamW, the lin0 schedule, clipping, precision
    result = trainer.run(iter(batches), start=0, hooks=Hooks())

A task (``TrainTask``) says what a step computes (``loss(batch, step)``), what it logs,
validates and checkpoints; the trainer owns the rest: per-step seeds, the optimizer and
its schedule, fp16 loss scaling, clipping, the all-ranks NaN/inf stop, metric intervals,
and when to log, validate and checkpoint. ``Hooks`` receive what a run reports: the Ray
adapter (`mvar.training.ray_worker`) sends it to MLflow and Ray Train; a test or a notebook
passes the no-op ``Hooks`` or its own.

Ranks: under torch.distributed (initialised by whoever runs the ranks) each step does one
1-element all-reduce so that a non-finite loss on any rank stops every rank at that step;
a task may add its own collectives (DDP, validation sums, usage counts) on every rank.
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import nn

from mvar import faults
from mvar.checkpoint import TRAIN_STATE, load_train_state, staged_dir
from mvar.files import save_torch
from mvar.training.memory import PEAK_ALIAS, PeakTracker, peak_metric
from mvar.training.optim import build_optimizer

if TYPE_CHECKING:  # the core runs on any config of this shape
    from mvar.training.config import RunConfig

log = logging.getLogger(__name__)


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' -> bf16 on CUDA, fp32 elsewhere; bf16/fp16 autocast only on CUDA."""
    if device.type != "cuda" or precision == "fp32":
        return "fp32"
    return "bf16" if precision == "auto" else precision


def autocast(precision: str, device: torch.device):
    """The forward's autocast context for a resolved precision."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def enable_tf32(on: bool) -> None:
    """TF32 for CUDA matmuls and convolutions (both authors' trainers turn it on)."""
    torch.backends.cuda.matmul.allow_tf32 = on
    torch.backends.cudnn.allow_tf32 = on


def all_ranks_finite(device: torch.device, *values: torch.Tensor) -> bool:
    """One 1-element all-reduce (MAX): every rank sees a NaN/inf of any rank at the same step.
    On ``device``: the NCCL backend reduces CUDA tensors only."""
    bad = torch.tensor([0.0 if all(torch.isfinite(v).all() for v in values) else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def maybe_ddp(module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
    """DDP around ``module`` when torch.distributed is initialised, else the module itself."""
    if not dist.is_initialized():
        return module
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(module, find_unused_parameters=find_unused_parameters)


class TrainTask:
    """What the trainer trains. Subclasses set ``module`` (the trained parameters, what a checkpoint
    holds) and ``precision`` and implement ``loss``; the rest has working defaults."""

    module: nn.Module
    precision: str = "fp32"        # resolved: fp32 | bf16 | fp16 (fp16 adds a GradScaler)

    def param_groups(self) -> list[dict]:
        """Groups for AdamW with ``wd_scale`` each (mvar.training.optim.param_groups)."""
        return [{"params": [p for p in self.module.parameters() if p.requires_grad], "wd_scale": 1.0}]

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """The trainer's optimizer, for a task that edits its state (codebook restarts zero a row's moments)."""

    def distribute(self) -> None:
        """Wrap the forward in DDP once the weights are final (after restore)."""

    def loss(self, batch, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """(the loss to back-propagate, this step's metrics): metrics are averaged over each log interval."""
        raise NotImplementedError

    def after_step(self, step: int, outcome: StepOutcome) -> None:
        """Extra per-step work after the optimizer step (a second optimizer, codebook upkeep ...)."""

    def interval_metrics(self) -> dict[str, float]:
        """Extra metrics at each log step; called on every rank (may hold collectives)."""
        return {}

    def step_type(self, step: int) -> str:
        """The kind of work of 0-based ``step`` (the generator's cycle: ``dense``, ``s<k>``); one kind: ``full``.
        Seconds and peak memory are kept per kind (`train/step_s_<kind>`, `train/peak_mem_mb_<kind>`: CUDA
        allocated on a GPU, the resident set on CPU, as `perf/peak_cuda_mb` / `perf/peak_rss_mb`)."""
        return "full"

    def pyramid_types(self) -> tuple[str, ...]:
        """The step kinds that together train every part of the model once (a 'full pyramid' of a
        next-scale generator): `train/pyramid_s` is the sum of their mean step seconds."""
        return ("full",)

    def step_tokens(self, step: int) -> int:
        """Tokens (per sample) that ``step`` trains on, for `train/tokens_per_s`; 0: not a token model."""
        return 0

    def first_metrics(self) -> dict[str, float]:
        """What the model costs (parameters, FLOPs), logged once at step 0 of a run."""
        return {"model/params_m": sum(p.numel() for p in self.module.parameters()) / 1e6}

    def validate(self) -> dict[str, float]:
        """`val/*` metrics at each checkpoint; called on every rank."""
        return {}

    def sample_grid(self) -> torch.Tensor | None:
        """A grid of samples, (3, H, W) in [0, 1], at each checkpoint (rank 0 only); None: this task has none."""
        return None

    def state(self) -> dict:
        """The task's own resumable state (a second optimizer ...), saved in the train state."""
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def save_weights(self, out: Path, meta: dict) -> Path:
        """Write the checkpoint directory ``out`` (it must not exist); ``meta`` has step and run identity."""
        raise NotImplementedError

    def load_weights(self, ckpt_dir: Path) -> None:
        raise NotImplementedError


@dataclass
class StepOutcome:
    lr: float                    # the learning rate this step used
    grad_norm: torch.Tensor      # total 2-norm before clipping
    finite: bool                 # False: a rank saw a non-finite loss (or gradient); nothing was stepped
    loss_scale: float = 0.0      # fp16: the GradScaler's scale for this step


class Stepper:
    """Backward, (unscale,) clip, the all-ranks finite check, optimizer and schedule step."""

    def __init__(self, params: list[torch.Tensor], opt, sched, grad_clip: float, fp16: bool,
                 device: torch.device):
        self.params, self.opt, self.sched, self.device = params, opt, sched, device
        self.grad_clip = grad_clip or math.inf
        # the authors' scaler: 2**11 to start, grows every 1000 clean steps, capped at 2**15
        self.scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** 11, growth_interval=1000) \
            if fp16 else None

    def step(self, loss: torch.Tensor) -> StepOutcome:
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip)
        # under fp16 an inf gradient is the scaler's business (it skips the step and lowers the scale)
        checked = (loss.detach(),) if self.scaler is not None else (loss.detach(), grad_norm.detach())
        if not all_ranks_finite(self.device, *checked):
            return StepOutcome(0.0, grad_norm, False)
        lr = self.opt.param_groups[0]["lr"]
        scale = 0.0
        if self.scaler is None:
            self.opt.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(self.opt)
            self.scaler.update(new_scale=32768.0 if scale > 32768.0 else None)
        self.sched.step()
        return StepOutcome(lr, grad_norm, True, scale)

    def state_dict(self) -> dict:
        out = {"optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict()}
        if self.scaler is not None:
            out["scaler"] = self.scaler.state_dict()
        return out

    def load_state_dict(self, state: dict) -> None:
        scales = [g.get("wd_scale", 1.0) for g in self.opt.param_groups]
        self.opt.load_state_dict(state["optimizer"])  # takes the saved groups' settings ...
        for group, scale in zip(self.opt.param_groups, scales):
            group["wd_scale"] = scale  # ... but which group is decayed is this run's (older states lack it)
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


@dataclass
class Interval:
    """Per-key sums of the step metrics since the last log (on the device: no sync per step)."""

    t0: float
    steps: int = 0
    sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            self.sums[k] = self.sums[k] + v if k in self.sums else v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.steps += 1

    def means(self) -> dict[str, float]:
        return {k: float(v) / self.counts[k] for k, v in self.sums.items()}


class StepCost:
    """Like-for-like training cost, kept per step kind (``task.step_type``) since the run (re)started.

    A kind's seconds are the wall time of its steps (batch, loss, optimizer step; data loader restarts at
    epoch ends included, logging and checkpoints not), the first step of the process left out (allocation,
    kernel selection); on CUDA the clock is synchronised where the kind
    changes, so each kind's seconds are its own. Logged (cumulative means):
    `train/step_s_<kind>`, `train/peak_mem_mb_<kind>` (the probe of `perf/peak_cuda_mb` on CUDA: allocated
    memory, of `perf/peak_rss_mb` on CPU: the resident high-water mark), `train/pyramid_s` (the seconds
    to train every part once: the sum over ``task.pyramid_types()``), `train/images_per_s` (images of the
    global batch per pyramid second) and `train/tokens_per_s` (tokens trained per second over all ranks,
    when the task has tokens).
    """

    def __init__(self, task: TrainTask, device: torch.device, images_per_step: int):
        self.task, self.device, self.images_per_step = task, device, images_per_step
        self.seconds: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.peaks: dict[str, float] = {}
        self.tokens = 0
        self.kind, self.t0, self.first = "", 0.0, True
        self.peak, self.interval_peak = PeakTracker(device), 0.0

    def begin(self, step: int) -> None:
        kind = self.task.step_type(step)
        if kind != self.kind and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.kind, self.t0 = kind, time.perf_counter()

    def end(self, step: int) -> None:
        boundary = self.task.step_type(step + 1) != self.kind
        if boundary and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - self.t0
        if boundary:
            self._read_peak()
        if self.first:  # the first step of a process pays for allocation and kernel choice
            self.first = False
            return
        self.seconds[self.kind] = self.seconds.get(self.kind, 0.0) + seconds
        self.counts[self.kind] = self.counts.get(self.kind, 0) + 1
        self.tokens += self.task.step_tokens(step) * self.images_per_step

    def _read_peak(self) -> None:
        """The peak since the last read belongs to the current kind's steps (the probe is process-wide)."""
        v = self.peak.read_and_reset()
        self.peaks[self.kind] = max(self.peaks.get(self.kind, 0.0), v)
        self.interval_peak = max(self.interval_peak, v)

    def interval_peak_mb(self) -> float:
        """`perf/peak_cuda_mb` | `perf/peak_rss_mb`: the peak over every step since the last call."""
        self._read_peak()
        v, self.interval_peak = self.interval_peak, 0.0
        return v

    def metrics(self) -> dict[str, float]:
        means = {k: self.seconds[k] / self.counts[k] for k in self.seconds}
        out = {f"train/step_s_{k}": v for k, v in means.items()}
        out.update({f"train/peak_mem_mb_{k}": v for k, v in self.peaks.items() if v})
        kinds = self.task.pyramid_types()
        if all(k in means for k in kinds):
            pyramid = sum(means[k] for k in kinds)
            out["train/pyramid_s"] = pyramid
            out["train/images_per_s"] = self.images_per_step / pyramid
        total = sum(self.seconds.values())
        if self.tokens and total:
            out["train/tokens_per_s"] = self.tokens / total
        return out


class Hooks:
    """Where a run's reports go; these do nothing (a test or notebook run). Called on every rank."""

    def on_step(self, step: int, outcome: StepOutcome, metrics: dict) -> None:
        """After each finite step (0-based ``step``)."""

    def data_metrics(self, step: int) -> dict[str, float]:
        """Added to each interval's metrics by whoever owns the data (epoch, bad samples ...)."""
        return {}

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Interval metrics every ``run.log_every`` steps and `val/*` at checkpoints (``step`` = steps done)."""

    def checkpoint(self, trainer: Trainer, step: int, report: dict[str, float]) -> None:
        """Every ``run.checkpoint_every`` steps and at the last: ``trainer.save`` writes one."""


class Trainer:
    """One loop for every task; of ``cfg`` it reads the ``optim``, ``run`` and ``data.batch_size`` keys."""

    def __init__(self, task: TrainTask, cfg: RunConfig, device: torch.device, rank: int = 0, world: int = 1):
        self.task, self.cfg, self.device, self.rank, self.world = task, cfg, device, rank, world
        opt, sched = build_optimizer(task.param_groups(), cfg.optim, self.images_per_step, cfg.run.steps,
                                     fused=device.type == "cuda")
        params = [p for p in task.module.parameters() if p.requires_grad]
        self.stepper = Stepper(params, opt, sched, cfg.optim.grad_clip, task.precision == "fp16", device)
        task.attach_optimizer(opt)
        self.device_s, self.t_run = 0.0, None  # device-seconds of earlier attempts; this attempt's loop start

    def device_hours(self) -> float:
        """`cost/device_hours`: the training loop's wall seconds (checkpoints and validation included) times
        the devices (one per rank), summed over the attempts up to the checkpoint this one resumed from."""
        now = (time.perf_counter() - self.t_run) * self.world if self.t_run is not None else 0.0
        return (self.device_s + now) / 3600

    @property
    def images_per_step(self) -> int:
        return self.cfg.data.batch_size * self.world

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.stepper.opt

    # -- checkpoints -------------------------------------------------------------
    def save(self, out: Path, step: int, meta: dict | None = None, overwrite: bool = False) -> Path:
        """The task's checkpoint directory at ``out`` plus the train state that ``restore`` reads,
        written under a partial name and renamed when all of it is on disk (``staged_dir``)."""
        meta = {"step": step, **(meta or {})}
        with staged_dir(out, overwrite) as tmp:
            self.task.save_weights(tmp, meta)
            faults.point("checkpoint-model-written", step)  # testing aid: MVAR_FAULT (mvar.faults)
            save_torch({**self.stepper.state_dict(), "task": self.task.state(), "device_s": self.device_hours() * 3600,
                        **meta}, tmp / TRAIN_STATE)
        return Path(out)

    def restore(self, ckpt_dir: Path) -> int:
        """Weights, optimizer, schedule, scaler and task state of a checkpoint; returns its step."""
        ckpt_dir = Path(ckpt_dir)
        self.task.load_weights(ckpt_dir)
        state = load_train_state(ckpt_dir / TRAIN_STATE)
        self.stepper.load_state_dict(state)
        self.task.load_state(state.get("task") or {})
        self.device_s = float(state.get("device_s", 0.0))  # older checkpoints: the cost before them is unknown
        return int(state["step"])

    # -- the loop ----------------------------------------------------------------
    def run(self, data: Iterator, start: int = 0, hooks: Hooks | None = None) -> dict:
        """Steps ``start`` .. run.steps-1 on ``data`` (positioned at ``start``). Returns
        {'status': 'completed' | 'nonfinite', 'step': ...}."""
        hooks, run = hooks or Hooks(), self.cfg.run
        interval = Interval(time.perf_counter())
        self.cost = peak = StepCost(self.task, self.device, self.images_per_step)
        self.t_run = time.perf_counter()
        for step in range(start, run.steps):
            self.cost.begin(step)
            batch = next(data)  # first: a loader may draw from torch's RNG (a new iterator draws its base seed)
            torch.manual_seed(run.seed + 1_000_003 * self.rank + step)  # class dropout etc., same on resume
            loss, metrics = self.task.loss(batch, step)
            if run.fault_nan_at_step == step + 1:  # testing aid
                loss = loss * float("nan")
            outcome = self.stepper.step(loss)
            if not outcome.finite:
                log.error("rank %d: non-finite loss or gradient at step %d; stopping", self.rank, step + 1)
                return {"status": "nonfinite", "step": step + 1, "loss": loss.item()}
            self.task.after_step(step, outcome)
            self.cost.end(step)
            interval.add(metrics)
            hooks.on_step(step, outcome, metrics)
            done = step + 1
            if done % run.log_every == 0 or done == run.steps:
                self.log_interval(hooks, interval, outcome, peak, done)
                interval = Interval(time.perf_counter())
            if done % run.checkpoint_every == 0 or done == run.steps:
                t = time.perf_counter()
                self.checkpoint(hooks, done, metrics)
                interval.t0 += time.perf_counter() - t  # checkpoint time is not step time
        return {"status": "completed", "step": run.steps}

    def interval_metrics(self, interval: Interval, last: StepOutcome, peak: StepCost) -> dict[str, float]:
        step_s = (time.perf_counter() - interval.t0) / interval.steps
        mem = peak.interval_peak_mb()
        out = {**interval.means(), "train/lr": last.lr, "train/grad_norm": last.grad_norm.item(),
               "perf/step_s": step_s, "perf/images_per_s": self.images_per_step / step_s,
               peak_metric(self.device): mem, PEAK_ALIAS: mem, "cost/device_hours": self.device_hours()}
        if last.loss_scale:
            out["train/loss_scale"] = last.loss_scale
        return {**out, **self.cost.metrics(), **self.task.interval_metrics()}

    def log_interval(self, hooks: Hooks, interval: Interval, last: StepOutcome, peak: StepCost,
                     done: int) -> None:
        hooks.log({**self.interval_metrics(interval, last, peak), **hooks.data_metrics(done)}, done)

    def checkpoint(self, hooks: Hooks, done: int, metrics: dict) -> None:
        report = {"step": done}
        if "train/loss" in metrics:
            report["train/loss"] = float(metrics["train/loss"])
        val = self.task.validate()
        if val:
            hooks.log(val, done)
        hooks.checkpoint(self, done, {**report, **val})


def batches(loader, start_step: int) -> Iterator:
    """Endless batches of a project loader (``len`` = steps per epoch, ``set_epoch``) from the data
    position of ``start_step``: epoch ``start_step // len``, the batches before it in that epoch skipped."""
    n = len(loader)
    epoch, skip = divmod(start_step, n)
    while True:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


class LocalCheckpoints(Hooks):
    """Rank 0 writes ``root/step_NNNNNNNN`` at each checkpoint: a run without Ray that can resume."""

    def __init__(self, root: Path, rank: int = 0):
        self.root, self.rank = Path(root), rank

    def checkpoint(self, trainer: Trainer, step: int, report: dict[str, float]) -> None:
        if self.rank == 0:
            trainer.save(self.root / f"step_{step:08d}", step)

    def latest(self) -> Path | None:
        found = sorted(self.root.glob("step_*"))
        return found[-1] if found else None
