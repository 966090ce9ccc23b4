"""Generator configuration, the names of the attention backends, and the registry of named sizes
(`var-d16`, `mvar-d16`, `*-tiny` ...). Imports no torch: the command-line parsers list ``PATTERNS``
(from the pattern registry, ``mvar.models.patterns``) and ``BACKENDS`` without loading the model."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, get_args

from mvar.config import check
from mvar.models.patterns import PATTERNS, Pattern, pattern_info

Backend = Literal["auto", "reference", "banded", "flex", "natten"]
BACKENDS: tuple[str, ...] = get_args(Backend)


@dataclass
class ModelConfig:
    """The next-scale transformer. ``attention`` picks VAR, scale-Markov or MVAR; parameters are shared."""

    attention: Pattern = "var"
    depth: int = 16
    embed_dim: Optional[int] = None        # default 64 * depth
    num_heads: Optional[int] = None        # default depth
    mlp_ratio: float = 4.0
    drop_rate: float = 0.0
    attn_drop_rate: float = 0.0
    drop_path_rate: Optional[float] = None  # default 0.1 * depth / 24
    norm_eps: float = 1e-6
    attn_l2_norm: bool = True
    num_classes: int = 1000
    cond_drop_rate: float = 0.1            # labels dropped to the null class (for CFG) while training
    window_size: int = 7                   # k of the k x k window (mvar only)
    markov_from_scale: int = 8             # first 0-based scale with windowed attention (mvar only)
    attention_backend: Backend = "auto"
    # initialisation (the authors' --ini, --hd, --aln, --alng); loaded weights replace it
    init_std: float = -1.0                 # std of the truncated normals; < 0 = sqrt(1 / (3 * width))
    init_head: float = 0.02                # head weight scaled by this
    init_adaln: float = 0.5                # AdaLN scale/shift weights scaled by this
    init_adaln_gamma: float = 1e-3         # AdaLN residual-gate weights scaled by this (MVAR runs; VAR d24 1e-4)

    @property
    def width(self) -> int:
        return self.embed_dim if self.embed_dim is not None else 64 * self.depth

    @property
    def heads(self) -> int:
        return self.num_heads if self.num_heads is not None else self.depth

    @property
    def drop_path(self) -> float:
        return self.drop_path_rate if self.drop_path_rate is not None else 0.1 * self.depth / 24

    def validate(self, prefix: str = "") -> None:
        p = prefix
        check(self.attention in PATTERNS, p + "attention", f"must be one of {', '.join(PATTERNS)}")
        check(self.attention_backend in BACKENDS, p + "attention_backend", f"must be one of {', '.join(BACKENDS)}")
        check(self.depth >= 1, p + "depth", "must be at least 1")
        check(self.width > 0, p + "embed_dim", "must be positive")
        check(self.heads > 0 and self.width % self.heads == 0, p + "num_heads",
              f"must divide embed_dim ({self.width})")
        check(self.window_size >= 1 and self.window_size % 2 == 1, p + "window_size",
              f"must be a positive odd number (3, 5, 7, 9 ...), got {self.window_size}")
        check(self.markov_from_scale >= 0, p + "markov_from_scale", "must be >= 0")
        check(self.num_classes >= 1, p + "num_classes", "must be at least 1")
        for name in ("drop_rate", "attn_drop_rate", "cond_drop_rate"):
            check(0.0 <= getattr(self, name) < 1.0, p + name, "must lie in [0, 1)")
        check(0.0 <= self.drop_path < 1.0, p + "drop_path_rate", "must lie in [0, 1)")
        check(self.init_std != 0, p + "init_std", "must be > 0, or < 0 for sqrt(1 / (3 * width))")
        for name in ("init_head", "init_adaln", "init_adaln_gamma"):
            check(getattr(self, name) >= 0, p + name, "must be >= 0")

    def check_scales(self, patch_nums: tuple[int, ...], prefix: str = "model.") -> None:
        """Checks that need the tokenizer's scales."""
        if not pattern_info(self.attention).windowed:
            return
        check(self.markov_from_scale < len(patch_nums), prefix + "markov_from_scale",
              f"must be below the number of scales ({len(patch_nums)}) for attention '{self.attention}'")
        side = patch_nums[self.markov_from_scale]
        check(self.window_size <= side, prefix + "window_size",
              f"{self.window_size} is larger than the first windowed scale ({side}x{side}, index "
              f"{self.markov_from_scale}); use an odd window <= {side - 1 + side % 2} or a later markov_from_scale")


# Named sizes: depth and width of VAR's released models, plus small ones for tests and CPU runs.
SIZES: dict[str, dict] = {
    "tiny": dict(depth=2, embed_dim=64, num_heads=2, drop_path_rate=0.0, num_classes=10,
                 window_size=3, markov_from_scale=2),
    "d4": dict(depth=4, drop_path_rate=0.0),
    "d8": dict(depth=8),
    "d16": dict(depth=16),
    "d20": dict(depth=20),
    "d24": dict(depth=24),
    "d30": dict(depth=30),
}
# The tokenizer each size goes with (names from mvar.tokenizer.TOKENIZER_SIZES).
SIZE_TOKENIZER = {"tiny": "vae-tiny", "d4": "vae-tiny32"}
DEFAULT_TOKENIZER = "vae-ch160"


def model_names() -> list[str]:
    return [f"{variant}-{size}" for size in SIZES for variant in PATTERNS]


def split_name(name: str) -> tuple[str, str]:
    variant, _, size = name.rpartition("-")
    if variant not in PATTERNS or size not in SIZES:
        raise KeyError(f"unknown model '{name}'; known: {', '.join(model_names())}")
    return variant, size


def named_fields(name: str) -> dict:
    """``mvar-d16`` -> {'attention': 'mvar', 'depth': 16}: the keys the registry sets (a run config's
    `model_name` puts them under its `model` keys, which are validated once with the rest)."""
    variant, size = split_name(name)
    return {"attention": variant, **SIZES[size]}


def named_model(name: str, **overrides) -> ModelConfig:
    """``mvar-d16`` -> ModelConfig(attention='mvar', depth=16, ...)."""
    cfg = replace(ModelConfig(**named_fields(name)), **overrides)
    cfg.validate()
    return cfg


def tokenizer_for(name: str) -> str:
    return SIZE_TOKENIZER.get(split_name(name)[1], DEFAULT_TOKENIZER)
