"""Training the multi-scale tokenizer on Ray Train: the per-worker loop and the driver around it.

Each rank builds the tokenizer (from `init_from` when given), restores the
latest Ray Train checkpoint if there is one (weights, optimizer, scheduler,
step; the data position is the step), wraps the training objective in DDP
and steps through its share of the image shards. The objective is L1 + L2
reconstruction, the multi-scale VQ loss, and a VGG16 perceptual term when
`losses.perceptual_weight` > 0 (weights from a local file only). Encoder and
decoder run under bf16 autocast on GPU; the quantizer always runs in float32
so that code choice does not depend on the precision.

Collectives per step: DDP's gradient all-reduce and one 1-element all-reduce
(a NaN/inf on any rank stops every rank at the same step); at log steps the
code histograms; at checkpoints `ray.train.report` on every rank (rank 0
attaches the checkpoint) and the validation sums.

The driver (`train_tokenizer`) checks every input before Ray starts, runs
`mvar.training.launch.launch`, then writes the final tokenizer checkpoint to
`output` with `save_tokenizer`: the directory `train` (`tokenizer: DIR`) and
`mvar data tokenize --tokenizer DIR` read.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mvar.checkpoint import (
    load_into,
    load_state_dict,
    load_tokenizer,
    load_train_state,
    read_tokenizer_config,
    save_tokenizer,
    tokenizer_dir,
)
from mvar.config import from_dict
from mvar.data import build_eval_loader, build_train_loader
from mvar.data.storage import is_local
from mvar.errors import UserError
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.tokenizer.perceptual import VGGPerceptual, load_perceptual
from mvar.tracking import MlflowTracker, NullTracker
from mvar.training.config import OptimConfig
from mvar.training.launch import TrainOutcome, launch, storage_location
from mvar.training.loop import batches, optimizer_step
from mvar.training.memory import PeakTracker
from mvar.training.optim import lr_factor, peak_lr
from mvar.training.tokenizer_config import TokenizerLossConfig, TokenizerTrainConfig

log = logging.getLogger(__name__)

TRAIN_STATE = "train_state.pt"
LOSS_KEYS = ("loss", "recon_l1", "recon_l2", "vq_loss", "perceptual")
# the tokenizer fields that fix the parameters' shapes: init_from must agree on them
SHAPE_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "share_quant_resi")


class TokenizerObjective(nn.Module):
    """What DDP wraps: the tokenizer (trained) and the frozen perceptual net; forward -> loss terms."""

    def __init__(self, vae: MultiScaleVQVAE, weights: TokenizerLossConfig, perceptual: VGGPerceptual | None,
                 bf16: bool = False):
        super().__init__()
        self.vae, self.weights, self.perceptual, self.bf16 = vae, weights, perceptual, bf16

    def _autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def forward(self, img_B3HW: torch.Tensor) -> dict:
        """{'loss', 'recon_l1', 'recon_l2', 'vq_loss', 'perceptual' (scalars), 'indices' (per scale (B, pn*pn))}."""
        vae, w, dev = self.vae, self.weights, img_B3HW.device.type
        with self._autocast(dev):
            f_BChw = vae.img_to_features(img_B3HW)
        f_hat, vq, indices = vae.quantize(f_BChw.float())  # float32: code choice must not depend on precision
        with self._autocast(dev):
            recon = vae.decoder(vae.post_quant_conv(f_hat)).float()
        l1, l2 = F.l1_loss(recon, img_B3HW), F.mse_loss(recon, img_B3HW)
        total = w.l1_weight * l1 + w.l2_weight * l2 + w.vq_weight * vq
        perceptual = total.new_zeros(())
        if self.perceptual is not None and w.perceptual_weight > 0:
            with self._autocast(dev):
                perceptual = self.perceptual(recon, img_B3HW)
            total = total + w.perceptual_weight * perceptual
        return {"loss": total, "recon_l1": l1, "recon_l2": l2, "vq_loss": vq, "perceptual": perceptual,
                "indices": indices}


def code_hits(indices: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(2, V) code counts: all scales, last scale."""
    every = torch.cat([i.flatten() for i in indices])
    return torch.stack([torch.bincount(every, minlength=vocab_size),
                        torch.bincount(indices[-1].flatten(), minlength=vocab_size)]).float()


def usage(hits_2V: torch.Tensor, prefix: str) -> dict[str, float]:
    """Fraction of the codebook used, summed over ranks (one all-reduce of 2 x V counts)."""
    if dist.is_initialized():
        dist.all_reduce(hits_2V)
    used = hits_2V.gt(0).float().mean(1).tolist()
    return {f"{prefix}/codebook_usage": used[0], f"{prefix}/codebook_usage_last": used[1]}


def build_optimizer(vae: nn.Module, cfg: OptimConfig, global_batch: int, total_steps: int, fused: bool = False):
    """(AdamW, LambdaLR): no weight decay on 1-D params, biases and the codebook; the generator's lr schedule."""
    decay, no_decay = [], []
    for name, p in vae.named_parameters():
        skip = p.ndim < 2 or name.endswith(".bias") or name == "quantize.embedding.weight"
        (no_decay if skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=peak_lr(cfg, global_batch), betas=tuple(cfg.betas), fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, cfg))
    return opt, sched


@dataclass
class Worker:
    """What one rank holds while it trains."""

    cfg: TokenizerTrainConfig
    rank: int
    world: int
    device: torch.device
    vae: MultiScaleVQVAE
    objective: TokenizerObjective
    run_id: str


def build_objective(cfg: TokenizerTrainConfig, device: torch.device) -> TokenizerObjective:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    vae = MultiScaleVQVAE(cfg.tokenizer)
    if cfg.init_from:
        path = tokenizer_dir(cfg.init_from) / "tokenizer.pt"
        load_into(vae, load_state_dict(path), path)
    perceptual = None
    if cfg.losses.perceptual:
        perceptual = load_perceptual(cfg.losses.perceptual_weights, cfg.losses.perceptual_layers)
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    return TokenizerObjective(vae, cfg.losses, perceptual, bf16).to(device)


def setup(config: dict) -> Worker:
    import ray.train
    import ray.train.torch
    cfg = from_dict(TokenizerTrainConfig, config["train"])
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    objective = build_objective(cfg, device)
    return Worker(cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
                  vae=objective.vae, objective=objective, run_id=config.get("run_id", ""))


def restore(ckpt_dir: Path, vae: nn.Module, opt, sched) -> int:
    """Load a training checkpoint into tokenizer, optimizer and scheduler; returns its step."""
    load_into(vae, load_state_dict(ckpt_dir / "tokenizer.pt"), ckpt_dir / "tokenizer.pt")
    state = load_train_state(ckpt_dir / TRAIN_STATE)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def write_checkpoint(out: Path, vae: MultiScaleVQVAE, tok_cfg: TokenizerConfig, opt, sched, step: int,
                     run_id: str = "", run_name: str = "") -> Path:
    """A tokenizer checkpoint directory (what `load_tokenizer` reads) plus the train state that `restore` reads."""
    save_tokenizer(out, vae, tok_cfg)
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step,
                "mlflow_run_id": run_id}, out / TRAIN_STATE)
    (out / "train.yaml").write_text(yaml.safe_dump(
        {"step": step, "mlflow_run_id": run_id, "run_name": run_name}, sort_keys=False))
    return out


def save(w: Worker, opt, sched, step: int, metrics: dict) -> None:
    """Every rank reports; rank 0 attaches a tokenizer checkpoint (+ train state) that Ray Train persists."""
    import ray.train
    name = f"step_{step:08d}"
    if w.rank != 0:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name)
        return
    with tempfile.TemporaryDirectory(prefix="mvar-tok-ckpt-") as tmp:
        out = write_checkpoint(Path(tmp) / "ckpt", w.vae, w.cfg.tokenizer, opt, sched, step, w.run_id, w.cfg.run.name)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(out)), checkpoint_dir_name=name)


@torch.no_grad()
def validate(w: Worker) -> dict[str, float]:
    """Reconstruction through the discrete path that `tokenize` and sampling use (indices -> image, clamped)."""
    loader = build_eval_loader(w.cfg.data, w.rank, w.world)
    w.vae.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=w.device)  # on the device: NCCL has no CPU tensors
    hits = torch.zeros(2, w.cfg.tokenizer.vocab_size, device=w.device)
    for x, _, _ in loader:  # ranks may differ by one batch: no collective inside this loop
        x = x.to(w.device, non_blocking=True)
        idx = w.vae.img_to_idx(x)
        recon = w.vae.idx_to_img(idx).float()
        err = (recon - x).double()
        sums += torch.stack([err.abs().mean((1, 2, 3)).sum(), err.square().mean((1, 2, 3)).sum(),
                             err.new_tensor(x.shape[0])])
        hits += code_hits(idx, w.cfg.tokenizer.vocab_size)
    if dist.is_initialized():
        dist.all_reduce(sums)
    w.vae.train()
    n = sums[2].clamp(min=1)
    return {"val/recon_l1": (sums[0] / n).item(), "val/recon_l2": (sums[1] / n).item(), **usage(hits, "val")}


def make_tracker(w: Worker, start_step: int):
    """Rank 0 logs into the driver's MLflow run; a resumed run logs only the steps after the last logged one."""
    if w.rank != 0 or not w.run_id:
        return NullTracker()
    tracker = MlflowTracker(w.run_id, w.cfg.tracking, skip_logged=True)
    tracker.start_system_metrics()
    if not start_step:
        tracker.log_metrics({"model/params_m": sum(p.numel() for p in w.vae.parameters()) / 1e6}, 0)
    return tracker


def train_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker. Returns {'status': 'completed' | 'nonfinite', 'step': ...}."""
    import ray.train
    w = setup(config)
    cfg = w.cfg
    loader = build_train_loader(cfg.data, w.rank, w.world)
    opt, sched = build_optimizer(w.vae, cfg.optim, cfg.data.batch_size * w.world, cfg.run.steps,
                                 fused=w.device.type == "cuda")
    start = 0
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            start = restore(Path(d), w.vae, opt, sched)
        log.info("rank %d: resumed at step %d from %s", w.rank, start, ckpt.path)
    # scales that share a phi leave the other phis unused (fewer scales than share_quant_resi)
    unused = len(set(w.vae.quantize.phi_of_scale)) < len(w.vae.quantize.quant_resi.qresi_ls)
    ddp = DistributedDataParallel(w.objective, find_unused_parameters=unused) if dist.is_initialized() \
        else w.objective
    tracker = make_tracker(w, start)
    try:
        return run_steps(w, ddp, loader, opt, sched, start, tracker)
    finally:
        tracker.close(status="")  # the driver marks the run finished or failed


@dataclass
class Interval:
    """Sums over the steps since the last log (rank 0's values)."""

    t0: float
    steps: int = 0
    sums: torch.Tensor | None = None

    def add(self, out: dict) -> None:
        values = torch.stack([out[k].detach().float() for k in LOSS_KEYS])
        self.sums = values if self.sums is None else self.sums + values
        self.steps += 1


def log_step(w: Worker, tracker, interval: Interval, out: dict, done: int, lr: float, grad_norm, peak) -> None:
    cfg = w.cfg
    step_s = (time.perf_counter() - interval.t0) / interval.steps
    means = (interval.sums / interval.steps).tolist()
    metrics = {f"train/{k}": v for k, v in zip(LOSS_KEYS, means) if k != "perceptual" or cfg.losses.perceptual}
    metrics.update({"train/lr": lr, "train/grad_norm": grad_norm.item(), "perf/step_s": step_s,
                    "perf/images_per_s": cfg.data.batch_size * w.world / step_s,
                    "perf/peak_mem_mb": peak.read_and_reset()})
    metrics.update(usage(code_hits(out["indices"], cfg.tokenizer.vocab_size), "train"))
    tracker.log_metrics(metrics, done)


def run_steps(w: Worker, ddp, loader, opt, sched, start: int, tracker) -> dict:
    cfg, params = w.cfg, [p for p in w.vae.parameters() if p.requires_grad]
    data = batches(loader, start)
    peak = PeakTracker(w.device)
    interval = Interval(time.perf_counter())
    for step in range(start, cfg.run.steps):
        torch.manual_seed(cfg.run.seed + 1_000_003 * w.rank + step)
        x, _ = next(data)
        out = ddp(x.to(w.device, non_blocking=True))
        lr, grad_norm, stopped = optimizer_step(w, opt, sched, params, out["loss"], cfg, step)
        if stopped:
            return stopped
        interval.add(out)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == cfg.run.steps:
            log_step(w, tracker, interval, out, done, lr, grad_norm, peak)
            interval = Interval(time.perf_counter())
        if done % cfg.run.checkpoint_every == 0 or done == cfg.run.steps:
            t = time.perf_counter()
            report = {"step": done, "train/loss": out["loss"].item()}
            if cfg.data.eval_shards:
                report.update(validate(w))
                tracker.log_metrics({k: v for k, v in report.items() if k.startswith("val/")}, done)
            save(w, opt, sched, done, report)
            interval.t0 += time.perf_counter() - t  # checkpoint time is not step time
    return {"status": "completed", "step": cfg.run.steps}


# -- the driver -------------------------------------------------------------------

def _check_shards(cfg: TokenizerTrainConfig) -> None:
    from mvar.data.loader import open_shard_set
    for key, location in (("data.shards", cfg.data.shards), ("data.eval_shards", cfg.data.eval_shards)):
        if not location:
            continue
        try:
            manifest = open_shard_set(location, "images")
        except UserError as err:
            raise UserError(f"{key}: {err}") from None
        if manifest.image_size != cfg.tokenizer.image_size:
            raise UserError(f"{key}: '{location}' holds {manifest.image_size} px images but the tokenizer takes "
                            f"{cfg.tokenizer.image_size} px (tokenizer.image_size); repack with "
                            f"`mvar data pack --image-size {cfg.tokenizer.image_size}` or pick another tokenizer_name")


def _check_init_from(cfg: TokenizerTrainConfig) -> None:
    if not cfg.init_from:
        return
    try:
        theirs = read_tokenizer_config(cfg.init_from)
    except UserError as err:
        raise UserError(f"init_from: {err}") from None
    ours = cfg.tokenizer
    for attr in SHAPE_FIELDS:
        a, b = getattr(theirs, attr), getattr(ours, attr)
        if a != b:
            raise UserError(f"init_from: '{cfg.init_from}' has tokenizer.{attr} {a}, this run's tokenizer has {b}")
    if len(theirs.patch_nums) != len(ours.patch_nums):
        raise UserError(f"init_from: '{cfg.init_from}' has {len(theirs.patch_nums)} scales (tokenizer.patch_nums "
                        f"{list(theirs.patch_nums)}), this run's tokenizer has {len(ours.patch_nums)}")


def _check_output(cfg: TokenizerTrainConfig, storage: str) -> None:
    out = cfg.output_dir(storage)
    if not is_local(out):
        raise UserError(f"output: the final tokenizer is written to a local (or shared) path, got '{out}'; "
                        "set output to a directory")
    p = Path(out)
    if p.exists() and not (p / "tokenizer.yaml").is_file() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(f"output: '{out}' exists and is not a tokenizer checkpoint; choose another directory")


def prepare(cfg: TokenizerTrainConfig) -> None:
    """Every check on the run's inputs; raises UserError naming the key before anything starts."""
    _check_shards(cfg)
    if cfg.losses.perceptual:
        load_perceptual(cfg.losses.perceptual_weights, cfg.losses.perceptual_layers)  # the file exists and fits
    _check_init_from(cfg)
    _check_output(cfg, storage_location(cfg.run.storage_path))


def write_output(cfg: TokenizerTrainConfig, outcome: TrainOutcome, storage: str) -> Path:
    """The final Ray checkpoint's tokenizer -> `output` (replacing an earlier tokenizer there)."""
    from ray.train import Checkpoint
    if not outcome.checkpoint:
        raise UserError(f"run '{cfg.run.name}' ended without a checkpoint; nothing to write to output")
    with Checkpoint(outcome.checkpoint).as_directory() as d:
        vae, tok_cfg = load_tokenizer(d)
    out = Path(cfg.output_dir(storage)).resolve()
    return save_tokenizer(out, vae, tok_cfg, overwrite=out.exists())  # prepare() refused anything else there


def train_tokenizer(cfg: TokenizerTrainConfig) -> tuple[TrainOutcome, Path]:
    """Check every input, train with Ray Train, write the tokenizer to `output`; (outcome, output dir)."""
    from mvar import tracking
    from mvar.checkpoint import tokenizer_fingerprint
    prepare(cfg)
    tags = {"mvar.task": "tokenizer", "mvar.model": f"tokenizer-{cfg.tokenizer_name or 'custom'}"}
    outcome = launch(cfg, train_worker, {}, tags)
    out = write_output(cfg, outcome, storage_location(cfg.run.storage_path))
    c = tracking.client(cfg.tracking.uri)
    c.set_tag(outcome.run_id, "mvar.tokenizer", str(out))
    c.set_tag(outcome.run_id, "mvar.tokenizer_sha256", tokenizer_fingerprint(out))
    return outcome, out
