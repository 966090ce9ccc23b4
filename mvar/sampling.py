"""Class-conditional generation, coarse to fine, with classifier-free guidance.

VAR runs one forward per scale over that scale's tokens against a KV cache
of all coarser scales. Scale-Markov and MVAR run one forward per scale over
that scale's tokens only: no cache, the coarser scales reach it through the
input (f_hat resampled). CFG batches the conditional and null-class rows and
ramps the guidance linearly from 0 at the first scale to ``cfg`` at the last.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mvar.models.transformer import NextScaleTransformer
from mvar.tokenizer.quantizer import MultiScaleQuantizer
from mvar.tokenizer.vqvae import MultiScaleVQVAE


@dataclass
class SamplingConfig:
    cfg: float = 1.5       # guidance at the last scale; 0 turns CFG off
    top_k: int = 900       # 0: no top-k
    top_p: float = 0.96    # 0: no nucleus filtering
    seed: int = 0


@dataclass
class Generation:
    indices: list[torch.Tensor]   # per scale, (B, pn*pn)
    f_hat: torch.Tensor           # (B, Cv, h, w): decode with tokenizer.fhat_to_img
    labels: torch.Tensor          # (B,)
    kv_cache_bytes: int           # size of the KV cache at its largest (0 without one)


def filter_top_k_top_p(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Logits with everything outside the top-k and the top-p nucleus set to -inf."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1).values[..., -1:]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False  # always keep the most likely token
        drop = drop_sorted.scatter(-1, sorted_idx, drop_sorted)
        logits_BlV = logits_BlV.masked_fill(drop, float("-inf"))
    return logits_BlV


def sample_tokens(logits_BlV: torch.Tensor, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    B, l, V = logits_BlV.shape
    probs = filter_top_k_top_p(logits_BlV, top_k, top_p).softmax(-1).view(-1, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).view(B, l)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    if seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


@torch.no_grad()
def generate(model: NextScaleTransformer, quant: MultiScaleQuantizer, labels_B: torch.Tensor | None = None,
             batch_size: int | None = None, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
             generator: torch.Generator | None = None) -> Generation:
    """Sample token maps of every scale; ``labels_B=None`` draws classes uniformly (needs batch_size).

    Only the tokenizer's quantizer takes part (code vectors, phi); decoding to pixels is separate.
    """
    device = model.pos_1LC.device
    if labels_B is None:
        labels_B = torch.randint(model.num_classes, (batch_size,), generator=generator, device=device)
    labels_B = labels_B.to(device)
    if labels_B.numel() and (labels_B.min() < 0 or labels_B.max() >= model.num_classes):
        raise ValueError(f"class ids must lie in [0, {model.num_classes - 1}], got {labels_B.tolist()}")
    B, K = labels_B.shape[0], len(model.patch_nums)
    guided = cfg != 0
    cond_labels = torch.cat((labels_B, torch.full_like(labels_B, model.num_classes))) if guided else labels_B
    cond_BC = model.class_emb(cond_labels)
    side = model.patch_nums[-1]
    f_hat = cond_BC.new_zeros(B, model.Cvae, side, side)
    inputs, indices, kv_bytes = None, [], 0
    model.set_kv_cache(model.spec.pattern == "var")
    try:
        for si in range(K):
            logits_BlV = model.step_logits(cond_BC, inputs, si)
            if guided:
                t = cfg * si / (K - 1)
                logits_BlV = (1 + t) * logits_BlV[:B] - t * logits_BlV[B:]
            idx_Bl = sample_tokens(logits_BlV, top_k, top_p, generator)
            indices.append(idx_Bl)
            f_hat = quant.add_scale(si, f_hat, quant.codes_to_map(si, idx_Bl))
            if si < K - 1:
                inputs = quant.next_input(si, f_hat)
                inputs = inputs.repeat(2, 1, 1) if guided else inputs
        kv_bytes = model.kv_cache_bytes()
    finally:
        model.set_kv_cache(False)
    return Generation(indices=indices, f_hat=f_hat, labels=labels_B, kv_cache_bytes=kv_bytes)


@torch.no_grad()
def sample_images(model: NextScaleTransformer, tokenizer: MultiScaleVQVAE, labels_B: torch.Tensor | None = None,
                  batch_size: int | None = None, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Images in [0, 1], (B, 3, H, W)."""
    gen = generate(model, tokenizer.quantize, labels_B, batch_size, cfg, top_k, top_p, generator)
    return tokenizer.fhat_to_img(gen.f_hat).add(1).mul(0.5)
