"""The generator's training task: what one VAR / MVAR step computes, logs, validates and checkpoints.

``GeneratorTask`` plugs into the trainer core (`mvar.training.trainer`), which runs the
same way in a test, a notebook, one process (`mvar train --local`) or a Ray Train
worker (its spec: `mvar.training.tasks.GENERATOR`). A step: the batch's code indices (token shards as they
are, image shards through the frozen tokenizer), the tokenizer's teacher-forcing
input, the transformer over the step's scales (`train.scale_schedule`), and the
authors' loss (`mvar.models.schedule.next_scale_loss`: every token weighted 1/L).
Logged: `train/loss` (the plain token mean, the authors' Lm), `train/acc`, and per
scale `train/acc_s{k}` and `train/loss_s{k}` for the scales each step trained on.

Collectives besides the core's: DDP's gradient all-reduce and the validation sums.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist

from mvar.measure import attention_gflops
from mvar.checkpoint import (
    load_into,
    load_state_dict,
    load_tokenizer,
    save_checkpoint,
    tokenizer_fingerprint,
)
from mvar.config import to_dict
from mvar.data import build_eval_loader
from mvar.models import NextScaleTransformer
from mvar.models.schedule import NextScaleLoss, next_scale_loss, scales_for_step
from mvar.training.config import TrainConfig
from mvar.training.optim import param_groups
from mvar.training.trainer import TrainTask, autocast, maybe_ddp, resolve_precision

log = logging.getLogger(__name__)


def build_model(cfg: TrainConfig, tok_cfg, device: torch.device) -> NextScaleTransformer:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    model = NextScaleTransformer(cfg.model, tok_cfg.vocab_size, tok_cfg.z_channels, tuple(tok_cfg.patch_nums))
    if cfg.init_from:
        path = Path(cfg.init_from) / "model.pt"
        load_into(model, load_state_dict(path), path)
    return model.to(device)


class GeneratorTask(TrainTask):
    """VAR / MVAR next-scale training of ``model`` with the frozen ``tokenizer`` (its teacher input)."""

    def __init__(self, cfg: TrainConfig, model: NextScaleTransformer, tokenizer, device: torch.device,
                 rank: int = 0, world: int = 1):
        self.cfg, self.model, self.module, self.forward = cfg, model, model, model
        self.tokenizer, self.device, self.rank, self.world = tokenizer.requires_grad_(False), device, rank, world
        self.schedule = cfg.train.schedule_for(cfg.model.attention)
        self.precision = resolve_precision(cfg.train.precision, device)

    @property
    def num_scales(self) -> int:
        return len(self.model.patch_nums)

    def scales(self, step: int) -> tuple[int, ...]:
        return scales_for_step(self.schedule, self.num_scales, step, self.cfg.model.markov_from_scale,
                               self.cfg.train.cycle_ratio)

    def step_type(self, step: int) -> str:
        """``full`` (every scale, the full and packed schedules); in the cycle ``dense`` (the scales
        before model.markov_from_scale, packed) or ``s<k>`` (windowed scale k alone)."""
        if self.schedule != "cycle":
            return "full"
        scales = self.scales(step)
        return f"s{scales[0]}" if len(scales) == 1 and scales[0] >= self.split else "dense"

    def pyramid_types(self) -> tuple[str, ...]:
        """Every scale once: one full step, or one dense step plus one step of each windowed scale."""
        if self.schedule != "cycle":
            return ("full",)
        return ("dense", *(f"s{k}" for k in range(self.split, self.num_scales)))

    @property
    def split(self) -> int:
        return self.cfg.model.markov_from_scale

    def step_tokens(self, step: int) -> int:
        return sum(self.model.patch_nums[s] ** 2 for s in self.scales(step))

    def param_groups(self) -> list[dict]:
        return param_groups(self.model.named_parameters(), self.cfg.optim.no_decay_keys)

    def distribute(self) -> None:
        # a cycle step leaves parameters unused (pos_start without scale 0, ...)
        self.forward = maybe_ddp(self.model, find_unused_parameters=self.schedule == "cycle")

    @torch.no_grad()
    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L) code indices: token shards as they are, image shards through the frozen tokenizer."""
        if x.dtype == torch.int64:
            return x.to(self.device, non_blocking=True)
        return torch.cat(self.tokenizer.img_to_idx(x.to(self.device, non_blocking=True)), dim=1)

    def step_loss(self, forward, idx_BL: torch.Tensor, labels_B: torch.Tensor, scales) -> NextScaleLoss:
        with torch.no_grad():
            teacher = self.tokenizer.idx_to_teacher_input(self.tokenizer.split_flat_idx(idx_BL))
        with autocast(self.precision, self.device):
            return next_scale_loss(forward, labels_B, idx_BL, teacher, scales)

    def loss(self, batch, step: int):
        x, labels = batch[0], batch[1]
        scales = self.scales(step)
        out = self.step_loss(self.forward, self.to_tokens(x), labels.to(self.device, non_blocking=True), scales)
        return out.loss, self.scale_metrics(scales, out)

    def scale_metrics(self, scales, out: NextScaleLoss) -> dict[str, torch.Tensor]:
        metrics = {"train/loss": out.token_mean, "train/acc": out.correct_Bl.float().mean()}
        begin = 0
        for s in scales:
            n = self.model.patch_nums[s] ** 2
            metrics[f"train/acc_s{s}"] = out.correct_Bl[:, begin:begin + n].float().mean()
            metrics[f"train/loss_s{s}"] = out.per_token_Bl[:, begin:begin + n].mean()
            begin += n
        return metrics

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """`val/loss`: mean next-scale loss over all scales of the held-out set (each sample once across ranks)."""
        if not self.cfg.data.eval_shards:
            return {}
        fp = tokenizer_fingerprint(self.cfg.tokenizer)
        loader = build_eval_loader(self.cfg.data, self.rank, self.world, tokenizer_fingerprint=fp)
        self.model.eval()
        total = torch.zeros(2, dtype=torch.float64, device=self.device)  # NCCL reduces device tensors only
        everything = tuple(range(self.num_scales))
        for x, labels, _ in loader:  # ranks may differ by one batch: no collective inside this loop
            out = self.step_loss(self.model, self.to_tokens(x), labels.to(self.device), everything)
            total[0] += out.per_token_Bl.sum().double()
            total[1] += out.per_token_Bl.numel()
        if dist.is_initialized():
            dist.all_reduce(total)
        self.model.train()
        return {"val/loss": (total[0] / total[1].clamp(min=1)).item()}

    def sample_grid(self) -> torch.Tensor | None:
        """One image of each class 0..train.sample_images-1 (the run's sampling.* settings, seed run.seed:
        the same noise at every checkpoint, so the grids show the model change)."""
        from torchvision.utils import make_grid

        from mvar.sampling import make_generator, sample_images
        n = min(self.cfg.train.sample_images, self.cfg.model.num_classes)
        if n == 0:
            return None
        s = self.cfg.sampling
        self.model.eval()
        try:
            with torch.no_grad():
                imgs = sample_images(self.model, self.tokenizer, torch.arange(n, device=self.device), cfg=s.cfg,
                                     top_k=s.top_k, top_p=s.top_p, generator=make_generator(self.cfg.run.seed,
                                                                                            self.device))
        finally:
            self.model.train()
        return make_grid(imgs.float().clamp(0, 1).cpu(), nrow=min(n, 10), padding=2)

    def save_weights(self, out: Path, meta: dict) -> Path:
        """A model checkpoint (what `mvar sample` and `mvar eval` load) with the run's sampling defaults."""
        return save_checkpoint(out, self.model, self.tokenizer, self.tok_cfg, extra={
            "train": meta, "sampling": to_dict(self.cfg.sampling)})

    def load_weights(self, ckpt_dir: Path) -> None:
        load_into(self.model, load_state_dict(ckpt_dir / "model.pt"), ckpt_dir / "model.pt")

    @property
    def tok_cfg(self):
        return self.tokenizer.cfg

    def first_metrics(self) -> dict[str, float]:
        """What the model costs, logged once at step 0 (the report's columns)."""
        return {"model/attn_gflops": attention_gflops(self.model),
                "model/params_m": sum(p.numel() for p in self.model.parameters()) / 1e6}


def build_task(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> GeneratorTask:
    tokenizer, tok_cfg = load_tokenizer(cfg.tokenizer, device)
    return GeneratorTask(cfg, build_model(cfg, tok_cfg, device), tokenizer, device, rank, world)

