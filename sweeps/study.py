"""StudyConfig: what a study file (`sweeps/*.yaml`) holds, checked once, and what it turns into.

A study file names a base training config, the keys of that config to search over, the
metrics to optimise, the sampler and pruner, the trial budget and the evaluation each trial
runs on its final checkpoint::

    study_name: k_depth_tiny
    base_config: workflows/configs/mvar_tiny_local.yaml
    overrides: {run.steps: 60}              # dotted keys of the base config, for every trial
    search_space:
      model.window_size: [1, 3]             # a list: one of these values
      optim.lr: {low: 1.0e-4, high: 1.0e-3, log: true}   # a range (int when low/high are ints)
    objectives: {eval/fid: minimize, infer/peak_mem_mb: minimize}
    sampler: {name: grid}
    pruner: {name: none}
    n_trials: 6
    repeats: 1                              # training seeds per trial (run.seed + k); objective = their mean
    eval: {num_per_class: 5, reference: ...}   # EvalConfig keys (mvar/evaluation/config.py)

Checks that need only this file live here (`validate`); checks against the base config, the
tokenizer and the evaluation inputs are in `sweeps.checks`.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mvar.config import ConfigError, check, from_dict, merge, parse_overrides, read_yaml


@dataclass(frozen=True)
class Metric:
    """A metric every trial's runs log: its usual direction and where a trial reads it."""

    direction: str
    source: str              # eval: the evaluation of the final checkpoint; train: the training run
    aggregate: str = "last"  # train metrics: last | max | median over the run's history


# The metrics that runs log (docs/training.md and docs/evaluation.md list them; training: mvar/training/trainer.py
# and loop.py, evaluation: mvar/evaluation/run.py) and that a study may name as objectives.
KNOWN_METRICS: dict[str, Metric] = {
    "eval/fid": Metric("minimize", "eval"),
    "eval/kid": Metric("minimize", "eval"),
    "eval/is": Metric("maximize", "eval"),
    "eval/precision": Metric("maximize", "eval"),
    "eval/recall": Metric("maximize", "eval"),
    "infer/latency_s": Metric("minimize", "eval"),
    "infer/peak_mem_mb": Metric("minimize", "eval"),
    "infer/kv_cache_mb": Metric("minimize", "eval"),
    "infer/images_per_s": Metric("maximize", "eval"),
    "val/loss": Metric("minimize", "train", "last"),
    "train/loss": Metric("minimize", "train", "last"),
    "train/acc": Metric("maximize", "train", "last"),
    "perf/peak_mem_mb": Metric("minimize", "train", "max"),    # deprecated alias of the two below
    "perf/peak_cuda_mb": Metric("minimize", "train", "max"),
    "perf/peak_rss_mb": Metric("minimize", "train", "max"),
    "perf/step_s": Metric("minimize", "train", "median"),
    "perf/images_per_s": Metric("maximize", "train", "median"),
    "model/attn_gflops": Metric("minimize", "train", "last"),
    "model/params_m": Metric("minimize", "train", "last"),
    "cost/device_hours": Metric("minimize", "train", "last"),   # a run's total (logged cumulatively)
}
DIRECTIONS = ("minimize", "maximize")
# keys a sweep sets itself for every trial
RESERVED_KEYS = ("run.name", "run.storage_path", "run.repeats", "tracking.uri", "tracking.experiment",
                 "tracking.run_name")


@dataclass
class SamplerConfig:
    name: Literal["tpe", "nsga2", "grid", "random"] = "tpe"
    seed: int | None = 0
    n_startup_trials: int = 10     # tpe: random trials before the model kicks in
    population_size: int = 50      # nsga2

    def validate(self, prefix: str = "") -> None:
        check(self.n_startup_trials >= 0, prefix + "n_startup_trials", "must be >= 0")
        check(self.population_size >= 2, prefix + "population_size", "must be >= 2")


@dataclass
class PrunerConfig:
    """Pruning on `val/loss`, logged at every checkpoint (needs data.eval_shards and one objective)."""

    name: Literal["none", "median", "successive_halving", "hyperband", "threshold"] = "none"
    n_startup_trials: int = 5      # median: trials that finish before any is pruned
    n_warmup_steps: int = 0        # median: training steps before a trial can be pruned
    min_resource: int = 1          # successive_halving / hyperband: in training steps
    upper: float = math.inf        # threshold: prune once val/loss is above this

    def validate(self, prefix: str = "") -> None:
        check(self.n_startup_trials >= 0, prefix + "n_startup_trials", "must be >= 0")
        check(self.n_warmup_steps >= 0, prefix + "n_warmup_steps", "must be >= 0")
        check(self.min_resource >= 1, prefix + "min_resource", "must be >= 1")


@dataclass
class ResumeConfig:
    """How a trial whose process died is told from a live one, and retried."""

    heartbeat_interval_s: int = 10  # each running trial writes a heartbeat this often
    grace_period_s: int = 60        # no heartbeat for this long: the trial is marked FAIL and retried
    max_retry: int = 2              # retries of one interrupted trial

    def validate(self, prefix: str = "") -> None:
        check(self.heartbeat_interval_s >= 1, prefix + "heartbeat_interval_s", "must be >= 1")
        check(self.grace_period_s > self.heartbeat_interval_s, prefix + "grace_period_s",
              f"must be larger than heartbeat_interval_s ({self.heartbeat_interval_s})")
        check(self.max_retry >= 0, prefix + "max_retry", "must be >= 0")


@dataclass
class StudyConfig:
    study_name: str = ""            # '' = the study file's stem; the Optuna study and the MLflow parent run
    base_config: str = ""           # training config (workflows/configs/...), relative to the working directory
    overrides: dict[str, Any] = field(default_factory=dict)      # dotted base-config keys for every trial
    search_space: dict[str, Any] = field(default_factory=dict)   # dotted key -> list of values or {low, high}
    objectives: dict[str, str] = field(default_factory=dict)     # metric name -> minimize | maximize
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    n_trials: int = 10              # finished (complete or pruned) trials the study ends with
    # training seeds per trial (run.seed, run.seed+1, ...: a group run, the seeds' runs under it); the
    # objectives are the means over the seeds; with a pruner, the first seed's val/loss is what is pruned on
    repeats: int = 1
    n_parallel: int = 0             # trials at once; 0 = as many as the Ray cluster's free CPUs/GPUs fit
    storage: str = ""               # '' = MVAR_OPTUNA_STORAGE, else sqlite:///out/optuna/optuna.db
    eval: dict[str, Any] = field(default_factory=dict)           # EvalConfig keys of every trial's evaluation
    resume: ResumeConfig = field(default_factory=ResumeConfig)
    poll_s: float = 5.0             # how often a running trial's val/loss is read from MLflow
    log_dir: str = "out/sweeps"     # trial logs and the report, under <log_dir>/<study_name>/

    def validate(self, prefix: str = "") -> None:
        check(bool(self.study_name) and "/" not in self.study_name, "study_name",
              f"must be a plain non-empty name, got '{self.study_name}'")
        check(bool(self.base_config), "base_config", "must name a training config (workflows/configs/...)")
        check(bool(self.search_space), "search_space", "must name at least one config key to search over")
        for key, spec in self.search_space.items():
            check_choice_spec(key, spec)
            check(key not in RESERVED_KEYS, f"search_space.{key}", "is set by the sweep for every trial")
        check(bool(self.objectives), "objectives", "must name at least one metric, e.g. {eval/fid: minimize}")
        for name, direction in self.objectives.items():
            check(name in KNOWN_METRICS, f"objectives.{name}",
                  f"no run logs this metric; known: {', '.join(KNOWN_METRICS)}")
            check(direction in DIRECTIONS, f"objectives.{name}", f"direction must be minimize or maximize, "
                                                                 f"got {direction!r}")
        check(self.pruner.name == "none" or len(self.objectives) == 1, "pruner.name",
              "Optuna prunes single-objective studies only; use pruner: {name: none} with several objectives")
        check(self.n_trials >= 1, "n_trials", "must be >= 1")
        check(self.repeats >= 1, "repeats", f"must be >= 1 (training seeds per trial), got {self.repeats}")
        check("run.repeats" not in self.overrides, "overrides.run.repeats",
              "is set by the study's own key: use `repeats: N` (training seeds per trial)")
        check(self.n_parallel >= 0, "n_parallel", "must be >= 0 (0 = what the cluster fits)")
        check(self.poll_s > 0, "poll_s", "must be > 0")
        check(not has_password(self.storage), "storage", "holds a password: study files are committed; pass "
              "the URL with --storage, MVAR_OPTUNA_STORAGE or the password in PGPASSWORD")
        if self.sampler.name == "grid":
            self._check_grid()

    def _check_grid(self) -> None:
        ranges = [k for k, v in self.search_space.items() if not isinstance(v, list)]
        check(not ranges, f"search_space.{ranges[0] if ranges else ''}", "the grid sampler needs a list of values")
        size = math.prod(len(v) for v in self.search_space.values())
        check(self.n_trials <= size, "n_trials", f"{self.n_trials} is more than the grid's {size} points")

    @property
    def directions(self) -> list[str]:
        return list(self.objectives.values())

    @property
    def needs_eval(self) -> bool:
        return any(KNOWN_METRICS[name].source == "eval" for name in self.objectives)


def check_choice_spec(key: str, spec: Any) -> None:
    """A list of scalars, or a {low, high[, log][, step]} range."""
    where = f"search_space.{key}"
    if isinstance(spec, list):
        check(len(spec) > 0, where, "is an empty list of choices")
        check(all(v is None or isinstance(v, (str, int, float, bool)) for v in spec), where,
              "choices must be plain values (numbers, strings, booleans)")
        check(len(set(map(repr, spec))) == len(spec), where, "lists a value twice")
        return
    check(isinstance(spec, dict) and {"low", "high"} <= set(spec) <= {"low", "high", "log", "step"}, where,
          f"must be a list of values or a mapping {{low, high, log, step}}, got {spec!r}")
    low, high = spec["low"], spec["high"]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high))
    check(numbers and low < high, where, f"needs numbers low < high, got low={low!r} high={high!r}")
    check(not (spec.get("log") and low <= 0), where, "a log range needs low > 0")


def range_is_int(spec: dict) -> bool:
    return all(isinstance(spec[k], int) for k in ("low", "high")) and isinstance(spec.get("step", 1), int)


def suggest(trial, space: dict[str, Any]) -> dict[str, Any]:
    """The trial's value of every search-space key (the Optuna parameter is named by the config key)."""
    params = {}
    for key, spec in space.items():
        if isinstance(spec, list):
            params[key] = trial.suggest_categorical(key, spec)
        elif range_is_int(spec):
            params[key] = trial.suggest_int(key, spec["low"], spec["high"], step=spec.get("step", 1),
                                            log=bool(spec.get("log", False)))
        else:
            params[key] = trial.suggest_float(key, spec["low"], spec["high"], step=spec.get("step"),
                                              log=bool(spec.get("log", False)))
    return params


def override(key: str, value: Any) -> str:
    """`key=value` that the config loader parses back to ``value`` (YAML: 1e-05 needs its dot, '3' its quotes)."""
    text = yaml.safe_dump(value, default_flow_style=True)
    text = text[:-len("\n...\n")] if text.endswith("\n...\n") else text.rstrip("\n")
    return f"{key}={text}"


def has_password(url: str) -> bool:
    if "://" not in url:
        return False
    from sqlalchemy.engine import make_url
    try:
        return make_url(url).password is not None
    except Exception:  # noqa: BLE001 - a malformed URL is reported when the storage is opened
        return False


def _dotted(tree: dict, prefix: str = "") -> dict:
    """{model: {depth: [..]}} -> {model.depth: [..]} (YAML or overrides may nest); a range mapping is a leaf."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and not set(value) <= {"low", "high", "log", "step"}:
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _normalise(data: dict) -> dict:
    """`sampler: grid` / `pruner: median` for mappings with only a name; dotted search-space and override keys."""
    out = dict(data)
    for key in ("sampler", "pruner"):
        if isinstance(out.get(key), str):
            out[key] = {"name": out[key]}
    for key in ("search_space", "overrides"):
        if isinstance(out.get(key), dict):
            out[key] = _dotted(out[key])
    return out


def load_study(path: str | Path, overrides: Iterable[str] = ()) -> StudyConfig:
    """The study file, then `study.`-less overrides (`n_trials=3`, `eval.num_per_class=2`); validated once."""
    data = _normalise(read_yaml(path))
    data = _normalise(merge(data, _normalise(parse_overrides(overrides))))
    data.setdefault("study_name", Path(path).stem)
    try:
        return from_dict(StudyConfig, data)
    except ConfigError as err:
        raise ConfigError(f"study file '{path}': {err}") from None
