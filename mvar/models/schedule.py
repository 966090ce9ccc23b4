"""Which scales a training step covers, and the next-scale loss over them.

VAR trains on the full sequence. Under scale-Markov attention the scales are
independent given the teacher input, so the MVAR authors cycle through 10
iterations: 8 on scales 1..K-2 packed, 1 on scale K-1 alone, 1 on scale K
alone, each on a fresh batch (``cycle``). Packing every scale at once with
the Markov mask also works (``packed``).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

from mvar.models.transformer import NextScaleTransformer

ScaleSchedule = Literal["full", "cycle", "packed"]
CYCLE_LENGTH = 10


def markov_cycle(num_scales: int) -> list[tuple[int, ...]]:
    """The 8:1:1 cycle as 10 tuples of 0-based scale indices."""
    small = tuple(range(num_scales - 2))
    return [small] * 8 + [(num_scales - 2,), (num_scales - 1,)]


def scales_for_step(schedule: str, num_scales: int, step: int) -> tuple[int, ...]:
    if schedule in ("full", "packed"):
        return tuple(range(num_scales))
    if schedule == "cycle":
        return markov_cycle(num_scales)[step % CYCLE_LENGTH]
    raise ValueError(f"unknown scale schedule '{schedule}'; known: full, cycle, packed")


def next_scale_loss(model: NextScaleTransformer, labels_B: torch.Tensor, idx_BL: torch.Tensor,
                    teacher_BLCv: torch.Tensor, scales: tuple[int, ...] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean cross-entropy, logits (B, l, V), targets (B, l)) over the tokens of ``scales``."""
    logits_BlV = model(labels_B, teacher_BLCv, scales)
    targets_Bl = idx_BL[:, model.target_positions(scales, idx_BL.device)]
    loss = F.cross_entropy(logits_BlV.reshape(-1, logits_BlV.shape[-1]), targets_Bl.reshape(-1))
    return loss, logits_BlV, targets_Bl
