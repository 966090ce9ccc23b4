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

from mvar.errors import UserError
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


# Logits of at most this many bytes exist at once while sampling: the head and the sampling run over
# blocks of token positions, so at the big scales the (2B, l, V) logits of a whole scale never do.
LOGITS_BLOCK_BYTES = 16 * 2 ** 20


def top_k_top_p_candidates(logits_NV: torch.Tensor, top_k: int = 0,
                           top_p: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The tokens that may be drawn: (logits, vocabulary ids), the dropped ones at -inf.

    Top-k first (the k best, in descending order), then the top-p nucleus on those k logits only,
    so no full-vocabulary sort exists. The rule is the usual one: in ascending order, the tokens
    whose cumulative probability is <= 1 - top_p are dropped; the most likely token always stays.
    ids is None when every token of the vocabulary is a candidate (top_k 0 and top_p 0).
    """
    V = logits_NV.shape[-1]
    k = top_k if 0 < top_k < V else V
    if k == V and top_p <= 0:
        return logits_NV, None
    vals_Nk, ids_Nk = logits_NV.topk(k, dim=-1)  # sorted, largest first
    if top_p > 0:
        ascending = vals_Nk.flip(-1)
        drop = ascending.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop[..., -1] = False  # the most likely token
        vals_Nk = vals_Nk.masked_fill(drop.flip(-1), float("-inf"))
    return vals_Nk, ids_Nk


def sample_tokens(logits_BlV: torch.Tensor, top_k: int, top_p: float,
                  generator: torch.Generator | None) -> torch.Tensor:
    """One token per position, drawn from the top-k / top-p filtered softmax; (B, l) vocabulary ids."""
    B, l, V = logits_BlV.shape
    vals_Nk, ids_Nk = top_k_top_p_candidates(logits_BlV.reshape(-1, V), top_k, top_p)
    pick_N1 = torch.multinomial(vals_Nk.softmax(-1), num_samples=1, generator=generator)
    idx_N1 = pick_N1 if ids_Nk is None else ids_Nk.gather(-1, pick_N1)
    return idx_N1.view(B, l)


def guided_logits(logits_2BlV: torch.Tensor, B: int, t: float) -> torch.Tensor:
    """CFG, (1 + t) cond - t uncond, computed in place over the (2B, l, V) block: no temporaries."""
    cond, uncond = logits_2BlV[:B], logits_2BlV[B:]
    return cond.mul_(1 + t).sub_(uncond.mul_(t))


def sample_scale(model: NextScaleTransformer, features_BlC: torch.Tensor, B: int, t: float | None,
                 top_k: int, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Tokens of one scale from the head's input features (2B rows with CFG), in blocks of positions."""
    rows, l, _ = features_BlC.shape
    per_block = max(1, LOGITS_BLOCK_BYTES // (rows * model.V * 4))
    picks = []
    for a in range(0, l, per_block):
        logits_BlV = model.head(features_BlC[:, a:a + per_block]).float()
        if t is not None:
            logits_BlV = guided_logits(logits_BlV, B, t)
        picks.append(sample_tokens(logits_BlV, top_k, top_p, generator))
        del logits_BlV
    return picks[0] if len(picks) == 1 else torch.cat(picks, dim=1)


def check_device(name: str, flag: str = "--device") -> torch.device:
    """The torch device ``name`` names; a UserError naming ``flag`` when it is no device or a GPU that
    this machine does not have (before any work, not torch's traceback from deep inside a model)."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"{flag}: '{name}' is not a device; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"{flag} {name}: torch sees no CUDA GPU on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


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
    if labels_B.numel() == 0:
        raise ValueError("no class labels given (labels_B is empty): nothing to sample")
    if labels_B.min() < 0 or labels_B.max() >= model.num_classes:
        raise ValueError(f"class ids must lie in [0, {model.num_classes - 1}], got {labels_B.tolist()}")
    B, K = labels_B.shape[0], len(model.patch_nums)
    guided = cfg != 0
    cond_labels = torch.cat((labels_B, torch.full_like(labels_B, model.num_classes))) if guided else labels_B
    cond_BC = model.class_emb(cond_labels)
    side = model.patch_nums[-1]
    f_hat = cond_BC.new_zeros(B, model.Cvae, side, side)
    inputs, indices, kv_bytes = None, [], 0
    model.set_kv_cache(model.spec.info.kv_cache)
    try:
        for si in range(K):
            features_BlC = model.step_features(cond_BC, inputs, si)
            t = cfg * si / (K - 1) if guided else None
            idx_Bl = sample_scale(model, features_BlC, B, t, top_k, top_p, generator)
            del features_BlC
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
