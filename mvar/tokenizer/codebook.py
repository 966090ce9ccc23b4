"""Keeping the shared codebook of the multi-scale quantizer in use while the tokenizer trains.

    init_codebook(vae.quantize, f_BChw, cfg.codebook)   # before the first step, on every rank
    usage = CodeUsage(len(vae.patch_nums), vocab_size, device)
    usage.add(indices)                                  # every step, this rank's code indices
    if cfg.codebook.restart_due(done):                  # every rank, at the same steps
        restarted = restart_dead_codes(vae.quantize, f_BChw, usage.window(), cfg.codebook, step=done)
        reset_rows(optimizer, vae.quantize.embedding.weight, restarted)

A fresh encoder's features are small next to N(0, 1) code vectors, so every residual is
nearest to the same few codes and the codebook collapses before training can spread it.
Initialisation picks the codes from the residuals themselves, scale by scale (one codebook
serves every scale, as in VAR): the codes of scale s are chosen from what is left after
scales < s were quantised with the codes picked so far, so coarse scales get codes of their
large residuals and fine scales of their small ones. Each scale gets a share of the codebook
proportional to its tokens (at least one code). A restart re-seeds the codes that no scale used
from the residuals of the current batch, shared among the scales the same way.

Rank 0 decides and `torch.distributed.broadcast` copies its codebook to the other ranks, so the
ranks never disagree; the counts that decide a restart are all-reduced first.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from mvar.tokenizer.quantizer import MultiScaleQuantizer
from mvar.tokenizer.training import CodebookConfig


def _sq_dist(x_NC: torch.Tensor, c_MC: torch.Tensor) -> torch.Tensor:
    """(N, M) squared L2 distances."""
    d = x_NC.square().sum(1, keepdim=True) + c_MC.square().sum(1) - 2 * x_NC @ c_MC.T
    return d.clamp_(min=0)


def _nearest(x_NC: torch.Tensor, c_MC: torch.Tensor, cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centre, squared distance to it) for each row; on unit vectors with ``cosine``."""
    if cosine:
        x_NC, c_MC = F.normalize(x_NC, dim=1), F.normalize(c_MC, dim=1)
    d_NM = _sq_dist(x_NC, c_MC)
    d_N, idx_N = d_NM.min(1)
    return idx_N, d_N


def kmeans_pp(x_NC: torch.Tensor, k: int, generator: torch.Generator, centres_MC: torch.Tensor | None = None,
              cosine: bool = False, uniform: bool = False) -> torch.Tensor:
    """``k`` rows of ``x_NC`` by k-means++ seeding: each pick drawn with probability proportional to the
    squared distance to its nearest centre so far (``centres_MC`` count as picked). ``uniform``: plain
    random picks. Returns (k, C) copies of the picked rows (raw vectors, also with ``cosine``)."""
    N = x_NC.shape[0]
    if uniform:
        return x_NC[torch.randint(N, (k,), generator=generator, device=x_NC.device)].clone()
    xs = F.normalize(x_NC, dim=1) if cosine else x_NC
    if centres_MC is not None and centres_MC.shape[0]:
        _, d2_N = _nearest(x_NC, centres_MC, cosine)
    else:
        d2_N = torch.full((N,), float("inf"), device=x_NC.device)
    picks = []
    for _ in range(k):
        finite = torch.isfinite(d2_N)
        if not finite.any() or d2_N[finite].sum() <= 0:  # nothing picked yet, or every row is a centre already
            i = torch.randint(N, (1,), generator=generator, device=x_NC.device)
        else:
            i = torch.multinomial(torch.where(finite, d2_N, 0.0), 1, generator=generator)
        picks.append(i)
        d2_N = torch.minimum(d2_N, _sq_dist(xs, xs[i]).squeeze(1))
    return x_NC[torch.cat(picks)].clone()


def lloyd(x_NC: torch.Tensor, centres_KC: torch.Tensor, iters: int, cosine: bool = False) -> torch.Tensor:
    """``iters`` k-means steps: each centre moves to the mean of its rows; a centre with none stays."""
    c = centres_KC.clone()
    for _ in range(iters):
        idx_N, _ = _nearest(x_NC, c, cosine)
        sums = torch.zeros_like(c).index_add_(0, idx_N, x_NC)
        counts = torch.bincount(idx_N, minlength=c.shape[0]).unsqueeze(1).to(c.dtype)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c


def codes_per_scale(patch_nums: tuple[int, ...], vocab_size: int, available: list[int]) -> list[int]:
    """How many codes each scale's residuals seed: proportional to its tokens, at most the vectors it has
    (``available``), what a scale cannot take going to the scales after it; sums to ``vocab_size``."""
    tokens = [pn * pn for pn in patch_nums]
    out, left = [], vocab_size
    for s, (t, a) in enumerate(zip(tokens, available)):
        later = sum(tokens[s:])
        n = left if s == len(tokens) - 1 else min(left, a, max(1, round(left * t / later)))
        out.append(n)
        left -= n
    return out


def _scale_map(q: MultiScaleQuantizer, si: int, codes_MC: torch.Tensor, idx_N: torch.Tensor, like: torch.Tensor):
    """phi_s(upsample(codes[idx])) at the latent size: what scale si adds to f_hat."""
    B, C, H, W = like.shape
    pn = q.patch_nums[si]
    h_BChw = codes_MC[idx_N].view(B, pn, pn, C).permute(0, 3, 1, 2)
    return q.add_scale(si, torch.zeros_like(like), h_BChw.contiguous())


@torch.no_grad()
def pick_codes(q: MultiScaleQuantizer, f_BChw: torch.Tensor, cfg: CodebookConfig) -> torch.Tensor:
    """(V, Cvae) codes picked scale by scale from the residuals of ``f_BChw`` (see the module docstring)."""
    gen = torch.Generator(device=f_BChw.device).manual_seed(cfg.seed)
    f_rest = f_BChw.detach().float().clone()
    B = f_rest.shape[0]
    counts = codes_per_scale(q.patch_nums, q.vocab_size, [B * pn * pn for pn in q.patch_nums])
    codes = f_rest.new_zeros(0, q.Cvae)
    for si, n in enumerate(counts):
        z_NC = q.residual_at(si, f_rest)
        new = kmeans_pp(z_NC, n, gen, codes, cosine=q.znorm, uniform=cfg.init == "random")
        if cfg.init_iters:
            new = lloyd(z_NC, new, cfg.init_iters, cosine=q.znorm)
        codes = torch.cat([codes, new])
        idx_N, _ = _nearest(z_NC, codes, q.znorm)
        f_rest = f_rest - _scale_map(q, si, codes, idx_N, f_rest)
    return codes


def broadcast_codebook(q: MultiScaleQuantizer) -> None:
    """Rank 0's codebook on every rank (no-op without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.broadcast(q.embedding.weight.data, src=0)


@torch.no_grad()
def init_codebook(q: MultiScaleQuantizer, f_BChw: torch.Tensor, cfg: CodebookConfig) -> bool:
    """Set the codebook from encoder features (of this rank's first ``cfg.init_batches`` batches) and copy
    rank 0's to every rank; every rank calls it. False (nothing changed) with ``cfg.init`` none."""
    if cfg.init == "none":
        return False
    q.embedding.weight.data.copy_(pick_codes(q, f_BChw, cfg))
    q.ema_vocab_hit_SV.zero_()
    broadcast_codebook(q)
    return True


class CodeUsage:
    """Hits of each code at each scale since the last restart check, on this rank."""

    def __init__(self, num_scales: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.hits_SV = torch.zeros(num_scales, vocab_size, device=device)

    def add(self, indices: list[torch.Tensor]) -> None:
        for si, idx in enumerate(indices):
            self.hits_SV[si] += torch.bincount(idx.flatten(), minlength=self.hits_SV.shape[1]).to(self.hits_SV)

    def window(self, reset: bool = True) -> torch.Tensor:
        """(S, V) hits summed over every rank (one all-reduce: every rank calls it), then cleared."""
        hits = self.hits_SV.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(hits)
        if reset:
            self.hits_SV.zero_()
        return hits


def dead_codes(hits_SV: torch.Tensor, below: float) -> torch.Tensor:
    """(V,) bool: codes that no scale used at least ``below`` x its uniform share (tokens of the scale / V)."""
    share_S1 = hits_SV.sum(1, keepdim=True) / hits_SV.shape[1]
    alive_V = (hits_SV >= below * share_S1).logical_and(hits_SV > 0).any(0)
    return ~alive_V


@torch.no_grad()
def reseed(q: MultiScaleQuantizer, f_BChw: torch.Tensor, rows: torch.Tensor, cfg: CodebookConfig,
           gen: torch.Generator) -> torch.Tensor:
    """(len(rows), Cvae) new vectors for the codebook ``rows``, from the residuals that the current codebook
    leaves at each scale of ``f_BChw``: shared among the scales as the initialisation shares the codebook,
    each scale's by k-means++ against the codes in use, so every scale, the 1x1 one too, gets codes of its own."""
    codes_VC = q.embedding.weight.data
    keep_V = torch.ones(q.vocab_size, dtype=torch.bool, device=codes_VC.device)
    keep_V[rows] = False
    f_rest = f_BChw.detach().float().clone()
    counts = codes_per_scale(q.patch_nums, rows.numel(), [f_rest.shape[0] * pn * pn for pn in q.patch_nums])
    new = []
    for si, n in enumerate(counts):
        z_NC = q.residual_at(si, f_rest)
        if n:
            new.append(kmeans_pp(z_NC, n, gen, torch.cat([codes_VC[keep_V], *new]), cosine=q.znorm,
                                 uniform=cfg.init == "random"))
        idx_N, _ = _nearest(z_NC, codes_VC, q.znorm)
        f_rest = f_rest - _scale_map(q, si, codes_VC, idx_N, f_rest)
    return torch.cat(new)


@torch.no_grad()
def restart_dead_codes(q: MultiScaleQuantizer, f_BChw: torch.Tensor, hits_SV: torch.Tensor, cfg: CodebookConfig,
                       step: int = 0) -> torch.Tensor:
    """Re-seed the dead codes (``dead_codes(hits_SV, cfg.restart_below)``) from the residuals of ``f_BChw``
    (see `reseed`) on rank 0, then broadcast its codebook. Every rank calls it with the same (all-reduced)
    ``hits_SV``. Returns the indices of the restarted codes (the same on every rank)."""
    dead_V = dead_codes(hits_SV.to(q.embedding.weight.device), cfg.restart_below)
    rows = dead_V.nonzero().flatten()
    if rows.numel() == 0:
        return rows
    if not dist.is_initialized() or dist.get_rank() == 0:
        gen = torch.Generator(device=f_BChw.device).manual_seed(cfg.seed + 7919 * step)
        q.embedding.weight.data[rows] = reseed(q, f_BChw, rows, cfg, gen).to(q.embedding.weight)
    broadcast_codebook(q)
    return rows


def reset_rows(optimizer: torch.optim.Optimizer, param: torch.Tensor, rows: torch.Tensor) -> None:
    """Zero the optimizer's per-element state (Adam's moments) of ``param[rows]``: a re-seeded code should
    not keep the momentum of the vector it replaced. Identical on every rank, like the rows."""
    state = optimizer.state.get(param, {})
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[rows] = 0
