"""The per-worker training loop that Ray Train runs on every rank.

Each rank: builds the model and tokenizer, restores the latest checkpoint if
Ray Train has one (model, optimizer, scheduler, step; the data position is
the step), wraps the model in DDP, and steps through its share of the shards.
Rank 0 logs metrics to the run's MLflow run and writes the checkpoints.

Collectives: DDP's gradient all-reduce, one 1-element all-reduce per step
(so a NaN/inf on any rank stops every rank at the same step), the validation
sums, and `ray.train.report` at each checkpoint (every rank calls it the same
number of times; rank 0 passes the checkpoint).
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from mvar.measure import attention_gflops
from mvar.checkpoint import (
    load_into,
    load_state_dict,
    load_tokenizer,
    save_checkpoint,
    tokenizer_fingerprint,
)
from mvar.config import from_dict
from mvar.data import build_eval_loader, build_train_loader
from mvar.models import NextScaleTransformer
from mvar.models.schedule import scales_for_step
from mvar.tracking import MlflowTracker, NullTracker
from mvar.training.config import TrainConfig
from mvar.training.memory import PeakTracker
from mvar.training.optim import build_optimizer

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"


@dataclass
class Worker:
    """What one rank holds while it trains."""

    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: NextScaleTransformer
    tokenizer: torch.nn.Module
    tok_cfg: object
    schedule: str
    run_id: str

    @property
    def num_scales(self) -> int:
        return len(self.model.patch_nums)


def build_model(cfg: TrainConfig, tok_cfg, device: torch.device) -> NextScaleTransformer:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = NextScaleTransformer(cfg.model, tok_cfg.vocab_size, tok_cfg.z_channels, tuple(tok_cfg.patch_nums))
    if cfg.init_from:
        path = Path(cfg.init_from) / "model.pt"
        load_into(model, load_state_dict(path), path)
    return model.to(device)


def restore(ckpt_dir: Path, model, opt, sched) -> int:
    """Load a training checkpoint into model, optimizer and scheduler; returns its step."""
    load_into(model, load_state_dict(ckpt_dir / "model.pt"), ckpt_dir / "model.pt")
    state = torch.load(ckpt_dir / TRAIN_STATE, map_location="cpu", weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def save(w: Worker, opt, sched, step: int, steps_per_epoch: int, metrics: dict) -> None:
    """Every rank reports; rank 0 attaches a checkpoint directory that Ray Train persists."""
    import ray.train
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=f"step_{step:08d}")
        return
    with tempfile.TemporaryDirectory(prefix="mvar-ckpt-") as tmp:
        out = save_checkpoint(Path(tmp) / "ckpt", w.model, w.tokenizer, w.tok_cfg, extra={
            "train": {"step": step, "epoch": step // steps_per_epoch, "batch_in_epoch": step % steps_per_epoch,
                      "mlflow_run_id": w.run_id, "run_name": w.cfg.run.name}})
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                    "steps_per_epoch": steps_per_epoch, "mlflow_run_id": w.run_id}, out / TRAIN_STATE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)),
                         checkpoint_dir_name=f"step_{step:08d}")


def batches(loader, start_step: int):
    """Endless (x, labels) from the data position of ``start_step``: epoch = step // len, then skip."""
    n = len(loader)
    epoch, skip = divmod(start_step, n)
    while True:
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            if i >= skip:
                yield batch
        epoch, skip = epoch + 1, 0


@torch.no_grad()
def to_tokens(w: Worker, x: torch.Tensor) -> torch.Tensor:
    """(B, L) code indices: token shards as they are, image shards through the frozen tokenizer."""
    if x.dtype == torch.int64:
        return x.to(w.device, non_blocking=True)
    return torch.cat(w.tokenizer.img_to_idx(x.to(w.device, non_blocking=True)), dim=1)


def step_loss(w: Worker, ddp, idx_BL: torch.Tensor, labels_B: torch.Tensor, scales: tuple[int, ...]):
    """(mean loss, per-token losses (B, l), correct (B, l) bool) over the tokens of ``scales``."""
    with torch.no_grad():
        teacher = w.tokenizer.idx_to_teacher_input(w.tokenizer.split_flat_idx(idx_BL))
    targets_Bl = idx_BL[:, w.model.target_positions(scales, idx_BL.device)]
    use_bf16 = w.device.type == "cuda" and w.cfg.train.precision in ("auto", "bf16")
    with torch.autocast(w.device.type, dtype=torch.bfloat16, enabled=use_bf16):
        logits_BlV = ddp(labels_B, teacher, scales)
    per_token = F.cross_entropy(logits_BlV.float().transpose(1, 2), targets_Bl, reduction="none")
    return per_token.mean(), per_token.detach(), logits_BlV.detach().argmax(-1) == targets_Bl


def scale_metrics(w: Worker, scales, per_token_Bl, correct_Bl) -> dict[str, float]:
    out = {"train/acc": correct_Bl.float().mean().item()}
    begin = 0
    for s in scales:
        n = w.model.patch_nums[s] ** 2
        out[f"train/acc_s{s}"] = correct_Bl[:, begin:begin + n].float().mean().item()
        out[f"train/loss_s{s}"] = per_token_Bl[:, begin:begin + n].mean().item()
        begin += n
    return out


def all_ranks_finite(device: torch.device, *values: torch.Tensor) -> bool:
    """One 1-element all-reduce (MAX): every rank sees a NaN/inf of any rank at the same step.
    On ``device``: the NCCL backend that Ray Train sets up on GPUs reduces CUDA tensors only."""
    bad = torch.tensor([0.0 if all(torch.isfinite(v).all() for v in values) else 1.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bad.item() == 0.0


def optimizer_step(w, opt, sched, params, loss: torch.Tensor, cfg, step: int) -> tuple[float, torch.Tensor, dict | None]:
    """Backward, clipping to ``cfg.optim.grad_clip``, the all-ranks NaN/inf check, then the optimizer and
    schedule step. Returns (lr used, grad norm, None), or a ``nonfinite`` result for the loop to return when
    any rank saw a non-finite loss or gradient (nothing is stepped then). ``cfg.run.fault_nan_at_step``
    injects that fault for tests. Shared by the generator and tokenizer loops (``w`` has rank and device)."""
    if cfg.run.fault_nan_at_step == step + 1:
        loss = loss * float("nan")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip or math.inf)
    if not all_ranks_finite(w.device, loss.detach(), grad_norm.detach()):
        log.error("rank %d: non-finite loss or gradient at step %d; stopping", w.rank, step + 1)
        return 0.0, grad_norm, {"status": "nonfinite", "step": step + 1, "loss": loss.item()}
    lr = opt.param_groups[0]["lr"]
    opt.step()
    sched.step()
    return lr, grad_norm, None


@torch.no_grad()
def validate(w: Worker, ddp) -> float:
    """Mean next-scale loss over all scales of the held-out set (each sample once across ranks)."""
    fp = tokenizer_fingerprint(w.cfg.tokenizer)
    loader = build_eval_loader(w.cfg.data, w.rank, w.world, tokenizer_fingerprint=fp)
    ddp.eval()
    total = torch.zeros(2, dtype=torch.float64, device=w.device)  # NCCL reduces device tensors only
    model = ddp.module if isinstance(ddp, DistributedDataParallel) else ddp
    for x, labels, _ in loader:  # ranks may differ by one batch: no collective inside this loop
        idx = to_tokens(w, x)
        _, per_token, _ = step_loss(w, model, idx, labels.to(w.device), tuple(range(w.num_scales)))
        total[0] += per_token.sum().double()
        total[1] += per_token.numel()
    if dist.is_initialized():
        dist.all_reduce(total)
    ddp.train()
    return (total[0] / total[1].clamp(min=1)).item()


def make_tracker(w: Worker, start_step: int):
    if w.rank != 0 or not w.run_id:
        return NullTracker()
    # a restarted run (also one killed before its first checkpoint) skips, per key, the steps already logged
    tracker = MlflowTracker(w.run_id, w.cfg.tracking, skip_logged=True)
    tracker.start_system_metrics()
    if not start_step:  # what the model costs, for the report's columns
        tracker.log_metrics({"model/attn_gflops": attention_gflops(w.model),
                             "model/params_m": sum(p.numel() for p in w.model.parameters()) / 1e6}, 0)
    return tracker


def setup(config: dict) -> Worker:
    import ray.train
    import ray.train.torch
    cfg = from_dict(TrainConfig, config["train"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    tokenizer, tok_cfg = load_tokenizer(cfg.tokenizer, device)
    tokenizer.requires_grad_(False)
    model = build_model(cfg, tok_cfg, device)
    return Worker(cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device, model=model,
                  tokenizer=tokenizer, tok_cfg=tok_cfg, schedule=cfg.train.schedule_for(cfg.model.attention),
                  run_id=config.get("run_id", ""))


def train_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker. Returns {'status': 'completed' | 'nonfinite', 'step': ...}."""
    import ray.train
    w = setup(config)
    cfg = w.cfg
    loader = build_train_loader(cfg.data, w.rank, w.world, tokenizer_fingerprint=config.get("tokenizer_sha256"))
    opt, sched = build_optimizer(w.model, cfg.optim, cfg.data.batch_size * w.world, cfg.run.steps,
                                 fused=w.device.type == "cuda")
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = restore(Path(d), w.model, opt, sched)
        log.info("rank %d: resumed at step %d from %s", w.rank, start, ckpt.path)
    ddp = DistributedDataParallel(w.model, find_unused_parameters=w.schedule == "cycle") \
        if dist.is_initialized() else w.model
    tracker = make_tracker(w, start)
    try:
        return run_steps(w, ddp, loader, opt, sched, start, tracker)
    finally:
        tracker.close(status="")  # the driver marks the run finished or failed


def run_steps(w: Worker, ddp, loader, opt, sched, start: int, tracker) -> dict:
    cfg, params = w.cfg, [p for p in w.model.parameters() if p.requires_grad]
    data = batches(loader, start)
    peak = PeakTracker(w.device)
    interval_t, interval_n = time.perf_counter(), 0
    for step in range(start, cfg.run.steps):
        torch.manual_seed(cfg.run.seed + 1_000_003 * w.rank + step)  # class dropout etc., reproducible on resume
        x, labels = next(data)
        idx, labels = to_tokens(w, x), labels.to(w.device, non_blocking=True)
        scales = scales_for_step(w.schedule, w.num_scales, step)
        loss, per_token, correct = step_loss(w, ddp, idx, labels, scales)
        lr, grad_norm, stopped = optimizer_step(w, opt, sched, params, loss, cfg, step)
        if stopped:
            return stopped
        interval_n += 1
        done = step + 1
        if done % cfg.run.log_every == 0 or done == cfg.run.steps:
            now = time.perf_counter()
            step_s = (now - interval_t) / interval_n
            metrics = {"train/loss": loss.item(), "train/lr": lr, "train/grad_norm": grad_norm.item(),
                       "train/epoch": done / len(loader), "perf/step_s": step_s,
                       "perf/images_per_s": cfg.data.batch_size * w.world / step_s,
                       "perf/peak_mem_mb": peak.read_and_reset(),
                       "data/bad_samples": float(loader.bad_samples.value),
                       **scale_metrics(w, scales, per_token, correct)}
            tracker.log_metrics(metrics, done)
            interval_t, interval_n = time.perf_counter(), 0
        if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
            report = {"step": done, "train/loss": loss.item()}
            if cfg.data.eval_shards:
                report["val/loss"] = validate(w, ddp)
                tracker.log_metrics({"val/loss": report["val/loss"]}, done)
            save(w, opt, sched, done, len(loader), report)
            interval_t = time.perf_counter()  # checkpoint time is not step time
    return {"status": "completed", "step": cfg.run.steps}
