"""The next-scale transformer shared by VAR and MVAR.

One set of parameters; the attention pattern (block-causal, scale-Markov,
spatial-Markov) is a choice of ``AttentionSpec``. Parameter names follow
VAR's released state dict, so `var_d16.pth` loads into every pattern.
Shapes: B batch, L tokens of the sequence, C width, H heads, d head dim,
V vocabulary, Cv tokenizer latent width.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvar.models.attention import AttentionSpec, attend
from mvar.models.config import ModelConfig

# Buffers of VAR's released checkpoints that this implementation derives instead.
OFFICIAL_DERIVED_BUFFERS = ("lvl_1L", "attn_bias_for_masking")


def check_state_dict(module: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first key that is missing, unexpected or of another shape."""
    own = module.state_dict()
    for key, tensor in own.items():
        if key not in state_dict:
            raise ValueError(f"key '{key}' {tuple(tensor.shape)} of the model is missing from the weights")
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ValueError(f"key '{key}' has shape {tuple(state_dict[key].shape)} in the weights, "
                             f"{tuple(tensor.shape)} in the model")
    extra = [k for k in state_dict if k not in own]
    if extra:
        raise ValueError(f"key '{extra[0]}' of the weights has no place in the model ({len(extra)} such keys)")


class DropPath(nn.Module):
    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int, attn_l2_norm: bool, attn_drop: float, proj_drop: float):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            # cosine attention with a learned per-head temperature exp(s), s <= ln 100
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(width, 3 * width, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(width))
        self.v_bias = nn.Parameter(torch.zeros(width))
        self.register_buffer("zero_k_bias", torch.zeros(width))
        self.proj = nn.Linear(width, width)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop
        self.kv_cache: list[torch.Tensor] | None = None  # [k, v] while sampling with a cache

    def forward(self, x_BLC: torch.Tensor, spec: AttentionSpec, scales: tuple[int, ...]) -> torch.Tensor:
        B, L, C = x_BLC.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        qkv = F.linear(x_BLC, self.mat_qkv.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, L, d)
        if self.attn_l2_norm:
            # the float32 temperature would promote q under autocast: attention wants one dtype
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp()).to(v.dtype)
            k = F.normalize(k, dim=-1)
        if self.kv_cache is not None:
            if self.kv_cache:
                k = torch.cat((self.kv_cache[0], k), dim=2)
                v = torch.cat((self.kv_cache[1], v), dim=2)
            self.kv_cache[:] = [k, v]
        dropout_p = self.attn_drop if self.training else 0.0
        out = attend(q, k, v, spec, scales, self.scale, dropout_p)  # (B, H, L, d)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, L, C)))


# Without autograd the FFN runs over blocks of tokens whose hidden layer (and its GELU) stays under
# this size: at the big scales the (B, l, 4C) hidden layer, twice, was the largest transient of sampling.
FFN_BLOCK_BYTES = 16 * 2 ** 20


class FFN(nn.Module):
    def __init__(self, width: int, hidden: int, drop: float):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.drop = nn.Dropout(drop) if drop > 0 else nn.Identity()

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x), approximate="tanh")))

    def forward(self, x_BLC: torch.Tensor) -> torch.Tensor:
        B, L, _ = x_BLC.shape
        per_block = max(1, FFN_BLOCK_BYTES // (B * self.fc1.out_features * 4))
        if torch.is_grad_enabled() or per_block >= L:
            return self.mlp(x_BLC)
        first = self.mlp(x_BLC[:, :per_block])
        out_BLC = first.new_empty(B, L, first.shape[-1])
        out_BLC[:, :per_block] = first
        for a in range(per_block, L, per_block):
            out_BLC[:, a:a + per_block] = self.mlp(x_BLC[:, a:a + per_block])
        return out_BLC


class AdaLNBlock(nn.Module):
    """Pre-norm transformer block whose LayerNorm scale, shift and residual gates come from the class."""

    def __init__(self, cfg: ModelConfig, drop_path: float):
        super().__init__()
        C = cfg.width
        self.C = C
        self.attn = SelfAttention(C, cfg.heads, cfg.attn_l2_norm, cfg.attn_drop_rate, cfg.drop_rate)
        self.ffn = FFN(C, round(C * cfg.mlp_ratio), cfg.drop_rate)
        self.ln_wo_grad = nn.LayerNorm(C, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor, spec: AttentionSpec,
                scales: tuple[int, ...]) -> torch.Tensor:
        gamma1, gamma2, scale1, scale2, shift1, shift2 = self.ada_lin(cond_BC).view(-1, 1, 6, self.C).unbind(2)
        # in place where autograd keeps no copy (mul and linear save their inputs, not their outputs):
        # two fewer (B, L, C) temporaries per half-block
        h = self.ln_wo_grad(x_BLC).mul(scale1.add(1)).add_(shift1)
        x_BLC = x_BLC + self.drop_path(self.attn(h, spec, scales).mul_(gamma1))
        h = self.ln_wo_grad(x_BLC).mul(scale2.add(1)).add_(shift2)
        return x_BLC + self.drop_path(self.ffn(h).mul_(gamma2))


class AdaLNHead(nn.Module):
    def __init__(self, C: int, eps: float):
        super().__init__()
        self.C = C
        self.ln_wo_grad = nn.LayerNorm(C, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))

    def forward(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond_BC).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x_BLC).mul(scale.add(1)).add_(shift)


class NextScaleTransformer(nn.Module):
    """Class-conditional next-scale prediction over the tokenizer's scales."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, z_channels: int, patch_nums: tuple[int, ...]):
        super().__init__()
        cfg.check_scales(tuple(patch_nums))
        self.cfg = cfg
        self.C, self.V, self.Cvae = cfg.width, vocab_size, z_channels
        self.num_classes = cfg.num_classes
        self.patch_nums = tuple(patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        lengths = [pn * pn for pn in self.patch_nums]
        self.begin = [sum(lengths[:s]) for s in range(len(lengths))]  # first token of each scale
        self.L = sum(lengths)
        self.spec = AttentionSpec.from_model(cfg, self.patch_nums)
        C = self.C
        self.word_embed = nn.Linear(z_channels, C)
        self.class_emb = nn.Embedding(cfg.num_classes + 1, C)  # last row: the null class of CFG
        self.pos_start = nn.Parameter(torch.zeros(1, self.first_l, C))
        self.pos_1LC = nn.Parameter(torch.zeros(1, self.L, C))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), C)
        rates = torch.linspace(0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(AdaLNBlock(cfg, rates[i]) for i in range(cfg.depth))
        self.head_nm = AdaLNHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, vocab_size)
        self.init_weights(cfg.init_std, cfg.init_head, cfg.init_adaln, cfg.init_adaln_gamma)

    # -- construction -------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, init_std: float = -1.0, init_head: float = 0.02,
                     init_adaln: float = 0.5, init_adaln_gamma: float = 1e-3) -> None:
        """VAR's initialisation: truncated normals of ``init_std`` (< 0: sqrt(1 / 3C)) for every linear and
        embedding weight and the position tables, zero biases, the head scaled by ``init_head``, AdaLN
        scale/shift weights by ``init_adaln`` and the residual gates by ``init_adaln_gamma`` (so that
        every block starts near the identity), and the residual projections divided by sqrt(2 depth)."""
        std = init_std if init_std > 0 else math.sqrt(1 / self.C / 3)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    m.bias.zero_()
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=math.sqrt(1 / self.C / 3))  # VAR: not affected by init_std
        self.head.weight.mul_(init_head)
        self.head.bias.zero_()
        self.head_nm.ada_lin[-1].weight.mul_(init_adaln)
        self.head_nm.ada_lin[-1].bias.zero_()
        for block in self.blocks:
            block.attn.proj.weight.div_(math.sqrt(2 * len(self.blocks)))
            block.ffn.fc2.weight.div_(math.sqrt(2 * len(self.blocks)))
            ada = block.ada_lin[-1]
            ada.weight[2 * self.C:].mul_(init_adaln)       # scales and shifts
            ada.weight[:2 * self.C].mul_(init_adaln_gamma)  # residual gates
            ada.bias.zero_()

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """A VAR checkpoint (`var_d16.pth` format): derived buffers are dropped, everything else must match."""
        sd = {k: v for k, v in state_dict.items() if k not in OFFICIAL_DERIVED_BUFFERS}
        check_state_dict(self, sd)
        self.load_state_dict(sd)

    # -- inputs -------------------------------------------------------------
    def scale_ids(self, scales: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.cat([torch.full((self.patch_nums[s] ** 2,), s, device=device) for s in scales])

    def token_positions(self, scales: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.cat([torch.arange(self.begin[s], self.begin[s] + self.patch_nums[s] ** 2, device=device)
                          for s in scales])

    def embed(self, cond_BC: torch.Tensor, inputs_BlCv: torch.Tensor | None, scales: tuple[int, ...]) -> torch.Tensor:
        """Token embeddings of ``scales``: the start token for scale 0, word_embed(inputs) for the rest."""
        B = cond_BC.shape[0]
        parts = []
        if scales[0] == 0:
            parts.append(cond_BC.unsqueeze(1).expand(B, self.first_l, -1) + self.pos_start.expand(B, -1, -1))
        if inputs_BlCv is not None and inputs_BlCv.shape[1] > 0:
            parts.append(self.word_embed(inputs_BlCv.float()))
        x_BLC = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        device = x_BLC.device
        return x_BLC + self.lvl_embed(self.scale_ids(scales, device)) + self.pos_1LC[:, self.token_positions(scales, device)]

    def select_inputs(self, teacher_BLCv: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
        """Slice the rows of ``scales`` (except scale 0) out of the teacher input of scales 1..K-1."""
        pieces = [teacher_BLCv[:, self.begin[s] - self.first_l: self.begin[s] - self.first_l + self.patch_nums[s] ** 2]
                  for s in scales if s > 0]
        if not pieces:
            return teacher_BLCv[:, :0]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)

    # -- forward ------------------------------------------------------------
    def run_blocks(self, x_BLC: torch.Tensor, cond_BC: torch.Tensor, scales: tuple[int, ...]) -> torch.Tensor:
        """The head's input features (B, L, C): the blocks, then the head's AdaLN."""
        for block in self.blocks:
            x_BLC = block(x_BLC, cond_BC, self.spec, scales)
        return self.head_nm(x_BLC.float(), cond_BC).float()

    def logits(self, features_BLC: torch.Tensor) -> torch.Tensor:
        return self.head(features_BLC).float()  # (B, L, V)

    def forward(self, labels_B: torch.Tensor, teacher_BLCv: torch.Tensor,
                scales: tuple[int, ...] | None = None) -> torch.Tensor:
        """Teacher-forced logits (B, l, V) for ``scales`` (default: all), all scales in one pass.

        ``teacher_BLCv`` is the tokenizer's teacher input for scales 1..K-1, (B, L - first_l, Cv).
        Under ``var`` the scales must be a prefix 0..n-1 (block-causal needs everything before).
        Under ``scale_markov``/``mvar`` any subset works: the 8:1:1 cycle uses (0..7), (8,), (9,).
        """
        scales = tuple(range(len(self.patch_nums))) if scales is None else tuple(scales)
        self.check_inputs(labels_B, teacher_BLCv, scales)
        if self.spec.info.prefix_only and scales != tuple(range(len(scales))):
            raise ValueError(f"attention '{self.spec.pattern}' trains on a prefix of scales, got {scales}")
        if self.training and self.cfg.cond_drop_rate > 0:
            drop = torch.rand(labels_B.shape[0], device=labels_B.device) < self.cfg.cond_drop_rate
            labels_B = torch.where(drop, torch.full_like(labels_B, self.num_classes), labels_B)
        cond_BC = self.class_emb(labels_B)
        x_BLC = self.embed(cond_BC, self.select_inputs(teacher_BLCv, scales), scales)
        return self.logits(self.run_blocks(x_BLC, cond_BC, scales))

    def check_inputs(self, labels_B: torch.Tensor, teacher_BLCv: torch.Tensor, scales: tuple[int, ...]) -> None:
        """Shapes and ranges, so that a wrong batch fails with a message instead of deep in a matmul."""
        expected = (self.L - self.first_l, self.Cvae)
        if teacher_BLCv.ndim != 3 or tuple(teacher_BLCv.shape[1:]) != expected:
            raise ValueError(f"teacher input must be (B, {expected[0]}, {expected[1]}), got {tuple(teacher_BLCv.shape)}")
        if labels_B.ndim != 1 or labels_B.shape[0] != teacher_BLCv.shape[0]:
            raise ValueError(f"labels must be (B,) = ({teacher_BLCv.shape[0]},), got {tuple(labels_B.shape)}")
        if labels_B.numel() and (int(labels_B.min()) < 0 or int(labels_B.max()) > self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                             f"got {labels_B.min().item()}..{labels_B.max().item()}")
        if not scales or list(scales) != sorted(set(scales)) or scales[-1] >= len(self.patch_nums):
            raise ValueError(f"scales must be increasing indices below {len(self.patch_nums)}, got {scales}")

    def target_positions(self, scales: tuple[int, ...] | None, device: torch.device) -> torch.Tensor:
        """Indices into the flat (B, L) code indices that ``forward(scales=...)`` predicts."""
        scales = tuple(range(len(self.patch_nums))) if scales is None else tuple(scales)
        return self.token_positions(scales, device)

    # -- sampling support ---------------------------------------------------
    def set_kv_cache(self, enabled: bool) -> None:
        for block in self.blocks:
            block.attn.kv_cache = [] if enabled else None

    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for b in self.blocks for t in (b.attn.kv_cache or []))

    def step_features(self, cond_BC: torch.Tensor, inputs_BlCv: torch.Tensor | None, si: int) -> torch.Tensor:
        """The head's input (B, l, C) for scale ``si`` alone: its tokens only (MVAR), or against the KV cache
        (VAR). Sampling applies ``head`` to blocks of it, so a whole scale's logits never exist at once."""
        x_BLC = self.embed(cond_BC, inputs_BlCv, (si,))
        return self.run_blocks(x_BLC, cond_BC, (si,))

    def step_logits(self, cond_BC: torch.Tensor, inputs_BlCv: torch.Tensor | None, si: int) -> torch.Tensor:
        """Logits (B, l, V) of scale ``si`` alone."""
        return self.logits(self.step_features(cond_BC, inputs_BlCv, si))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
