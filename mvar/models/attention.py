"""Attention over multi-scale token maps: the three patterns and their backends.

Patterns (a config choice, same parameters for all three; what each means: ``mvar.models.patterns``):
- ``var``: block-causal; a token of scale s sees every token of scales <= s.
- ``scale_markov``: a token sees only the tokens of its own scale (bidirectional).
- ``mvar``: scale_markov, and on scales >= ``markov_from_scale`` only a
  ``window_size`` x ``window_size`` neighbourhood of the same map, windows
  clamped inside the map (NATTEN's na2d semantics, dilation 1).

Under scale_markov / mvar a sequence never needs an L x L score matrix: each
scale (or a pack of small dense scales) is attended separately. Windowed
scales go through one of the backends of ``window_attention``: ``reference``
(one masked SDPA call over the map), ``banded`` (CPU: bands of map rows, each
against the contiguous slice of key rows its windows reach), ``flex``
(FlexAttention under ``torch.compile``, a block mask of whole map rows: CUDA, and CPU for inference),
``natten``. None of them gathers keys and
values into (N, k*k) tensors, which would cost more memory than MVAR saves.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mvar.models.config import BACKENDS, Backend
from mvar.models.patterns import Pattern, PatternInfo, pattern_info

# The banded CPU window: queries in bands of this many map rows, each against the key rows its
# windows reach (a contiguous slice of the sequence).
BANDED_ROWS = 8

# Compiled FlexAttention's blocks, in map rows (flex_block_size): the CPU kernel runs one GEMM per
# (query block, listed key block), so blocks of whole rows skip every key row outside the block's windows.
# A query block of r rows reaches r + k - 1 key rows: 1 row measured fastest at 24x24 and 32x32, k 7
# (1, 2, 4, 8 tried quiet, docs/benchmarks.md): larger blocks compute more pairs than they save in calls.
FLEX_Q_ROWS = 1
FLEX_KV_ROWS = 1
FLEX_RECOMPILE_LIMIT = 4  # per compiled shape: grad and autocast modes; beyond that an error, never eager

# `auto` on CPU, per pass (with / without autograd): (smallest map side, backend), first match wins: the
# backend that measured fastest there at the default k 7 (docs/benchmarks.md, quiet `python -m
# tools.bench_window`: banded 0.53-0.64x the reference at 24x24 and 32x32 in both passes; below, the two
# within 10 %). Compiled Flex lost at k 7 everywhere and has no backward on CPU, so it is never auto here.
CPU_AUTO: dict[bool, tuple[tuple[int, str], ...]] = {
    False: ((24, "banded"), (0, "reference")),
    True: ((24, "banded"), (0, "reference")),
}


@dataclass(frozen=True)
class AttentionSpec:
    """What a model's attention looks like; fixed per model. No defaults: ``ModelConfig`` holds them
    (``from_model`` builds the spec of a model config)."""

    pattern: Pattern
    patch_nums: tuple[int, ...]
    window_size: int
    markov_from_scale: int
    backend: Backend

    @classmethod
    def from_model(cls, cfg, patch_nums: tuple[int, ...]) -> AttentionSpec:
        """The spec of a ``ModelConfig`` on a tokenizer's ``patch_nums``."""
        return cls(cfg.attention, tuple(patch_nums), cfg.window_size, cfg.markov_from_scale, cfg.attention_backend)

    @property
    def info(self) -> PatternInfo:
        return pattern_info(self.pattern)

    @property
    def block_causal(self) -> bool:
        """One mask over the whole sequence (every earlier scale), else each scale (group) attends alone."""
        return self.info.mask == "block_causal"

    def windowed(self, si: int) -> bool:
        return self.info.windowed and si >= self.markov_from_scale


# ---------------------------------------------------------------------------
# masks (boolean, True = may attend); cached because they depend on shapes only

def window_starts(n: int, window_size: int) -> torch.Tensor:
    """Per-axis first index of each position's window: clamp(i - k//2, 0, n - k)."""
    i = torch.arange(n)
    return (i - window_size // 2).clamp(max=max(n - window_size, 0)).clamp(min=0)


@functools.lru_cache(maxsize=64)
def _window_mask_cpu(n: int, window_size: int) -> torch.Tensor:
    start = window_starts(n, window_size)
    pos = torch.arange(n)
    axis = (pos[None, :] >= start[:, None]) & (pos[None, :] < start[:, None] + window_size)  # (n, n)
    # query (qi, qj) sees key (ki, kj) iff both axes fall in the window
    return (axis[:, None, :, None] & axis[None, :, None, :]).reshape(n * n, n * n)


def window_mask(n: int, window_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n*n, n*n) boolean mask of clamped k x k windows on an n x n map, row-major."""
    return _on_device(_window_mask_cpu, str(device), n, window_size)


@functools.lru_cache(maxsize=128)
def _on_device(make, device: str, *args) -> torch.Tensor:
    """A cached mask moved to ``device`` once, not at every layer of every step."""
    return make(*args).to(device)


@functools.lru_cache(maxsize=64)
def _scale_ids(patch_nums: tuple[int, ...], scales: tuple[int, ...]) -> torch.Tensor:
    return torch.cat([torch.full((patch_nums[s] ** 2,), s) for s in scales])


def sequence_mask(spec: AttentionSpec, scales: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Full (L, L) boolean mask of a sequence of the given scales (True = may attend)."""
    return _on_device(_sequence_mask_cpu, str(device), spec, tuple(scales))


def _sequence_mask_cpu(spec: AttentionSpec, scales: tuple[int, ...]) -> torch.Tensor:
    ids = _scale_ids(spec.patch_nums, scales)
    if spec.block_causal:
        return ids[:, None] >= ids[None, :]
    mask = ids[:, None] == ids[None, :]
    offset = 0
    for s in scales:
        n = spec.patch_nums[s] ** 2
        if spec.windowed(s):
            mask[offset:offset + n, offset:offset + n] = _window_mask_cpu(spec.patch_nums[s], spec.window_size)
        offset += n
    return mask


# ---------------------------------------------------------------------------
# groups: how a scale-Markov sequence is cut into independent attention calls

@functools.lru_cache(maxsize=256)
def scale_groups(spec: AttentionSpec, scales: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    """Consecutive dense scales are packed into one call; each windowed scale is its own."""
    groups: list[list[int]] = []
    for s in scales:
        if spec.windowed(s) or not groups or spec.windowed(groups[-1][-1]):
            groups.append([s])
        else:
            groups[-1].append(s)
    return tuple(tuple(g) for g in groups)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: AttentionSpec,
           scales: tuple[int, ...], scale: float, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of a sequence made of ``scales`` (q, k, v: (B, H, L, d)) -> (B, H, L, d)."""
    if spec.block_causal:
        if len(scales) == 1 and scales[0] == 0 or q.shape[2] != k.shape[2]:
            mask = None  # first scale alone, or a query scale against a KV cache of everything before it
        else:
            mask = sequence_mask(spec, scales, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    outs, offset = [], 0
    for group in scale_groups(spec, scales):
        n = sum(spec.patch_nums[s] ** 2 for s in group)
        qg, kg, vg = (t[:, :, offset:offset + n] for t in (q, k, v))
        if spec.windowed(group[0]):
            outs.append(window_attention(qg, kg, vg, spec.patch_nums[group[0]], spec.window_size,
                                         scale, spec.backend, dropout_p))
        else:
            mask = None if len(group) == 1 else sequence_mask(spec, group, q.device)
            outs.append(F.scaled_dot_product_attention(qg, kg, vg, attn_mask=mask, dropout_p=dropout_p, scale=scale))
        offset += n
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


# ---------------------------------------------------------------------------
# window attention backends

def natten_available() -> bool:
    try:
        import natten  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, side: int | None = None, needs_grad: bool = False) -> str:
    """``auto``: NATTEN on CUDA when installed, else compiled FlexAttention on CUDA; on CPU the row of
    ``CPU_AUTO`` for the pass and map side. Without ``side``: the rule, in words."""
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return "natten" if natten_available() else "flex"
    if side is None:
        return "; ".join(f"{'fwd+bwd' if grad else 'fwd'}: " + ", ".join(f"{name} from {lo}" for lo, name in rule)
                         for grad, rule in CPU_AUTO.items())
    return next(name for lo, name in CPU_AUTO[needs_grad] if side >= lo)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, side: int, window_size: int,
                     scale: float, backend: str = "auto", dropout_p: float = 0.0) -> torch.Tensor:
    """k x k clamped-window attention on one side x side map; q, k, v: (B, H, side*side, d)."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    backend = resolve_backend(backend, q.device, side, needs_grad)
    if window_size > side:
        raise ValueError(f"window {window_size}x{window_size} is larger than the {side}x{side} map")
    if window_size == side:  # every window is the whole map: the same result, without a mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    if backend == "reference" or dropout_p > 0:
        mask = window_mask(side, window_size, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    if backend == "banded":
        return _banded_window(q, k, v, side, window_size, scale)
    if backend == "flex":
        return _flex_window(q, k, v, side, window_size, scale)
    if backend == "natten":
        return _natten_window(q, k, v, side, window_size, scale)
    raise ValueError(f"unknown attention backend '{backend}'; known: {', '.join(BACKENDS)}")


@functools.lru_cache(maxsize=64)
def window_bands(side: int, window_size: int, rows: int = BANDED_ROWS,
                 device: str = "cpu") -> tuple[tuple[int, int, int, int, torch.Tensor], ...]:
    """(first query, end query, first key, end key, additive mask) per band of ``rows`` map rows.

    A band's keys are the map rows from its first row's window start to its last row's window end:
    one contiguous slice of the sequence. The mask (0 or -inf, float: SDPA converts a boolean one at
    every call) keeps each query's own k x k window inside that slice.
    """
    starts, full = window_starts(side, window_size).tolist(), _window_mask_cpu(side, window_size)
    bands = []
    for r0 in range(0, side, rows):
        r1 = min(r0 + rows, side)
        q0, q1, k0, k1 = r0 * side, r1 * side, starts[r0] * side, (starts[r1 - 1] + window_size) * side
        allowed = full[q0:q1, k0:k1]
        mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf")).to(device)
        bands.append((q0, q1, k0, k1, mask))
    return tuple(bands)


def _banded_window(q, k, v, side, window_size, scale):
    """Exact windowed attention costing N x (rows + k - 1) x side pairs instead of N^2, no keys gathered."""
    outs = [F.scaled_dot_product_attention(q[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1], attn_mask=mask, scale=scale)
            for q0, q1, k0, k1, mask in window_bands(side, window_size, BANDED_ROWS, str(q.device))]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


def flex_block_size(side: int, device: str = "cpu") -> tuple[int, int]:
    """(query, key) block sizes of the Flex window. CPU: whole map rows, so a key block lies outside every
    window of a query block exactly when its rows do, and the kernel skips it (it walks only the listed
    blocks, any block size). CUDA: Flex's default 128 (its Triton tiles need multiples of their own sizes)."""
    if torch.device(device).type != "cpu":
        return 128, 128
    return FLEX_Q_ROWS * side, FLEX_KV_ROWS * side


def _window_mask_mod(side: int, window_size: int):
    """FlexAttention's mask_mod of the clamped window, index arithmetic only (no captured tensor, so the
    compiled kernel takes no extra buffer)."""
    half, last = window_size // 2, side - window_size

    def in_window(b, h, q_idx, kv_idx):
        si, sj = (q_idx // side - half).clamp(0, last), (q_idx % side - half).clamp(0, last)
        ki, kj = kv_idx // side, kv_idx % side
        return (ki >= si) & (ki < si + window_size) & (kj >= sj) & (kj < sj + window_size)

    return in_window


@functools.lru_cache(maxsize=64)
def _flex_block_mask(side: int, window_size: int, device: str):
    from torch.nn.attention.flex_attention import create_block_mask

    n = side * side
    return create_block_mask(_window_mask_mod(side, window_size), B=None, H=None, Q_LEN=n, KV_LEN=n,
                             device=device, BLOCK_SIZE=flex_block_size(side, device))


@functools.lru_cache(maxsize=128)
def _compiled_flex(shapes: tuple, dtype: torch.dtype, device: str, side: int, window_size: int, scale: float,
                   grad: bool):
    """One compiled FlexAttention per window, shape, dtype, device and grad mode (the arguments are the cache
    key): compiled with dynamic=False, each shape is its own kernel anyway. Its own recompile region, so the
    windowed scales, CFG batch sizes and benchmark shapes never add up to torch._dynamo's recompile_limit
    (past which it would silently run eager: a full score matrix); fullgraph, so a break is an error."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False, fullgraph=True, isolate_recompiles=True,
                         recompile_limit=FLEX_RECOMPILE_LIMIT)


def flex_has_backward(device: torch.device) -> bool:
    """FlexAttention's backward exists on CUDA, not on CPU (torch 2.14: compiled CPU Flex is inference only)."""
    return device.type != "cpu"


def _flex_window(q, k, v, side, window_size, scale):
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if needs_grad and not flex_has_backward(q.device):
        raise ValueError(f"attention backend 'flex' has no backward on {q.device.type} (torch {torch.__version__}): "
                         "set model.attention_backend to auto, reference or banded to train there")
    device = str(q.device)
    block_mask = _flex_block_mask(side, window_size, device)
    shapes = tuple((tuple(t.shape), t.stride()) for t in (q, k, v))
    fn = _compiled_flex(shapes, q.dtype, device, side, window_size, float(scale), torch.is_grad_enabled())
    return fn(q, k, v, block_mask=block_mask, scale=scale)


def _natten_window(q, k, v, side, window_size, scale):
    import natten

    B, H, N, d = q.shape
    # na2d takes (B, h, w, heads, d) and scales by d**-0.5: fold our scale into q
    to_map = lambda t: t.transpose(1, 2).reshape(B, side, side, H, d)  # noqa: E731
    out = natten.functional.na2d(to_map(q * (scale * math.sqrt(d))), to_map(k), to_map(v),
                                 kernel_size=(window_size, window_size))
    return out.reshape(B, N, H, d).transpose(1, 2)


def brute_force_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                          scale: float) -> torch.Tensor:
    """Explicit masked softmax in float64: the yardstick every backend is tested against."""
    scores = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v.double()).to(q.dtype)


def attended_pairs(spec: AttentionSpec, scales: tuple[int, ...], cached_prefix: int = 0) -> int:
    """Number of (query, key) pairs a sequence of ``scales`` attends: the basis of the FLOP count (how each
    pattern counts: its ``PatternInfo.pairs``); ``cached_prefix``: keys in a KV cache before the sequence."""
    if spec.block_causal:
        ids = _scale_ids(spec.patch_nums, scales)
        return int((ids[:, None] >= ids[None, :]).sum()) + cached_prefix * len(ids)
    total = 0
    for s in scales:
        n = spec.patch_nums[s]
        if spec.windowed(s):
            total += int(_window_mask_cpu(n, spec.window_size).sum())
        else:
            total += n ** 4
    return total
