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
from typing import Literal, Optional, Protocol

from mvar.config import (
    ConfigError,
    check,
    from_dict,
    merge,
    parse_overrides,
    read_yaml,
)
from mvar.data.config import DataConfig
from mvar.evaluation.config import EvalConfig, SamplingDefaults
from mvar.metric_names import BY_KEY
from mvar.models.config import ModelConfig, named_fields
from mvar.models.patterns import pattern_info
from mvar.tracking import TrackingConfig


@dataclass
class RunSettings:
    """The `run.*` keys: identity, length, checkpoints and faults of one training run."""

    name: str = ""                 # '' = the config file's stem: rerunning the same command resumes it
    storage_path: str = "out/runs"  # Ray Train storage (absolute, a shared path or s3://... on a cluster)
    steps: int = 1000              # optimizer steps in all (0 when run.epochs gives them)
    # passes over data.shards instead of run.steps: ceil(epochs * samples / global batch) steps, from the
    # manifest, resolved before Ray starts (exclusive with run.steps)
    epochs: float = 0.0
    checkpoint_every: int = 500    # steps between checkpoints (the last step always writes one)
    keep_checkpoints: int = 2
    log_every: int = 10            # steps between metric logs
    seed: int = 0                  # the training seed: initial weights, class dropout, sample grids
    # training seeds: run.seed, run.seed+1, ... each its own run `<name>-seed<seed>`, nested under a group
    # run `<name>` (mvar train --repeats; mvar.training.launch.train_repeats)
    repeats: int = 1
    max_failures: int = 3          # worker-group failures recovered from the latest checkpoint
    fault_nan_at_step: int = 0     # testing aid: make the loss NaN at this step (0 = never)

    def validate(self, prefix: str = "") -> None:
        check(self.epochs >= 0, prefix + "epochs", "must be >= 0 (0 = use run.steps)")
        check(self.steps >= 1 or self.epochs > 0, prefix + "steps", "must be >= 1 (or set run.epochs)")
        check(self.checkpoint_every >= 1, prefix + "checkpoint_every", "must be >= 1")
        check(self.keep_checkpoints >= 1, prefix + "keep_checkpoints", "must be >= 1")
        check(self.log_every >= 1, prefix + "log_every", "must be >= 1")
        check(self.repeats >= 1, prefix + "repeats", f"must be >= 1 (the number of training seeds), got {self.repeats}")
        check(self.max_failures >= -1, prefix + "max_failures", "must be >= 0, or -1 for unlimited")
        check(bool(self.storage_path), prefix + "storage_path", "must not be empty")
        check("/" not in self.name, prefix + "name", f"must be a plain name, got '{self.name}'")


# The authors' no-weight-decay keys (VAR's and MVAR's train.py): a parameter whose name CONTAINS one is
# not decayed, besides 1-D tensors and biases. 'gamma'/'beta' name no parameter of this model.
AUTHORS_NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC",
                         "pos_start", "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias",
                         "scale_mul")


@dataclass
class OptimConfig:
    """AdamW with the authors' parameter groups and their `lin0` schedule (VAR's and MVAR's train.py)."""

    base_lr: float = 1e-4          # per 256 images of global batch (VAR's rule, --tblr)
    lr: float = 0.0                # absolute peak lr (--tlr); 0 = base_lr * global_batch / 256
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.05     # --twd; not on 1-D params, biases and names containing no_decay_keys
    weight_decay_end: Optional[float] = None  # --twde: cosine to this at the last step; null = constant
    no_decay_keys: list[str] = field(default_factory=lambda: list(AUTHORS_NO_DECAY_KEYS))
    warmup_steps: int = 0          # linear warm-up steps (--wp, in steps); 0 = warmup_ratio x run.steps
    warmup_ratio: float = 0.0      # warm-up as a fraction of run.steps (the authors' default: 1/50 of the epochs)
    warmup_start_ratio: float = 0.005  # --wp0
    hold_ratio: float = 0.05       # after warm-up: the peak for this fraction of the remaining steps (lin0)
    end_ratio: float = 0.1         # --wpe: lr at the last step, relative to the peak
    grad_clip: float = 2.0         # --tclip, on the total 2-norm; 0 = no clipping

    def validate(self, prefix: str = "") -> None:
        check(self.base_lr > 0, prefix + "base_lr", "must be > 0")
        check(self.lr >= 0, prefix + "lr", "must be >= 0 (0 = scaled from base_lr)")
        check(all(0 <= b < 1 for b in self.betas), prefix + "betas", "must lie in [0, 1)")
        check(self.eps > 0, prefix + "eps", "must be > 0")
        check(self.weight_decay >= 0, prefix + "weight_decay", "must be >= 0")
        check(self.weight_decay_end is None or self.weight_decay_end >= 0, prefix + "weight_decay_end",
              "must be >= 0, or null for a constant weight decay")
        check(all(bool(k) for k in self.no_decay_keys), prefix + "no_decay_keys", "must not hold an empty key")
        check(self.warmup_steps >= 0, prefix + "warmup_steps", "must be >= 0")
        check(0 <= self.warmup_ratio < 1, prefix + "warmup_ratio", "must lie in [0, 1)")
        check(not (self.warmup_steps and self.warmup_ratio), prefix + "warmup_ratio",
              "set optim.warmup_steps or optim.warmup_ratio, not both")
        check(0 < self.warmup_start_ratio <= 1, prefix + "warmup_start_ratio", "must lie in (0, 1]")
        check(0 <= self.hold_ratio < 1, prefix + "hold_ratio", f"must lie in [0, 1), got {self.hold_ratio}")
        check(0 <= self.end_ratio <= 1, prefix + "end_ratio", "must lie in [0, 1]")
        check(self.grad_clip >= 0, prefix + "grad_clip", "must be >= 0")


@dataclass
class LoopConfig:
    """The `train.*` keys: what one step covers and in which precision."""

    # full: all scales (VAR); cycle: the MVAR authors' scale cycle; packed: all scales at once, Markov mask
    scale_schedule: Literal["auto", "full", "cycle", "packed"] = "auto"  # auto: the pattern's (var full, else cycle)
    # cycle: this many steps on the dense scales (< model.markov_from_scale), then one on each later scale
    cycle_ratio: int = 8           # MVAR's --ratio_k (8 with 10 scales: the paper's 8:1:1)
    # auto: bf16 autocast on GPU, fp32 on CPU; fp16: autocast + GradScaler (the authors' --fp16=1, GPU only)
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    tf32: bool = True              # TF32 matmuls and convolutions on CUDA (the authors' --tf32)
    # at each checkpoint rank 0 samples one image of each class 0..N-1 (same seed every time) and logs the
    # grid to MLflow (`log_image`, key `samples`, the checkpoint's step); 0 = off
    sample_images: int = 10

    def schedule_for(self, attention: str) -> str:
        if self.scale_schedule != "auto":
            return self.scale_schedule
        return pattern_info(attention).default_schedule

    def validate(self, prefix: str = "") -> None:
        check(self.cycle_ratio >= 1, prefix + "cycle_ratio", f"must be >= 1, got {self.cycle_ratio}")
        check(self.sample_images >= 0, prefix + "sample_images", "must be >= 0 (0 = no sample grids)")


@dataclass
class ScalingSettings:
    """The `scaling.*` keys, passed to Ray Train's ScalingConfig."""

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0   # fractional values let 2 workers share a small machine
    gpus_per_worker: float = 1.0
    socket_ifname: str = ""        # network interface of gloo/NCCL sockets; '' = the one of the node's address
    # Ray's placement of the workers' bundles: PACK (as few nodes as possible), SPREAD (over the nodes,
    # best effort: after a node is lost the workers restart on the nodes left), STRICT_PACK, STRICT_SPREAD
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    def validate(self, prefix: str = "") -> None:
        check(self.num_workers >= 1, prefix + "num_workers", "must be >= 1")
        check("," not in self.socket_ifname and " " not in self.socket_ifname, prefix + "socket_ifname",
              f"must name one interface (e.g. eth0), got '{self.socket_ifname}'")
        check(self.cpus_per_worker > 0, prefix + "cpus_per_worker", "must be > 0")
        check(self.gpus_per_worker > 0, prefix + "gpus_per_worker", "must be > 0")



# what `checkpoint_eval.best_by` may name: the checkpoint's val/loss, or a quality metric its evaluation logs
BEST_BY = ("val/loss", "eval/fid", "eval/kid", "eval/is", "eval/precision", "eval/recall", "eval/class_acc")


@dataclass
class CheckpointEvalConfig(EvalConfig):
    """The `checkpoint_eval.*` keys: each checkpoint of a training run evaluated as `mvar eval` would (the same
    `eval.*` keys and meaning), with a small sample, its `eval/*` metrics logged into the training run at the
    checkpoint's step. On Ray Train a validation task beside the training (Ray Train's checkpoint validation),
    in a local run after each checkpoint write (`mvar.training.checkpoint_eval`)."""

    every_checkpoint: bool = False  # evaluate each checkpoint the run reports
    # which checkpoint models:/NAME@best names: '' = the lowest val/loss; eval/fid (or another of BEST_BY,
    # each in its own direction) needs every_checkpoint
    best_by: str = ""
    timeout_s: float = 0.0         # Ray: a checkpoint's evaluation cancelled after this long; 0 = no limit
    # the defaults of `mvar eval` made small: a curve over checkpoints, not the final figure
    num_per_class: int = 10
    bootstrap: int = 0
    write_npz: bool = False
    num_workers: int = 0           # the evaluation samples in its own task (Ray) or in the training process
    cpus_per_worker: float = 1.0   # the validation task's CPUs on Ray (use_gpu: one GPU)

    def plain(self, out_dir: str, reference: str) -> EvalConfig:
        """The `mvar eval` config of one checkpoint's evaluation: these keys, its own ``out_dir`` and the
        ``reference`` (the statistics computed once for the run when it names an image set)."""
        keys = {f.name: getattr(self, f.name) for f in dataclasses.fields(EvalConfig)}
        return EvalConfig(**{**keys, "out_dir": out_dir, "reference": reference})

    @property
    def best_metric(self) -> str:
        return self.best_by or "val/loss"

    def validate(self, prefix: str = "") -> None:
        check(self.best_metric in BEST_BY, prefix + "best_by", f"must be '' (val/loss) or one of "
              f"{', '.join(BEST_BY)}, got '{self.best_by}'")
        if not self.every_checkpoint:
            check(self.best_metric == "val/loss", prefix + "best_by",
                  f"'{self.best_by}' is logged by the checkpoints' evaluation: set {prefix}every_checkpoint=true")
            return
        super().validate(prefix)
        check(self.metrics, prefix + "metrics", "must stay true: the checkpoints' evaluation logs its metrics")
        check(self.num_workers == 0, prefix + "num_workers",
              "must be 0: a checkpoint's evaluation samples in its own task (Ray) or in the training process")
        check(len(self.settings()) == 1, prefix + "cfg", "a checkpoint is evaluated at one setting: give at most "
              "one value each of cfg, top_k, top_p")
        check(self.best_metric != "eval/class_acc" or self.feature_extractor == "classifier", prefix + "best_by",
              "eval/class_acc is measured with feature_extractor=classifier only")
        check(self.timeout_s >= 0, prefix + "timeout_s", "must be >= 0 (0 = no limit)")

    @property
    def lower_is_better(self) -> bool:
        return BY_KEY[self.best_metric].lower_is_better


class LoopSettings(Protocol):
    """The `train.*` keys every trainer has."""

    precision: str
    tf32: bool


class RunConfig(Protocol):
    """What the trainer core, its Ray adapter and the driver (`launch`) read of a run config, typed:
    `TrainConfig` and `TokenizerTrainConfig` both fit it. Read-only where the two differ in type."""

    run: RunSettings
    scaling: ScalingSettings
    tracking: TrackingConfig
    data: DataConfig

    @property
    def optim(self) -> OptimConfig: ...

    @property
    def train(self) -> LoopSettings: ...


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
    # stored in every checkpoint: the defaults of `mvar sample` and `mvar eval` for this model
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)
    # each checkpoint's FID / precision / recall / KID (/ class accuracy) logged into the run at its step
    checkpoint_eval: CheckpointEvalConfig = field(default_factory=CheckpointEvalConfig)

    def validate(self, prefix: str = "") -> None:
        check(bool(self.tokenizer), prefix + "tokenizer",
              "must name a tokenizer checkpoint directory (workflows.train_tokenizer, mvar import-var)")
        check(bool(self.data.shards), prefix + "data.shards", "must name a shard directory or URL (mvar data pack)")
        schedule, info = self.train.schedule_for(self.model.attention), pattern_info(self.model.attention)
        what = "full sequences" if info.schedules == ("full",) else "the schedules " + ", ".join(info.schedules)
        check(schedule in info.schedules, prefix + "train.scale_schedule",
              f"attention '{info.name}' trains on {what} only, got '{schedule}'")
        check(schedule != "cycle" or self.model.markov_from_scale >= 1, prefix + "model.markov_from_scale",
              "is 0: the scale cycle (train.scale_schedule) needs at least one dense scale before it")
        check(self.train.precision != "fp16" or self.scaling.use_gpu, prefix + "train.precision",
              "fp16 (autocast + GradScaler) is for CUDA; set scaling.use_gpu=true, or train.precision=auto")

    def check_scales(self, patch_nums: tuple[int, ...], prefix: str = "") -> None:
        """Checks that need the tokenizer's scales (run by the driver before Ray starts)."""
        self.model.check_scales(patch_nums, prefix + "model.")
        if self.train.schedule_for(self.model.attention) == "cycle":
            check(self.model.markov_from_scale < len(patch_nums), prefix + "model.markov_from_scale",
                  f"is {self.model.markov_from_scale}: the scale cycle needs at least one scale at or after it, "
                  f"but the tokenizer has {len(patch_nums)} scales (0..{len(patch_nums) - 1})")

    @property
    def variant(self) -> str:
        return self.model.attention


def _apply_model_name(data: dict) -> dict:
    name = data.get("model_name") or ""
    if not name:
        return data
    try:
        base = named_fields(name)
    except KeyError as err:
        raise ConfigError(f"config key 'model_name': {err.args[0]}") from None
    return {**data, "model": merge(base, data.get("model") or {})}


def check_length_keys(layers: Iterable[dict]) -> dict:
    """Merge config layers (YAML, then overrides): a later layer's run.steps replaces an earlier run.epochs
    and the other way round; both in one layer is refused, naming the keys."""
    out: dict = {}
    for layer in layers:
        run = layer.get("run") or {}
        if isinstance(run, dict) and "steps" in run and run.get("epochs"):
            raise ConfigError("config keys 'run.steps' and 'run.epochs' are exclusive: set one of them")
        if isinstance(run, dict) and isinstance(out.get("run"), dict):
            if "steps" in run:
                out["run"].pop("epochs", None)
            if run.get("epochs"):
                out["run"].pop("steps", None)
        out = merge(out, layer)
    run = out.get("run") or {}
    if isinstance(run, dict) and run.get("epochs"):
        out["run"] = {**run, "steps": 0}  # resolved from the manifest by the driver
    return out


def load_train_config(path: str | Path | None = None, overrides: Iterable[str] = ()) -> TrainConfig:
    """Defaults -> `model_name` registry entry -> YAML -> overrides; a missing run name is the file's stem."""
    data = check_length_keys([read_yaml(path) if path else {}, parse_overrides(overrides)])
    data = _apply_model_name(data)
    cfg = from_dict(TrainConfig, data)
    if not cfg.run.name:
        cfg.run = dataclasses.replace(cfg.run, name=Path(path).stem if path else "train")
    return cfg
