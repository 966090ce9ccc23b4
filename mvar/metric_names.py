"""The metric names: one entry per metric that runs log and the report or a sweep reads.

``sweeps.study.KNOWN_METRICS`` (what a study may optimise, and where a trial reads it) and
``mvar.report.COLUMNS`` / ``RAW_COLUMNS`` (the ablation table) are read off this list, so adding a
metric is one entry here, plus the code that logs it (docs/architecture.md, "Adding a metric").
"""
from __future__ import annotations

from dataclasses import dataclass

SOURCES = ("eval", "train")
AGGREGATES = ("last", "max", "median")


@dataclass(frozen=True)
class MetricName:
    """A metric: its MLflow key, its direction, where a sweep trial reads it and its report column."""

    key: str                      # the MLflow metric key
    lower_is_better: bool
    source: str = ""              # eval: the final checkpoint's evaluation; train: the training run; '' = no objective
    aggregate: str = "last"       # train metrics: last | max | median over the run's history
    column: str = ""              # its column in `mvar report` ('' = none)
    ratio: bool = True            # the column is followed by its `x VAR` ratio and verdict

    @property
    def direction(self) -> str:
        """Optuna's word for the usual direction."""
        return "minimize" if self.lower_is_better else "maximize"


# In the report's column order; the names of docs/training.md and docs/evaluation.md (training: mvar/training/; evaluation: mvar/evaluation/).
METRICS: tuple[MetricName, ...] = (
    MetricName("infer/latency_s", True, "eval", column="infer s/batch"),
    MetricName("model/attn_gflops", True, "train", "last", column="attn GFLOPs"),
    MetricName("infer/kv_cache_mb", True, "eval", column="KV cache MB"),
    MetricName("infer/peak_mem_mb", True, "eval", column="infer mem MB"),
    # like-for-like: seconds to train every scale once (an MVAR cycle trains a slice of them per step)
    MetricName("train/pyramid_s", True, column="train s/pyramid"),
    MetricName("perf/peak_mem_mb", True, "train", "max", column="train mem MB"),  # deprecated alias of the two below
    MetricName("eval/fid", True, "eval", column="FID"),
    MetricName("eval/kid", True, "eval", column="KID"),
    MetricName("eval/is", False, "eval", column="IS"),
    MetricName("eval/precision", False, "eval", column="precision"),
    MetricName("eval/recall", False, "eval", column="recall"),
    MetricName("eval/class_acc", False, column="class acc"),  # with a classifier feature extractor only
    MetricName("cost/device_hours", True, "train", "last", column="device h"),  # wall hours x devices, cumulative
    # seconds per optimizer step as logged: no ratio (an MVAR step covers fewer scales than a VAR step)
    MetricName("perf/step_s", True, "train", "median", column="train s/it (raw)", ratio=False),
    MetricName("infer/images_per_s", False, "eval"),
    MetricName("val/loss", True, "train", "last"),
    MetricName("train/loss", True, "train", "last"),
    MetricName("train/acc", False, "train", "last"),
    MetricName("perf/images_per_s", False, "train", "median"),
    MetricName("model/params_m", True, "train", "last"),
    MetricName("perf/peak_cuda_mb", True, "train", "max"),   # CUDA max allocated (GPU workers)
    MetricName("perf/peak_rss_mb", True, "train", "max"),    # peak resident set (CPU workers)
)
BY_KEY: dict[str, MetricName] = {m.key: m for m in METRICS}


def objectives() -> dict[str, MetricName]:
    """Key -> entry of every metric a sweep may optimise (it has a source)."""
    return {m.key: m for m in METRICS if m.source}


def report_columns(ratio: bool) -> list[tuple[str, str, bool]]:
    """(column, MLflow key, lower is better?) of the report's columns with (``ratio``) or without an `x VAR` ratio."""
    return [(m.column, m.key, m.lower_is_better) for m in METRICS if m.column and m.ratio == ratio]
