"""TokenizerTrainConfig: the run config of `workflows.train_tokenizer`.

Loaded like TrainConfig: dataclass defaults, then the registry entry named by
`tokenizer_name` (`vae-tiny`, `vae-ch160` ...) under the `tokenizer` keys, then
the YAML file, then `a.b=c` overrides; `data.image_size` 0 becomes the
tokenizer's. Validated once, before Ray or any worker starts. The sections `run`, `scaling` and `tracking`
are the generator trainer's, so `mvar.training.launch.launch` drives both.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from mvar.config import (
    ConfigError,
    check,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
    to_dict,
)
from mvar.data.config import DataConfig
from mvar.tokenizer import TokenizerConfig
from mvar.tokenizer.training import CodebookConfig, GanConfig
from mvar.tracking import TrackingConfig
from mvar.training.config import (
    OptimConfig,
    RunSettings,
    ScalingSettings,
    check_length_keys,
)


@dataclass
class TokenizerOptimConfig(OptimConfig):
    """The generator's AdamW settings with defaults for an autoencoder: no weight decay (it would
    shrink the codebook), a tighter clip, and 2e-4 per 256 images (LlamaGen's VQ rate, 1e-4 at batch 128)."""

    base_lr: float = 2e-4
    weight_decay: float = 0.0
    # besides 1-D tensors and biases: the codebook (decay would shrink the codes)
    no_decay_keys: list[str] = field(default_factory=lambda: ["quantize.embedding.weight"])
    grad_clip: float = 1.0


@dataclass
class TokenizerLossConfig:
    """The `losses.*` keys: weights of the terms of the tokenizer's training loss."""

    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0          # commitment + codebook, averaged over scales (tokenizer.beta inside)
    perceptual_weight: float = 0.0  # > 0 needs perceptual_weights
    # local torchvision vgg16 state dict (or only its `features.*` keys); never downloaded
    perceptual_weights: str = ""
    perceptual_layers: int = 5      # VGG16 taps used: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (first n)

    def validate(self, prefix: str = "") -> None:
        for name in ("l1_weight", "l2_weight", "vq_weight", "perceptual_weight"):
            check(getattr(self, name) >= 0, prefix + name, "must be >= 0")
        check(self.l1_weight + self.l2_weight > 0, prefix + "l1_weight",
              "l1_weight and l2_weight are both 0: nothing would train the decoder")
        check(1 <= self.perceptual_layers <= 5, prefix + "perceptual_layers", "must lie in 1..5")
        check(self.perceptual_weight == 0 or bool(self.perceptual_weights), prefix + "perceptual_weights",
              f"perceptual_weight is {self.perceptual_weight:g} but no weights file is given: set it to a local "
              "torchvision vgg16 state dict, or set losses.perceptual_weight=0")

    @property
    def perceptual(self) -> bool:
        return self.perceptual_weight > 0


@dataclass
class TokenizerLoopConfig:
    """The `train.*` keys of the tokenizer trainer."""

    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    tf32: bool = True              # TF32 matmuls and convolutions on CUDA


@dataclass
class TokenizerTrainConfig:
    tokenizer_name: str = ""       # registry defaults for `tokenizer`, e.g. vae-tiny, vae-ch160
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    init_from: str = ""            # tokenizer (or model) checkpoint whose tokenizer weights start the run
    output: str = ""               # final tokenizer checkpoint; '' = <run.storage_path>/<run.name>/tokenizer
    data: DataConfig = field(default_factory=DataConfig)
    optim: TokenizerOptimConfig = field(default_factory=TokenizerOptimConfig)
    losses: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    # codebook upkeep: k-means++ init before the first step (skipped with init_from: the codebook is
    # the checkpoint's), dead-code restarts (off by default), the low-usage warning
    codebook: CodebookConfig = field(default_factory=CodebookConfig)
    gan: GanConfig = field(default_factory=GanConfig)  # adversarial loss; off (weight 0) by default
    train: TokenizerLoopConfig = field(default_factory=TokenizerLoopConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, prefix: str = "") -> None:
        check(bool(self.data.shards), prefix + "data.shards",
              "must name an image shard directory or URL (mvar data pack, mvar data synth)")
        check(self.data.kind in ("auto", "images"), prefix + "data.kind",
              f"the tokenizer trains on image shards, got '{self.data.kind}'")
        check(self.data.image_size in (0, self.tokenizer.image_size), prefix + "data.image_size",
              f"is {self.data.image_size} but the tokenizer takes {self.tokenizer.image_size} px images "
              "(tokenizer.image_size); set them equal, or data.image_size=0")

    def output_dir(self, storage: str) -> str:
        """Where the driver writes the final tokenizer checkpoint."""
        return self.output or f"{storage.rstrip('/')}/{self.run.name}/tokenizer"


def _apply_tokenizer_name(data: dict) -> dict:
    """The registry entry of `tokenizer_name` under the `tokenizer` keys (the YAML's keys win)."""
    name = data.get("tokenizer_name") or ""
    if not name:
        return data
    try:
        base = to_dict(TokenizerConfig.named(name))
    except KeyError as err:
        raise ConfigError(f"config key 'tokenizer_name': {err.args[0]}") from None
    return {**data, "tokenizer": merge(base, data.get("tokenizer") or {})}


def load_tokenizer_train_config(path: str | Path | None = None,
                                overrides: Iterable[str] = ()) -> TokenizerTrainConfig:
    """Defaults -> registry entry -> YAML -> overrides; a missing run name is the file's stem."""
    data = check_length_keys([read_yaml(path) if path else {}, parse_overrides(overrides)])
    data = _apply_tokenizer_name(data)
    cfg = from_dict(TokenizerTrainConfig, data)
    if not cfg.run.name:
        cfg.run = dataclasses.replace(cfg.run, name=Path(path).stem if path else "train_tokenizer")
    if not cfg.data.image_size:
        cfg.data = dataclasses.replace(cfg.data, image_size=cfg.tokenizer.image_size)
    return cfg
