"""mvar.metrics.stats against scipy.stats on fixed inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from mvar.metrics.stats import bootstrap_interval, group_key, paired_difference, t_interval, verdict

FIDS = [41.5, 43.5, 42.9, 40.8]


def test_t_interval_matches_scipy():
    t = t_interval(FIDS)
    x = np.asarray(FIDS)
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert t.n == 4 and t.mean == pytest.approx(x.mean())
    assert t.std == pytest.approx(x.std(ddof=1))
    assert (t.low, t.high) == pytest.approx((low, high))
    # by hand: mean +- t_{0.975, 3} s / sqrt(n)
    half = stats.t.ppf(0.975, 3) * x.std(ddof=1) / 2
    assert t.high - t.mean == pytest.approx(half)
    wider = t_interval(FIDS, level=0.99)
    assert wider.low < t.low and wider.high > t.high


def test_t_interval_of_one_seed_is_flagged():
    t = t_interval([41.5])
    assert t.n == 1 and t.mean == 41.5
    assert math.isnan(t.std) and math.isnan(t.low) and math.isnan(t.high)
    with pytest.raises(ValueError):
        t_interval([])


def test_bootstrap_is_the_percentile_of_the_resampled_statistic():
    x = np.random.default_rng(3).normal(10.0, 2.0, 50)
    b = bootstrap_interval(np.mean, x, resamples=200, seed=7)
    rng = np.random.default_rng(7)
    by_hand = np.array([x[rng.integers(0, 50, 50)].mean() for _ in range(200)])
    assert (b.low, b.high) == pytest.approx(tuple(np.percentile(by_hand, [2.5, 97.5])))
    assert b.std == pytest.approx(by_hand.std(ddof=1))
    # and close to scipy's percentile bootstrap of the same statistic (other draws)
    ref = stats.bootstrap((x,), np.mean, n_resamples=2000, method="percentile", random_state=1)
    assert b.low == pytest.approx(ref.confidence_interval.low, abs=0.15)
    assert b.high == pytest.approx(ref.confidence_interval.high, abs=0.15)
    assert b.low < x.mean() < b.high


def test_the_basic_bootstrap_reflects_the_percentiles_about_the_estimate():
    x = np.random.default_rng(3).normal(10.0, 2.0, 50)
    stat = lambda a: float(np.var(a))  # noqa: E731 - resampling biases it, as it does FID
    p = bootstrap_interval(stat, x, resamples=300, seed=7)
    b = bootstrap_interval(stat, x, resamples=300, seed=7, basic=True)
    t = stat(x)
    assert (b.low, b.high) == pytest.approx((2 * t - p.high, 2 * t - p.low)) and b.std == p.std
    ref = stats.bootstrap((x,), stat, n_resamples=3000, method="basic", random_state=1, vectorized=False)
    assert b.low == pytest.approx(ref.confidence_interval.low, rel=0.1)
    assert b.high == pytest.approx(ref.confidence_interval.high, rel=0.1)
    assert b.low < t < b.high
    floored = bootstrap_interval(lambda a: float(np.mean(a)), x - 10, resamples=300, seed=7, basic=True, floor=0.0)
    assert floored.low >= 0.0


def test_bootstrap_resamples_paired_arrays_together():
    labels = np.arange(40) % 4
    predicted = labels.copy()
    predicted[:10] = (predicted[:10] + 1) % 4  # 75 % right
    b = bootstrap_interval(lambda p, y: float((p == y).mean()), (predicted, labels), resamples=100, seed=0)
    assert 0.5 < b.low < 0.75 < b.high <= 1.0
    assert math.isnan(bootstrap_interval(np.mean, np.ones(5), resamples=0).low)


def test_paired_difference_matches_ttest_rel():
    a = {0: 41.5, 1: 43.5, 2: 42.9}
    b = {2: 44.0, 0: 42.0, 1: 45.1}
    d = paired_difference(a, b)
    ci = stats.ttest_rel([a[s] for s in (0, 1, 2)], [b[s] for s in (0, 1, 2)]).confidence_interval()
    assert d.method == "paired" and d.n == 3
    assert d.mean == pytest.approx(np.mean([a[s] - b[s] for s in a]))
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))


def test_seeds_that_do_not_match_fall_back_to_welch():
    a = {0: 41.5, 1: 43.5, 2: 42.9}
    b = {3: 44.0, 4: 42.0}
    d = paired_difference(a, b)
    ci = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval()
    assert d.method == "welch"
    assert (d.low, d.high) == pytest.approx((ci.low, ci.high))
    assert math.isnan(paired_difference({0: 1.0}, {1: 2.0}).low)


def test_a_gap_smaller_than_the_noise_is_inconclusive_a_clear_one_is_not():
    rng = np.random.default_rng(0)
    seeds = range(4)
    base = {s: 40 + rng.normal(0, 2) for s in seeds}
    close = {s: base[s] + 0.3 + rng.normal(0, 2) for s in seeds}    # 0.3 apart, noise 2
    far = {s: base[s] - 8 + rng.normal(0, 0.5) for s in seeds}      # 8 lower, noise 0.5
    d = paired_difference(close, base)
    assert d.low < 0 < d.high
    assert verdict(d.low, d.high, lower_is_better=True) == "inconclusive"
    d = paired_difference(far, base)
    assert verdict(d.low, d.high, lower_is_better=True) == "better"   # FID: lower is better
    assert verdict(d.low, d.high, lower_is_better=False) == "worse"   # e.g. IS
    d = paired_difference(base, far)
    assert verdict(d.low, d.high, lower_is_better=True) == "worse"
    assert verdict(math.nan, math.nan, True) == "inconclusive"


PARAMS = {"model.attention": "var", "model.depth": "4", "model.window_size": "3", "model.markov_from_scale": "3",
          "run.steps": "600", "data.shards": "out/shards", "tokenizer": "out/tok", "model.embed_dim": "None",
          "run.seed": "0", "run.name": "var-s0", "optim.base_lr": "0.0001", "tracking.parent_run_id": ""}


def test_group_key_ignores_the_seed_and_nothing_that_matters():
    key = group_key(PARAMS)
    assert key.startswith("var-d4-k3-m3-600st-") and len(key.rsplit("-", 1)[1]) == 8
    assert group_key({**PARAMS, "run.seed": "1", "run.name": "var-s1", "tracking.parent_run_id": "abc"}) == key
    for changed in ({"data.shards": "other"}, {"tokenizer": "other"}, {"model.embed_dim": "128"},
                    {"optim.base_lr": "0.001"}, {"model.attention": "mvar"}):
        assert group_key({**PARAMS, **changed}) != key, changed
