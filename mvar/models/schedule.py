"""Which scales a training step covers, and the next-scale loss over them (the authors' weighting).

VAR trains on the full sequence (``full``). Under scale-Markov attention a scale
depends only on its own teacher input, so the MVAR authors cycle (``cycle``):
``cycle_ratio`` steps on the dense scales 0..markov_from_scale-1 packed into one
sequence, then each windowed scale markov_from_scale..K-1 alone, each step on a
fresh batch: a period of ``cycle_ratio + K - markov_from_scale`` steps (the
paper's 8:1:1 is cycle_ratio 8 with markov_from_scale K-2). ``scale_markov`` has
no windowed scales, but the cycle splits its scales at the same index, so the
two variants train on the same steps and differ only in their attention. Packing
every scale at once under the Markov mask (``packed``) also works.
"""
from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

from mvar.models.transformer import NextScaleTransformer

ScaleSchedule = Literal["full", "cycle", "packed"]
DEFAULT_CYCLE_RATIO = 8


def markov_cycle(num_scales: int, markov_from_scale: int | None = None,
                 cycle_ratio: int = DEFAULT_CYCLE_RATIO) -> list[tuple[int, ...]]:
    """One period of the cycle as tuples of 0-based scale indices; ``markov_from_scale`` None = K-2 (8:1:1)."""
    split = num_scales - 2 if markov_from_scale is None else markov_from_scale
    if not 1 <= split < num_scales:
        raise ValueError(f"markov_from_scale {split} leaves no dense or no windowed scale of {num_scales}")
    if cycle_ratio < 1:
        raise ValueError(f"cycle_ratio must be >= 1, got {cycle_ratio}")
    return [tuple(range(split))] * cycle_ratio + [(s,) for s in range(split, num_scales)]


def scales_for_step(schedule: str, num_scales: int, step: int, markov_from_scale: int | None = None,
                    cycle_ratio: int = DEFAULT_CYCLE_RATIO) -> tuple[int, ...]:
    """The scales of 0-based ``step``: its place in the cycle is ``step % period``."""
    if schedule in ("full", "packed"):
        return tuple(range(num_scales))
    if schedule == "cycle":
        cycle = markov_cycle(num_scales, markov_from_scale, cycle_ratio)
        return cycle[step % len(cycle)]
    raise ValueError(f"unknown scale schedule '{schedule}'; known: full, cycle, packed")


class NextScaleLoss(NamedTuple):
    loss: torch.Tensor          # what is back-propagated: sum over the step's tokens of CE / L, mean over the batch
    per_token_Bl: torch.Tensor  # detached cross-entropy of each token of the step
    correct_Bl: torch.Tensor    # argmax == target, bool

    @property
    def token_mean(self) -> torch.Tensor:
        """The plain mean cross-entropy of the step's tokens (what is logged, the authors' Lm)."""
        return self.per_token_Bl.mean()


def next_scale_loss(model: NextScaleTransformer, labels_B: torch.Tensor, idx_BL: torch.Tensor,
                    teacher_BLCv: torch.Tensor, scales: tuple[int, ...] | None = None) -> NextScaleLoss:
    """Teacher-forced cross-entropy over the tokens of ``scales`` (default: all).

    Every token is weighted 1/L, L the tokens of ALL scales, whatever the step trains on
    (both authors' trainers): a cycle step on a few scales gets the share of the gradient
    those scales have in the full sequence, not the mean over its own tokens.
    ``model`` may be a DDP wrapper; its ``module`` (or itself) gives the token layout.
    """
    net = getattr(model, "module", model)
    logits_BlV = model(labels_B, teacher_BLCv, scales)
    targets_Bl = idx_BL[:, net.target_positions(scales, idx_BL.device)]
    per_token_Bl = F.cross_entropy(logits_BlV.float().transpose(1, 2), targets_Bl, reduction="none")
    loss = per_token_Bl.mul(1.0 / net.L).sum(dim=-1).mean()
    return NextScaleLoss(loss, per_token_Bl.detach(), logits_BlV.detach().argmax(-1) == targets_Bl)
