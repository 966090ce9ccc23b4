"""EvalConfig (the `eval.*` keys) and the evaluation run config that nests it with tracking."""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field

from mvar.config import check
from mvar.models.config import PATTERNS
from mvar.sampling import SamplingConfig
from mvar.tracking import TrackingConfig


@dataclass
class SamplingDefaults:
    """A model's own sampling settings: a training run's `sampling.*` keys, stored in its checkpoints'
    checkpoint.yaml; `mvar sample` and `mvar eval` use them unless told otherwise."""

    cfg: float = 1.5               # guidance at the last scale (VAR's FID setting)
    top_k: int = 900
    top_p: float = 0.96

    def validate(self, prefix: str = "") -> None:
        check(self.cfg >= 0, prefix + "cfg", "guidance must be >= 0 (0 turns CFG off)")
        check(self.top_k >= 0, prefix + "top_k", "must be >= 0 (0 = no top-k)")
        check(0 <= self.top_p <= 1, prefix + "top_p", "must lie in [0, 1] (0 = no nucleus filtering)")

    @classmethod
    def of_checkpoint(cls, meta: dict) -> "SamplingDefaults":
        """From a checkpoint.yaml's `sampling` (absent in imported or older checkpoints: the defaults)."""
        stored = meta.get("sampling") or {}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in stored.items() if k in known})


@dataclass
class EvalConfig:
    # -- what is sampled: num_per_class x len(classes) images, classes interleaved (i % C)
    num_per_class: int = 50
    classes: list[int] = field(default_factory=list)   # class ids; [] = every class of the model
    # each combination of cfg x top_k x top_p is one setting (a child run when there are several);
    # [] = the checkpoint's own (its training run's `sampling.*`, else 1.5 / 900 / 0.96)
    cfg: list[float] = field(default_factory=list)
    top_k: list[int] = field(default_factory=list)
    top_p: list[float] = field(default_factory=list)
    seed: int = 0                    # batch b uses a generator seeded from (seed, b): same images on any worker count
    batch_size: int = 32             # images per generation batch (part of the randomness: keep it to reproduce)
    attention: str = ""              # '' = the checkpoint's; var | scale_markov | mvar (same weights)
    window_size: int = 0             # 0 = the checkpoint's (mvar only)
    amp: bool = True                 # bfloat16 autocast when sampling on CUDA
    samples_per_shard: int = 1024    # unit of resume and of work per task; rounded down to whole batches
    # -- where: Ray workers (tasks), each sampling a contiguous run of shards
    num_workers: int = 1             # 0 = sample in this process, without Ray
    use_gpu: bool = False            # one GPU per worker
    cpus_per_worker: float = 1.0     # fractions allowed (2 workers x 0.5 on a 2-core machine)
    threads_per_worker: int = 0      # torch CPU threads per worker; 0 = max(1, int(cpus_per_worker))
    out_dir: str = ""                # '' = out/eval/<checkpoint name>-<hash of its path>
    # -- metrics
    metrics: bool = True             # false: sample only
    reference: str = ""              # shard set (dir/URL), ADM image .npz, or a file from `mvar eval make-ref`
    feature_extractor_weights: str = ""  # '' = torch-fidelity's Inception (downloaded once); the classifier's .pt
    # inception: torch-fidelity's Inception-v3; classifier: a small classifier trained on the data set's
    # labelled training split (`mvar eval train-classifier`): adds eval/class_acc, never comparable with Inception
    feature_extractor: str = "inception"
    prc_neighborhood: int = 3        # k of the k-NN balls of precision/recall
    isc_splits: int = 10             # Inception Score splits
    feature_batch_size: int = 32     # Inception batch
    # resamples of the generated samples' features for eval/fid_boot_* and eval/class_acc_boot_* (the
    # interval over samples the report shows for a group of one training seed); 0 = off
    bootstrap: int = 100
    device: str = "auto"             # metrics (and in-process sampling): auto = cuda when available
    grid_classes: int = 8            # sample grid: columns (classes) ...
    grid_per_class: int = 4          # ... and rows (samples of each)
    write_npz: bool = True           # samples.npz (arr_0 uint8 (N, H, W, 3)) for ADM's evaluator

    def with_defaults(self, defaults: SamplingDefaults) -> "EvalConfig":
        """A copy whose empty cfg / top_k / top_p lists take ``defaults`` (the checkpoint's)."""
        return dataclasses.replace(self, cfg=self.cfg or [defaults.cfg], top_k=self.top_k or [defaults.top_k],
                                   top_p=self.top_p or [defaults.top_p])

    def settings(self, defaults: SamplingDefaults | None = None) -> list[SamplingConfig]:
        """Every (cfg, top_k, top_p) combination, in order; empty lists take ``defaults`` (the checkpoint's)."""
        full = self.with_defaults(defaults or SamplingDefaults())
        return [SamplingConfig(cfg=c, top_k=k, top_p=p, seed=self.seed)
                for c, k, p in itertools.product(full.cfg, full.top_k, full.top_p)]

    @property
    def shard_size(self) -> int:
        return self.batch_size * max(1, self.samples_per_shard // self.batch_size)

    @property
    def threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def validate(self, prefix: str = "") -> None:
        p = prefix
        check(self.num_per_class >= 1, p + "num_per_class", "must be >= 1")
        check(all(c >= 0 for c in self.classes), p + "classes", "class ids must be >= 0")
        check(len(set(self.classes)) == len(self.classes), p + "classes", "lists a class id twice")
        check(all(c >= 0 for c in self.cfg), p + "cfg", "guidance must be >= 0 (0 turns CFG off)")
        check(all(k >= 0 for k in self.top_k), p + "top_k", "must be >= 0 (0 = no top-k)")
        check(all(0 <= t <= 1 for t in self.top_p), p + "top_p", "must lie in [0, 1] (0 = no nucleus filtering)")
        check(self.batch_size >= 1, p + "batch_size", "must be >= 1")
        check(self.attention in ("",) + PATTERNS, p + "attention", f"must be '' or one of {', '.join(PATTERNS)}")
        check(self.window_size >= 0, p + "window_size", "must be >= 0 (0 = the checkpoint's)")
        check(self.samples_per_shard >= 1, p + "samples_per_shard", "must be >= 1")
        check(self.num_workers >= 0, p + "num_workers", "must be >= 0 (0 = in this process)")
        check(self.cpus_per_worker > 0, p + "cpus_per_worker", "must be > 0")
        check(self.threads_per_worker >= 0, p + "threads_per_worker", "must be >= 0")
        check(self.prc_neighborhood >= 1, p + "prc_neighborhood", "must be >= 1")
        check(self.isc_splits >= 1, p + "isc_splits", "must be >= 1")
        check(self.feature_batch_size >= 1, p + "feature_batch_size", "must be >= 1")
        check(self.bootstrap >= 0,
              p + "bootstrap", f"must be an integer >= 0 (resamples; 0 = off), got {self.bootstrap!r}")
        check(self.feature_extractor in ("inception", "classifier"), p + "feature_extractor",
              f"must be inception or classifier, got '{self.feature_extractor}'")
        check(self.feature_extractor != "classifier" or not self.metrics or bool(self.feature_extractor_weights),
              p + "feature_extractor_weights", "eval.feature_extractor=classifier needs the classifier file "
              "(`mvar eval train-classifier --shards DIR --out FILE.pt`)")
        check(not self.metrics or bool(self.reference), p + "reference",
              "is needed for the metrics: a shard set, an ADM .npz or a `mvar eval make-ref` file "
              "(or set eval.metrics=false to sample only)")
        check(self.grid_classes >= 1 and self.grid_per_class >= 1, p + "grid_classes", "grid sizes must be >= 1")


@dataclass
class EvaluateConfig:
    """What `python -m workflows.evaluate` and `mvar eval` run."""

    checkpoint: str = ""             # model checkpoint directory; '' = the model's, else the run's `mvar.checkpoint`
    model: str = ""                  # a registered model version, models:/NAME@ALIAS or models:/NAME/VERSION
    run_id: str = ""                 # MLflow run to log into (a training run); '' = a new run `eval-<name>`
    track: bool = True               # false: no MLflow at all
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(system_metrics=False))

    def validate(self, prefix: str = "") -> None:
        check(bool(self.checkpoint or self.run_id or self.model), prefix + "checkpoint",
              "give a checkpoint directory (--checkpoint), a registered model (--model) or a training run (--run-id)")
        check(not (self.checkpoint and self.model), prefix + "model", "names a checkpoint too: give --checkpoint "
              "or --model, not both")
        check(self.track or not self.model, prefix + "model", "is looked up in MLflow: drop --no-tracking")
        check(self.track or not self.run_id, prefix + "run_id", "needs tracking (drop --no-tracking)")
