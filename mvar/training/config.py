"""TrainConfig: the run config of `workflows.train`, nesting every component's own dataclass.

Loaded as: dataclass defaults, then the registry entry named by `model_name`
(`mvar-d16`, `var-tiny` ...) under the `model` keys, then the YAML file, then
`a.b=c` overrides; validated once, before Ray or any worker starts.
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
from mvar.models.config import ModelConfig, named_model
from mvar.tracking import TrackingConfig


@dataclass
class RunSettings:
    """The `run.*` keys: identity, length, checkpoints and faults of one training run."""

    name: str = ""                 # '' = the config file's stem: rerunning the same command resumes it
    storage_path: str = "out/runs"  # Ray Train storage (absolute, a shared path or s3://... on a cluster)
    steps: int = 1000              # optimizer steps in all
    checkpoint_every: int = 500    # steps between checkpoints (the last step always writes one)
    keep_checkpoints: int = 2
    log_every: int = 10            # steps between metric logs
    seed: int = 0
    max_failures: int = 3          # worker-group failures recovered from the latest checkpoint
    fault_nan_at_step: int = 0     # testing aid: make the loss NaN at this step (0 = never)

    def validate(self, prefix: str = "") -> None:
        check(self.steps >= 1, prefix + "steps", "must be >= 1")
        check(self.checkpoint_every >= 1, prefix + "checkpoint_every", "must be >= 1")
        check(self.keep_checkpoints >= 1, prefix + "keep_checkpoints", "must be >= 1")
        check(self.log_every >= 1, prefix + "log_every", "must be >= 1")
        check(self.max_failures >= -1, prefix + "max_failures", "must be >= 0, or -1 for unlimited")
        check(bool(self.storage_path), prefix + "storage_path", "must not be empty")
        check("/" not in self.name, prefix + "name", f"must be a plain name, got '{self.name}'")


@dataclass
class OptimConfig:
    """AdamW with VAR's parameter groups, linear warm-up then linear decay."""

    base_lr: float = 1e-4          # per 256 images of global batch (VAR's rule)
    lr: float = 0.0                # absolute peak lr; 0 = base_lr * global_batch / 256
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.05     # not on 1-D params, biases and embeddings
    warmup_steps: int = 0
    warmup_start_ratio: float = 0.005
    end_ratio: float = 0.01        # lr at the last step, relative to the peak
    grad_clip: float = 2.0         # 0 = no clipping

    def validate(self, prefix: str = "") -> None:
        check(self.base_lr > 0, prefix + "base_lr", "must be > 0")
        check(self.lr >= 0, prefix + "lr", "must be >= 0 (0 = scaled from base_lr)")
        check(all(0 <= b < 1 for b in self.betas), prefix + "betas", "must lie in [0, 1)")
        check(self.weight_decay >= 0, prefix + "weight_decay", "must be >= 0")
        check(self.warmup_steps >= 0, prefix + "warmup_steps", "must be >= 0")
        check(0 < self.warmup_start_ratio <= 1, prefix + "warmup_start_ratio", "must lie in (0, 1]")
        check(0 <= self.end_ratio <= 1, prefix + "end_ratio", "must lie in [0, 1]")
        check(self.grad_clip >= 0, prefix + "grad_clip", "must be >= 0")


@dataclass
class LoopConfig:
    """The `train.*` keys: what one step covers and in which precision."""

    # full: all scales (VAR); cycle: MVAR's 8:1:1 scale cycle; packed: all scales at once, Markov mask
    scale_schedule: Literal["auto", "full", "cycle", "packed"] = "auto"  # auto: full for var, else cycle
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU

    def schedule_for(self, attention: str) -> str:
        if self.scale_schedule != "auto":
            return self.scale_schedule
        return "full" if attention == "var" else "cycle"


@dataclass
class ScalingSettings:
    """The `scaling.*` keys, passed to Ray Train's ScalingConfig."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0   # fractional values let 2 workers share a small machine
    gpus_per_worker: float = 1.0
    socket_ifname: str = ""        # network interface of gloo/NCCL sockets; '' = the one of the node's address

    def validate(self, prefix: str = "") -> None:
        check(self.num_workers >= 1, prefix + "num_workers", "must be >= 1")
        check("," not in self.socket_ifname and " " not in self.socket_ifname, prefix + "socket_ifname",
              f"must name one interface (e.g. eth0), got '{self.socket_ifname}'")
        check(self.cpus_per_worker > 0, prefix + "cpus_per_worker", "must be > 0")
        check(self.gpus_per_worker > 0, prefix + "gpus_per_worker", "must be > 0")


@dataclass
class TrainConfig:
    model_name: str = ""           # registry defaults for `model`, e.g. mvar-d16, var-tiny
    model: ModelConfig = field(default_factory=ModelConfig)
    tokenizer: str = ""            # tokenizer or model checkpoint directory whose tokenizer the run uses
    init_from: str = ""            # model checkpoint whose weights start the run (e.g. imported VAR)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
    scaling: ScalingSettings = field(default_factory=ScalingSettings)
    run: RunSettings = field(default_factory=RunSettings)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def validate(self, prefix: str = "") -> None:
        check(bool(self.tokenizer), prefix + "tokenizer",
              "must name a tokenizer checkpoint directory (workflows.train_tokenizer, mvar import-var)")
        check(bool(self.data.shards), prefix + "data.shards", "must name a shard directory or URL (mvar data pack)")
        schedule = self.train.schedule_for(self.model.attention)
        check(not (self.model.attention == "var" and schedule != "full"), prefix + "train.scale_schedule",
              f"attention 'var' trains on full sequences only, got '{schedule}'")

    @property
    def variant(self) -> str:
        return self.model.attention


def _apply_model_name(data: dict) -> dict:
    name = data.get("model_name") or ""
    if not name:
        return data
    try:
        base = to_dict(named_model(name))
    except KeyError as err:
        raise ConfigError(f"config key 'model_name': {err.args[0]}") from None
    return {**data, "model": merge(base, data.get("model") or {})}


def load_train_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Defaults -> `model_name` registry entry -> YAML -> overrides; a missing run name is the file's stem."""
    data = read_yaml(path) if path else {}
    data = _apply_model_name(merge(data, parse_overrides(overrides)))
    cfg = from_dict(TrainConfig, data)
    if not cfg.run.name:
        cfg.run = dataclasses.replace(cfg.run, name=Path(path).stem if path else "train")
    return cfg
