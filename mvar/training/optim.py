"""AdamW with VAR's parameter groups and the warm-up / linear-decay learning rate."""
from __future__ import annotations

import torch

from mvar.training.config import OptimConfig

# parameters that never get weight decay besides 1-D ones and biases: the embeddings
NO_DECAY_NAMES = ("pos_start", "pos_1LC", "lvl_embed", "class_emb")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(".bias") or any(part in name.split(".") for part in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    return cfg.lr if cfg.lr > 0 else cfg.base_lr * global_batch / 256


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr for 0-based ``step``: linear warm-up, then linear decay to ``end_ratio``."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.warmup_start_ratio + (1 - cfg.warmup_start_ratio) * step / cfg.warmup_steps
    decay_steps = max(total_steps - cfg.warmup_steps - 1, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    return 1.0 + (cfg.end_ratio - 1.0) * progress


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig, global_batch: int, total_steps: int,
                    fused: bool = False):
    """(AdamW, LambdaLR) for ``model``; step the scheduler once per optimizer step."""
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak_lr(cfg, global_batch),
                            betas=tuple(cfg.betas), fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total_steps, cfg))
    return opt, sched
