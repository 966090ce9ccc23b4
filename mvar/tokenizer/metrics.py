"""How well a tokenizer uses its codebook and reconstructs: per-scale usage and perplexity, PSNR.

    counts_SV = code_counts(vae.img_to_idx(x), vocab_size)      # add batches up, all-reduce across ranks
    usage_metrics(counts_SV)   # {'tok/usage_s0': % of the codebook used at scale 0, 'tok/perplexity_s0': ..., ...}
    psnr_db(recon, x)          # (B,) dB, images in [-1, 1]

Scales are 0-based, as in the generator's `train/acc_s{s}`. Torch only.
"""
from __future__ import annotations

import torch


def code_counts(indices: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(S, V) float counts of each code at each scale, from one index tensor per scale (any shape)."""
    return torch.stack([torch.bincount(idx.flatten(), minlength=vocab_size) for idx in indices]).float()


def usage_percent(counts_SV: torch.Tensor) -> torch.Tensor:
    """(S,) share of the codebook that occurs at least once at each scale, in %."""
    return counts_SV.gt(0).float().mean(1) * 100


def perplexity(counts_SV: torch.Tensor) -> torch.Tensor:
    """(S,) exp of the entropy of each scale's code distribution: 1 = one code, V = all codes equally often."""
    p_SV = counts_SV / counts_SV.sum(1, keepdim=True).clamp(min=1)
    entropy_S = -(p_SV * p_SV.clamp(min=1e-30).log()).sum(1)
    return entropy_S.exp()


def usage_metrics(counts_SV: torch.Tensor, prefix: str = "tok") -> dict[str, float]:
    """``{prefix}/usage_s{k}`` (%) and ``{prefix}/perplexity_s{k}`` for every scale k."""
    out: dict[str, float] = {}
    for k, (u, p) in enumerate(zip(usage_percent(counts_SV).tolist(), perplexity(counts_SV).tolist())):
        out[f"{prefix}/usage_s{k}"] = u
        out[f"{prefix}/perplexity_s{k}"] = p
    return out


def low_usage(counts_SV: torch.Tensor, below: float) -> list[str]:
    """A line per scale whose distinct codes are fewer than ``below`` x what its tokens allow (min(V, tokens)).

    A 1x1 scale seen on 16 images can use at most 16 codes: judging it against the whole codebook
    would warn on every healthy run.
    """
    V = counts_SV.shape[1]
    lines = []
    for k, (used, tokens) in enumerate(zip(counts_SV.gt(0).sum(1).tolist(), counts_SV.sum(1).tolist())):
        possible = min(V, int(tokens))
        if possible and used < below * possible:
            lines.append(f"scale {k}: {used} of {V} codes in use ({used / V:.1%}) over {int(tokens)} tokens; "
                         f"fewer than {below:.0%} of the {possible} its tokens could use")
    return lines


def psnr_db(recon_B3HW: torch.Tensor, target_B3HW: torch.Tensor) -> torch.Tensor:
    """(B,) peak signal-to-noise ratio in dB of images in [-1, 1] (peak = the full range, as for 8-bit images)."""
    err = (recon_B3HW.float().clamp(-1, 1) - target_B3HW.float()) / 2  # on the [0, 1] scale
    mse_B = err.square().flatten(1).mean(1).clamp(min=1e-10)
    return -10 * mse_B.log10()
