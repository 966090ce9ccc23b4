"""AdamW with the authors' parameter groups, and their `lin0` learning-rate / weight-decay schedule.

Both VAR's and MVAR's `train.py` exclude from weight decay every 1-D tensor, every
bias and every parameter whose name *contains* one of their keys (so the 4-D
attention temperature `scale_mul_1H11` is not decayed and `class_emb` is). Their
`lr_wd_annealing` sets lr and weight decay of every group before each step:
linear warm-up, the peak held for a while, linear decay; weight decay cosine
from its start to its end value (constant in every README run but VAR-d30's).
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from mvar.training.config import OptimConfig


def no_decay(name: str, p: torch.Tensor, keys: Iterable[str]) -> bool:
    return p.ndim <= 1 or name.endswith("bias") or any(k in name for k in keys)


def param_groups(named: Iterable[tuple[str, torch.nn.Parameter]], keys: Iterable[str]) -> list[dict]:
    """[decayed, not decayed]; ``wd_scale`` multiplies the scheduled weight decay of each group."""
    keys = tuple(keys)
    decay, skip = [], []
    for name, p in named:
        if p.requires_grad:
            (skip if no_decay(name, p, keys) else decay).append(p)
    return [{"params": decay, "wd_scale": 1.0}, {"params": skip, "wd_scale": 0.0}]


def no_decay_names(model: torch.nn.Module, keys: Iterable[str]) -> list[str]:
    keys = tuple(keys)
    return sorted(n for n, p in model.named_parameters() if p.requires_grad and no_decay(n, p, keys))


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr if cfg.lr > 0 else cfg.base_lr * global_batch / 256


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    return cfg.warmup_steps or round(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr at 0-based ``step`` (the authors' `lin0`): linear warm-up from
    ``warmup_start_ratio``; then, with p the progress over the remaining steps, the peak while
    p < ``hold_ratio``, then linear down to ``end_ratio`` at the last step."""
    wp = warmup_steps(cfg, total_steps)
    if step < wp:
        return cfg.warmup_start_ratio + (1 - cfg.warmup_start_ratio) * step / wp
    progress = min((step - wp) / max(total_steps - 1 - wp, 1), 1.0)
    if progress < cfg.hold_ratio:
        return 1.0
    return cfg.end_ratio + (1 - cfg.end_ratio) * (1 - progress) / (1 - cfg.hold_ratio)


def weight_decay_at(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Cosine from ``weight_decay`` at step 0 to ``weight_decay_end`` at the last step (constant when unset)."""
    end = cfg.weight_decay if cfg.weight_decay_end is None else cfg.weight_decay_end
    progress = min(step / max(total_steps - 1, 1), 1.0)
    return end + (cfg.weight_decay - end) * (0.5 + 0.5 * math.cos(math.pi * progress))


class Schedule:
    """Sets lr and weight decay of every group for the coming step; ``step()`` after each optimizer step.

    ``last_epoch`` counts the steps done (the name and state dict of torch's schedulers, so the
    train states written with a LambdaLR load into it)."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: OptimConfig, peak: float, total_steps: int):
        self.opt, self.cfg, self.peak, self.total_steps = opt, cfg, peak, total_steps
        self.last_epoch = 0
        self.apply()

    def apply(self) -> None:
        lr = self.peak * lr_factor(self.last_epoch, self.total_steps, self.cfg)
        wd = weight_decay_at(self.last_epoch, self.total_steps, self.cfg)
        for group in self.opt.param_groups:
            group["lr"] = lr
            group["weight_decay"] = wd * group.get("wd_scale", 1.0)

    def step(self) -> None:
        self.last_epoch += 1
        self.apply()

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.apply()


def build_optimizer(groups: list[dict], cfg: OptimConfig, global_batch: int, total_steps: int,
                    fused: bool = False) -> tuple[torch.optim.AdamW, Schedule]:
    """(AdamW, Schedule) over ``groups`` (from ``param_groups``); step the schedule once per optimizer step."""
    peak = peak_lr(cfg, global_batch)
    opt = torch.optim.AdamW(groups, lr=peak, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0,
                            fused=fused or None)
    return opt, Schedule(opt, cfg, peak, total_steps)
