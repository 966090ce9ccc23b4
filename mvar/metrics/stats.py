"""Statistics of an ablation: groups of training seeds, intervals and verdicts.

    key = group_key(run.params)                       # runs that differ only in the seed share it
    t = t_interval([41.5, 43.0, 42.1])                # Student t over training seeds
    b = bootstrap_interval(fid_of, features, 100, 0)  # one seed: over the samples
    d = paired_difference({0: 41.5, 1: 43.0}, {0: 42.9, 1: 44.1})
    verdict(d.low, d.high, lower_is_better=True)      # 'better' | 'worse' | 'inconclusive'

numpy and scipy only: the report and the evaluation import it without torch.
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

# keys that do not change what a run learns: identity, seeds, logging, checkpoints, runtime plumbing,
# and the evaluation (compared field by field by the report, not part of the group), also of each checkpoint
IGNORED_PREFIXES = ("tracking.", "eval.", "sampling.", "checkpoint_eval.")
IGNORED_KEYS = frozenset({
    "run.seed", "data.seed", "run.repeats", "run.name", "run.storage_path", "run.checkpoint_every",
    "run.keep_checkpoints", "run.log_every", "run.max_failures", "run.fault_nan_at_step",
    "data.eval_shards", "data.shard_opener", "data.num_workers", "data.prefetch_factor", "data.pin_memory",
    "data.verify_checksums", "data.max_bad_samples", "model.attention_backend", "train.sample_images",
    "scaling.socket_ifname", "scaling.placement_strategy", "scaling.cpus_per_worker",
})


def group_key(params: dict[str, str]) -> str:
    """``var-d4-k3-m3-600st-1a2b3c4d``: the readable part names the ablation's axes, the hash covers the
    rest of the flattened config (data.shards, tokenizer, widths, optimiser ...) but the seed."""
    kept = {k: str(v) for k, v in params.items()
            if k not in IGNORED_KEYS and not k.startswith(IGNORED_PREFIXES)}
    steps = kept.get("run.steps", "")
    epochs = kept.get("run.epochs", "")
    length = f"{steps}st" if steps not in ("", "0") else (f"{epochs}ep" if epochs else "")
    parts = [kept.get("model.attention", "run"),
             *(f"{tag}{kept[key]}" for tag, key in (("d", "model.depth"), ("k", "model.window_size"),
                                                    ("m", "model.markov_from_scale")) if kept.get(key)),
             length]
    digest = hashlib.sha1(json.dumps(kept, sort_keys=True).encode()).hexdigest()[:8]
    return "-".join(p for p in parts if p) + "-" + digest


class TInterval(NamedTuple):
    mean: float
    std: float    # sample standard deviation (ddof=1); nan with one value
    n: int
    low: float    # nan with one value: the caller falls back (a bootstrap) and labels it
    high: float


def t_interval(values: Sequence[float], level: float = 0.95) -> TInterval:
    """Mean and the Student t interval over ``values`` (one per training seed)."""
    from scipy import stats
    x = np.asarray([float(v) for v in values], dtype=np.float64)
    if x.size == 0:
        raise ValueError("t_interval needs at least one value")
    mean = float(x.mean())
    if x.size == 1:
        return TInterval(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1)) * std / math.sqrt(x.size)
    return TInterval(mean, std, int(x.size), mean - half, mean + half)


class Bootstrap(NamedTuple):
    std: float
    low: float
    high: float


def bootstrap_interval(stat_fn: Callable[..., float], data, resamples: int, seed: int = 0,
                       level: float = 0.95, basic: bool = False, floor: float | None = None) -> Bootstrap:
    """Percentile bootstrap of ``stat_fn(*data)`` over the rows (samples) of ``data``: an array, or a tuple of
    arrays resampled together (features and labels). ``basic``: the reverse-percentile ('basic') interval
    [2t - q_high, 2t - q_low] around the estimate t, for a statistic that resampling biases (FID: drawn with
    replacement, duplicates shrink the sample's spread and raise it; the percentile interval of the real
    images' FID then lies above the estimate), bounded below by ``floor``."""
    arrays = data if isinstance(data, tuple) else (data,)
    n = len(arrays[0])
    if resamples < 1 or n < 2:
        return Bootstrap(math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = np.empty(resamples, dtype=np.float64)
    for i in range(resamples):
        idx = rng.integers(0, n, n)
        values[i] = stat_fn(*(a[idx] for a in arrays))
    alpha = (1 - level) / 2
    low, high = np.percentile(values, [100 * alpha, 100 * (1 - alpha)])
    if basic:
        t = float(stat_fn(*arrays))
        low, high = 2 * t - high, 2 * t - low
        if floor is not None:
            low, high = max(low, floor), max(high, floor)
    return Bootstrap(float(values.std(ddof=1)) if resamples > 1 else math.nan, float(low), float(high))


class Difference(NamedTuple):
    mean: float   # a - b
    low: float
    high: float
    n: int        # pairs (paired), else the smaller group's size
    method: str   # 'paired' (same seeds) or 'welch' (seeds differ: unpaired, unequal variances)


def paired_difference(a_by_seed: dict, b_by_seed: dict, level: float = 0.95) -> Difference:
    """``a - b`` with its t interval: over the per-seed differences when both hold the same seeds, else
    Welch's unpaired interval (labelled 'welch'); nan bounds when there are too few values."""
    from scipy import stats
    if set(a_by_seed) == set(b_by_seed):
        seeds = sorted(a_by_seed, key=str)
        diffs = [float(a_by_seed[s]) - float(b_by_seed[s]) for s in seeds]
        t = t_interval(diffs, level)
        return Difference(t.mean, t.low, t.high, t.n, "paired")
    a = np.asarray([float(v) for v in a_by_seed.values()])
    b = np.asarray([float(v) for v in b_by_seed.values()])
    mean = float(a.mean() - b.mean()) if a.size and b.size else math.nan
    n = int(min(a.size, b.size))
    if n < 2:
        return Difference(mean, math.nan, math.nan, n, "welch")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(mean, mean, mean, n, "welch")
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    half = float(stats.t.ppf(0.5 + level / 2, df)) * se
    return Difference(mean, mean - half, mean + half, n, "welch")


def verdict(low: float, high: float, lower_is_better: bool) -> str:
    """Of ``a - b``'s interval: 'better' / 'worse' for a, 'inconclusive' when it holds 0 (or is unknown)."""
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "inconclusive"
    a_lower = high < 0
    return "better" if a_lower == lower_is_better else "worse"
