"""`mvar report --experiment NAME`: the ablation table of an MLflow experiment, with intervals and verdicts
against VAR.

One row per group of training runs that differ only in their seed (tag `mvar.group`, else
`mvar.metrics.stats.group_key` of the run's params): training runs, evaluation runs of checkpoints
that were not trained here (a row each), a sweep's trials; evaluation child runs, sweep parents and
group runs (tag `mvar.group_run=true`) are no rows. Per group and metric: the mean over seeds with a
95 % Student t interval; a group of one seed shows the bootstrap interval over its samples
(`eval/*_boot_low|high`), labelled `bootstrap`. Columns are the paper's (inference time, attention
GFLOPs, KV cache, inference memory, train seconds per full pyramid, train memory, FID, KID, IS,
precision, recall, class accuracy, training device-hours), each followed by its ratio of means to the VAR group
of the same depth and a verdict from the paired difference over the seeds both share: `better`, `worse` or
`inconclusive` (the interval holds 0). Runs that a group or a comparison would mix (another data
set, tokenizer, reference, sample count, guidance or feature extractor) are refused, naming both.
Written as Markdown, CSV, HTML (and LaTeX with ``--latex``) with three plots (FID vs window size,
inference memory vs depth per variant, the FID / memory Pareto front) with error bars; logged as the
artifacts of a report run (tag `mvar.report`), the table also with MLflow's ``log_table``; each
group's aggregates (`<metric>_mean|_std|_n|_ci95_low|_ci95_high`, tag `mvar.interval`) go into its
group run, made when there is none.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from mvar.errors import UserError
from mvar.metric_names import report_columns
from mvar.metrics.stats import group_key, paired_difference, t_interval, verdict
from mvar.models.patterns import PATTERNS, pattern_info

# (column, MLflow metric, lower is better?), from the metric registry: each of COLUMNS is followed by its `x VAR`
# column; RAW_COLUMNS have no ratio (seconds per optimizer step: an MVAR step covers fewer scales than a VAR step)
COLUMNS = report_columns(ratio=True)
RAW_COLUMNS = report_columns(ratio=False)
# runs tagged `mvar.reference_row` (real, untrained) frame the variants: listed first, never a baseline
REFERENCE_TAG = "mvar.reference_row"
BUDGET_TAG = "mvar.budget"  # what an ablation held equal across its variants: pyramids | steps | tokens | seconds
GROUP_TAG, GROUP_RUN_TAG, INTERVAL_TAG, SEED_TAG = "mvar.group", "mvar.group_run", "mvar.interval", "mvar.seed"
VARIANT_ORDER = {variant: i for i, variant in enumerate(PATTERNS)}
# what members of a group, and compared rows, must share: (field, params or tags); missing on one side = unknown
DATA_FIELDS = [("data.shards", "params"), ("tokenizer", "params")]
EVAL_FIELDS = [("eval.reference", "params"), ("eval.num_samples", "params"), ("eval.num_per_class", "params"),
               ("eval.cfg", "params"), ("mvar.feature_extractor", "tags"), ("mvar.feature_extractor_sha256", "tags")]
# eval.feature_extractor values and torch-fidelity's names of the same extractors (the quickstart's real row
# is tagged with the former)
EXTRACTOR_NAMES = {"inception": "inception-v3-compat", "classifier": "mvar-classifier"}


@dataclass
class Report:
    rows: list[dict]
    markdown: str
    files: list[Path]


@dataclass
class Group:
    """Runs of one config but the seed: ``members`` one per seed (the latest finished run of each)."""

    key: str
    reference: str
    members: list = field(default_factory=list)   # RunRecord
    group_run: object = None                        # RunRecord of the group run, if any

    def values(self, metric: str) -> dict[str, float]:
        return {seed_of(r): r.metrics[metric] for r in self.members if metric in r.metrics}


def seed_of(run) -> str:
    """The training seed (tag, else param run.seed); a run without one pairs with nothing."""
    return run.tags.get(SEED_TAG) or run.params.get("run.seed") or f"run:{run.run_id}"


def field_value(run, name: str, where: str) -> str:
    value = (run.params if where == "params" else run.tags).get(name, "")
    return EXTRACTOR_NAMES.get(value, value) if name == "mvar.feature_extractor" else value


def run_group(run) -> str:
    """A reference row or a run without a model config (an evaluation of a foreign checkpoint) is a group alone."""
    if run.tags.get(REFERENCE_TAG):
        return f"{run.tags[REFERENCE_TAG]}:{run.run_id}"
    if run.tags.get(GROUP_TAG):
        return run.tags[GROUP_TAG]
    if "model.attention" not in run.params and "model.depth" not in run.params:
        return f"run:{run.run_id}"
    return group_key(run.params)


def search(experiment: str, uri: str = "", where: str = "", study: str = ""):
    """The experiment's runs, narrowed by an MLflow search filter and / or the study tag (group runs stay: they
    hold the aggregates of the groups that are left)."""
    from mvar.tracking import Store
    store = Store(uri)
    runs = store.runs(experiment)
    query = " and ".join(q for q in (where, f"tags.`mvar.study` = '{study}'" if study else "") if q)
    if not query:
        return runs
    try:
        kept = {r.info.run_id for r in store.client.search_runs([store.experiment_id(experiment, create=False)],
                                                                 filter_string=query, max_results=5000)}
    except Exception as err:  # noqa: BLE001 - MLflow's parser says what is wrong with the filter
        raise UserError(f"--filter: MLflow cannot search runs with {query!r}: {str(err).splitlines()[0][:300]}") \
            from None
    return [r for r in runs if r.run_id in kept or r.tags.get(GROUP_RUN_TAG) == "true"]


def groups_of(runs) -> list[Group]:
    """Rows of the report: the table's runs grouped by everything but the seed; group runs attached."""
    from mvar.tracking import PARENT_TAG
    groups: dict[str, Group] = {}
    group_runs = {}
    for run in sorted(runs, key=lambda r: r.start_time):
        tags = run.tags
        if tags.get(GROUP_RUN_TAG) == "true":
            group_runs.setdefault(tags.get(GROUP_TAG, ""), run)
            continue
        reference = tags.get(REFERENCE_TAG, "")
        nested_eval = PARENT_TAG in tags and "mvar.run_key" not in tags  # a sweep's trials are nested training runs
        if ("mvar.variant" not in tags and not reference) or nested_eval or tags.get("mvar.report"):
            continue
        key = run_group(run)
        g = groups.setdefault(key, Group(key, reference))
        same_seed = [m for m in g.members if seed_of(m) == seed_of(run)]
        if same_seed and same_seed[0].status == "FINISHED" and run.status != "FINISHED":
            continue  # an earlier finished run of this seed beats a newer failed one
        g.members = [m for m in g.members if m not in same_seed] + [run]
    for key, g in groups.items():
        g.group_run = group_runs.get(key)
        check_members(g)
    return list(groups.values())


def check_members(g: Group) -> None:
    """Members of a group are averaged: they must share data, tokenizer and evaluation."""
    for name, where in DATA_FIELDS + EVAL_FIELDS:
        first = None
        for run in g.members:
            value = field_value(run, name, where)
            if not value:
                continue
            if first is None:
                first = (run, value)
            elif value != first[1]:
                raise UserError(f"runs '{first[0].name}' and '{run.name}' of group {g.key} disagree in {name} "
                                f"('{first[1]}' vs '{value}'): one group must not mix them")


def check_comparable(a: Group, b: Group) -> None:
    """``a`` is set against ``b`` (its VAR baseline): same data, tokenizer and evaluation, where both say."""
    for name, where in DATA_FIELDS + EVAL_FIELDS:
        va = next((v for v in (field_value(r, name, where) for r in a.members) if v), "")
        vb = next((v for v in (field_value(r, name, where) for r in b.members) if v), "")
        if va and vb and va != vb:
            raise UserError(f"runs '{a.members[0].name}' and '{b.members[0].name}' are compared (x VAR) but "
                            f"disagree in {name} ('{va}' vs '{vb}'); evaluate them alike or leave one out "
                            f"(--filter)")


def _depth(g: Group) -> int:
    run = g.members[0]
    depth = run.params.get("model.depth") or _depth_of(run.tags.get("mvar.size", ""))
    return int(depth) if depth else 0


def _depth_of(size: str) -> str:
    return size[1:] if size.startswith("d") and size[1:].isdigit() else ""


def summarize(g: Group) -> dict:
    """The row of a group: identity columns, then per column the mean, std, n and the interval."""
    first = g.members[0]
    window = first.params.get("model.window_size")
    n = len(g.members)
    name = first.name if n == 1 else (g.group_run.name if g.group_run else g.key)
    statuses = {r.status for r in g.members}
    row = {"run": name, "run_id": ",".join(r.run_id for r in g.members), "group": g.key, "reference": g.reference,
           "status": "FINISHED" if statuses == {"FINISHED"} else sorted(statuses - {"FINISHED"})[0],
           "finished": "FINISHED" in statuses, "variant": g.reference or first.tags["mvar.variant"],
           "depth": _depth(g), "window": int(window) if window else 0, "seeds": n,
           "comparable": first.tags.get("mvar.metrics_comparable", ""), "start": min(r.start_time for r in g.members),
           "extractor": field_value(first, "mvar.feature_extractor", "tags"), "_group": g,
           "budget": first.tags.get(BUDGET_TAG, "")}
    for col, key, _ in COLUMNS + RAW_COLUMNS:
        row.update(metric_cells(col, key, g))
    kinds = {row[f"{col} interval"] for col, _, _ in COLUMNS if row[f"{col} interval"]}
    row["interval"] = "t" if n > 1 else ("bootstrap" if "bootstrap" in kinds else "")
    return row


def metric_cells(col: str, key: str, g: Group) -> dict:
    """``col``: the mean; ``col std|n|low|high|interval``: t over seeds, or one seed's bootstrap over samples."""
    values = list(g.values(key).values())
    if not values:
        return {col: None, f"{col} std": None, f"{col} n": 0, f"{col} low": None, f"{col} high": None,
                f"{col} interval": ""}
    t = t_interval(values)
    cells = {col: t.mean, f"{col} std": _num(t.std), f"{col} n": t.n, f"{col} low": _num(t.low),
             f"{col} high": _num(t.high), f"{col} interval": "t" if t.n > 1 else ""}
    if t.n == 1:
        m = next(r.metrics for r in g.members if key in r.metrics)
        if f"{key}_boot_low" in m and f"{key}_boot_high" in m:
            cells.update({f"{col} std": _num(m.get(f"{key}_boot_std", math.nan)),
                          f"{col} low": _num(m[f"{key}_boot_low"]), f"{col} high": _num(m[f"{key}_boot_high"]),
                          f"{col} interval": "bootstrap"})
    return cells


def _num(v):
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def collect(experiment: str, uri: str = "", where: str = "", study: str = "") -> list[dict]:
    """Rows of the experiment's groups, references first, then by depth, variant and window."""
    rows = [summarize(g) for g in groups_of(search(experiment, uri, where, study))]
    rows.sort(key=lambda r: (not r["reference"], r["depth"], VARIANT_ORDER.get(r["variant"], 9), r["window"],
                             r["start"]))
    return rows


def baseline_for(row: dict, baselines: list[dict]) -> dict | None:
    """The VAR group a row is set against: same depth, and among those the one trained alike (steps, data,
    tokenizer), the latest first; a reference row of no known depth (the real images) takes the only one."""
    same = [b for b in baselines if b["depth"] == row["depth"]]
    if not same and row.get("reference") and len({b["depth"] for b in baselines}) == 1:
        same = baselines
    if not same:
        return None
    run = row["_group"].members[0]

    def alike(b: dict) -> int:
        other = b["_group"].members[0]
        return sum(run.params.get(k) == other.params.get(k) for k in ("run.steps", "data.shards", "tokenizer"))

    return max(same, key=lambda b: (alike(b), b["start"]))


def add_ratios(rows: list[dict]) -> None:
    """`<col> x VAR`: this group's mean over the VAR baseline's mean; `<col> x VAR verdict` from the paired
    difference over the seeds both have (Welch's unpaired interval when the seeds differ)."""
    baselines = [r for r in rows if r["variant"] == "var" and r["finished"] and not r.get("reference")]
    for r in rows:
        base = baseline_for(r, baselines)
        if base is not None and base is not r:
            check_comparable(r["_group"], base["_group"])
        for col, key, lower_is_better in COLUMNS:
            v, b = r.get(col), base.get(col) if base else None
            r[f"{col} x VAR"] = v / b if v is not None and b not in (None, 0) else None
            r[f"{col} x VAR verdict"] = r[f"{col} x VAR method"] = ""
            if v is None or b is None or base is r or r.get("reference"):
                continue
            d = paired_difference(r["_group"].values(key), base["_group"].values(key))
            r[f"{col} x VAR verdict"] = verdict(d.low, d.high, lower_is_better)
            r[f"{col} x VAR method"] = f"{d.method} n={d.n}"


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table_columns() -> list[str]:
    """Identity, then each column and its `x VAR` ratio, then the raw per-step seconds and the seed count."""
    cols = ["run", "variant", "depth", "window"]
    for col, _, _ in COLUMNS:
        cols += [col, f"{col} x VAR"]
    return cols + [col for col, _, _ in RAW_COLUMNS] + ["seeds"]


def value_cell(r: dict, col: str) -> str:
    """``41.5 ± 1.2`` (t over seeds), ``41.5 [39.8, 43.6]`` (one seed's bootstrap, asymmetric), else the value."""
    mean, low, high = r.get(col), r.get(f"{col} low"), r.get(f"{col} high")
    if mean is None or low is None or high is None:
        return _fmt(mean)
    if r.get(f"{col} interval") == "t":
        return f"{_fmt(mean)} ± {_fmt((high - low) / 2)}"
    return f"{_fmt(mean)} [{_fmt(low)}, {_fmt(high)}]"


def ratio_cell(r: dict, col: str) -> str:
    ratio, word = r.get(f"{col} x VAR"), r.get(f"{col} x VAR verdict")
    return f"{_fmt(ratio)} ({word})" if ratio is not None and word else _fmt(ratio)


def display_frame(rows: list[dict]):
    """The table as strings (what Markdown, HTML and LaTeX show): mean ± interval, ratio (verdict)."""
    import pandas as pd
    ratio_cols = {f"{col} x VAR": col for col, _, _ in COLUMNS}
    value_cols = {col for col, _, _ in COLUMNS + RAW_COLUMNS}
    data = []
    for r in rows:
        cells = {}
        for c in table_columns():
            if c in ratio_cols:
                cells[c] = ratio_cell(r, ratio_cols[c])
            elif c in value_cols:
                cells[c] = value_cell(r, c)
            elif c == "seeds":
                cells[c] = f"{r['seeds']} ({r['interval']})" if r.get("interval") else str(r["seeds"])
            else:
                cells[c] = _fmt(r.get(c))
        data.append(cells)
    return pd.DataFrame(data, columns=table_columns())


def numeric_frame(rows: list[dict]):
    """The table as numbers (the CSV): means, ratios, and per column its interval, n and verdict."""
    import pandas as pd
    cols = table_columns()
    for col, _, _ in COLUMNS:
        cols += [f"{col} low", f"{col} high", f"{col} std", f"{col} n", f"{col} interval", f"{col} x VAR verdict",
                 f"{col} x VAR method"]
    cols += ["group", "interval", "run_id", "status", "comparable"]
    return pd.DataFrame([{c: _cell(r.get(c)) for c in cols} for r in rows], columns=cols)


NOTES = {"classifier": "FID/IS/precision/recall/class acc computed with a classifier of the training split "
                       "(mvar.feature_extractor=classifier): not comparable with Inception numbers.",
         "standin": "FID/IS/precision/recall computed with stand-in feature-extractor weights: "
                    "not comparable with published numbers.",
         "stats": "Values: mean ± half the 95 % Student t interval over training seeds; with one seed "
                  "[low, high] is a bootstrap over the generated samples (seeds column: t / bootstrap). "
                  "x VAR: ratio of means to the VAR group of the same depth, (verdict) from the paired "
                  "difference over shared seeds: inconclusive when its 95 % interval holds 0."}


BUDGETS = {"pyramids": "equal full pyramids (every scale trained as often in each variant; the Markov variants "
                       "packed, one pyramid a step)",
           "steps": "equal optimizer steps (under the 8:1:1 cycle most MVAR steps train only the small scales: "
                    "fewer tokens than VAR's)",
           "tokens": "equal tokens trained", "seconds": "equal training seconds"}


def budget_note(rows: list[dict]) -> str:
    """What the compared runs held equal (tag mvar.budget); not stated, or mixed, is said as such."""
    stated = {r.get("budget", "") for r in rows if not r["reference"]}
    if stated == {""} or not stated:
        return ("Budget held equal: not stated (no mvar.budget tag); runs of equal run.steps trained equal "
                "optimizer steps, which is not equal work for a cycled schedule: compare train s/pyramid.")
    if len(stated) > 1:
        return "Budget held equal: MIXED (" + ", ".join(sorted(b or "not stated" for b in stated)) + \
               "): the rows were not trained on one budget."
    b = stated.pop()
    return f"Budget held equal: {BUDGETS.get(b, b)}."


def notes(rows: list[dict]) -> list[str]:
    out = [NOTES["stats"], budget_note(rows)]
    if any(r.get("extractor") == EXTRACTOR_NAMES["classifier"] for r in rows):
        out.append(NOTES["classifier"])
    elif any(r["comparable"] == "false" for r in rows):
        out.append(NOTES["standin"])
    return out


def to_markdown(rows: list[dict]) -> str:
    table = display_frame(rows).to_markdown(index=False)
    return table + "\n" + "".join(f"\n{n}\n" for n in notes(rows))


def to_latex(rows: list[dict]) -> str:
    """A booktabs tabular (pandas' Styler: needs jinja2), the cells escaped for LaTeX."""
    text = display_frame(rows).to_latex(index=False, escape=True)
    return text.replace("±", "$\\pm$")


def write_tables(rows: list[dict], out: Path, latex: bool = False) -> list[Path]:
    numeric_frame(rows).to_csv(out / "ablation.csv", index=False)
    (out / "ablation.md").write_text(to_markdown(rows))
    table = display_frame(rows).to_html(index=False, escape=True, border=1)
    body = "".join(f"<p>{_html(n)}</p>" for n in notes(rows))
    (out / "ablation.html").write_text(f"<html><head><meta charset='utf-8'><title>MVAR ablation</title></head>"
                                       f"<body>{table}{body}</body></html>\n")
    files = [out / "ablation.md", out / "ablation.csv", out / "ablation.html"]
    if latex:
        (out / "ablation.tex").write_text(to_latex(rows))
        files.append(out / "ablation.tex")
    return files


def _html(text: str) -> str:
    import html
    return html.escape(text)


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when both coordinates are minimised, sorted by the first."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple]],
          line: list[tuple[float, float]] | None = None) -> Path:
    """``series``: name -> points (x, y, x interval, y interval), an interval (low, high) or None; drawn as
    error bars."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in series.items():
        if pts:
            pts = sorted(pts, key=lambda p: (p[0], p[1]))
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            ax.errorbar(xs, ys, xerr=_bars(pts, 0, 2), yerr=_bars(pts, 1, 3), fmt="o-" if len(pts) > 1 else "o",
                        capsize=3, label=name)
    if line:
        xs, ys = zip(*line)
        ax.plot(xs, ys, "k--", label="Pareto front")
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if any(series.values()):
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _bars(pts: list[tuple], value: int, interval: int):
    """matplotlib's asymmetric error bars (2, N) of the points' intervals; None when no point has one."""
    if not any(p[interval] for p in pts):
        return None
    return [[p[value] - p[interval][0] if p[interval] else 0 for p in pts],
            [p[interval][1] - p[value] if p[interval] else 0 for p in pts]]


def interval(r: dict, col: str) -> tuple[float, float] | None:
    low, high = r.get(f"{col} low"), r.get(f"{col} high")
    return (low, high) if low is not None and high is not None else None


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    has = [r for r in rows if r.get("FID") is not None]
    mem = "infer mem MB"

    def point(r: dict, xcol: str | None, ycol: str, x=None) -> tuple:
        return (r[xcol] if xcol else x, r[ycol], interval(r, xcol) if xcol else None, interval(r, ycol))

    windowed = [v for v in PATTERNS if pattern_info(v).windowed]  # the patterns with a window size k
    fid_k = {f"{v} d{d}": [point(r, None, "FID", r["window"]) for r in has if r["variant"] == v and r["depth"] == d]
             for v in windowed for d in sorted({r["depth"] for r in has})}
    mem_depth = {v: [point(r, None, mem, r["depth"]) for r in rows if r["variant"] == v and r.get(mem) is not None]
                 for v in VARIANT_ORDER}
    pts = {v: [point(r, mem, "FID") for r in has if r["variant"] == v and r.get(mem) is not None]
           for v in VARIANT_ORDER}
    front = pareto([(p[0], p[1]) for v in pts.values() for p in v])
    return [_plot(out / "fid_vs_window.png", "FID vs window size k", "k", "FID", fid_k),
            _plot(out / "memory_vs_depth.png", "Inference memory vs depth", "depth", "peak MB", mem_depth),
            _plot(out / "pareto_fid_memory.png", "FID vs inference memory", "peak MB", "FID", pts, front)]


def class_grid(images_labels, classes: list[int], per_class: int, gap: int = 2):
    """(H, W, 3) uint8: a row per class of ``classes`` holding its first ``per_class`` images of
    ``images_labels`` ((HWC uint8 image, label) pairs); a missing image stays white."""
    import numpy as np
    picked: dict[int, list] = {c: [] for c in classes}
    for image, label in images_labels:
        if int(label) in picked and len(picked[int(label)]) < per_class:
            picked[int(label)].append(image)
        if all(len(v) == per_class for v in picked.values()):
            break
    h, w = next(im for v in picked.values() for im in v).shape[:2]
    grid = np.full((len(classes) * (h + gap) - gap, per_class * (w + gap) - gap, 3), 255, np.uint8)
    for r, c in enumerate(classes):
        for i, image in enumerate(picked[c]):
            grid[r * (h + gap):r * (h + gap) + h, i * (w + gap):i * (w + gap) + w] = image[..., :3]
    return grid


def write_picture(panels: list[tuple[str, object]], path: Path, row_labels: list[str] = ()) -> Path:
    """The panels (title, HWC uint8 grid) side by side in one PNG; ``row_labels`` name the rows (classes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    h, w = panels[0][1].shape[:2]
    fig, axes = plt.subplots(1, len(panels), figsize=(len(panels) * 2.2 * w / h + 0.8, 2.2 * 1.15 + 0.4),
                             squeeze=False)
    for i, (ax, (title, grid)) in enumerate(zip(axes[0], panels)):
        ax.imshow(grid, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        rows = len(row_labels)
        ax.set_yticks([(r + 0.5) * grid.shape[0] / rows for r in range(rows)] if i == 0 and rows else [])
        if i == 0 and rows:
            ax.set_yticklabels(row_labels, fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


TABLE_FILE = "report/ablation_table.json"   # the table as MLflow's log_table stores it


def log_report(experiment: str, uri: str, files: list[Path], rows: list[dict] = ()) -> str:
    """A report run: the files as artifacts, and the table (one row per group, the same columns) with
    ``log_table``, which MLflow's artifact view shows as a table."""
    from mvar import tracking
    from mvar.tracking import MlflowTracker, TrackingConfig
    cfg = TrackingConfig(uri=uri, experiment=experiment, system_metrics=False)
    run_id = tracking.start_run(cfg, "ablation-report", tags={"mvar.report": "true"})
    t = MlflowTracker(run_id, cfg)
    for f in files:
        t.log_artifact(f, "report")
    if rows:
        t.log_table({c: [_cell(r.get(c)) for r in rows] for c in table_columns()}, TABLE_FILE)
    t.close()
    return run_id


def aggregates(r: dict) -> dict[str, float]:
    """The group's metrics for its group run: ``<metric>_mean|_std|_n|_ci95_low|_ci95_high`` ('/' -> '_')."""
    out = {}
    for col, key, _ in COLUMNS + RAW_COLUMNS:
        if r.get(col) is None:
            continue
        name = key.replace("/", "_")
        values = {"mean": r[col], "std": r[f"{col} std"], "n": float(r[f"{col} n"]),
                  "ci95_low": r[f"{col} low"], "ci95_high": r[f"{col} high"]}
        out.update({f"{name}_{k}": float(v) for k, v in values.items() if v is not None})
    return out


def log_group_runs(experiment: str, uri: str, rows: list[dict]) -> dict[str, str]:
    """Each training group's aggregates into its group run (tag `mvar.group_run=true`), made, nested under
    nothing, when there is none; returns group key -> run id."""
    from mvar.tracking import MlflowTracker, Store, TrackingConfig
    store, cfg = Store(uri), TrackingConfig(uri=uri, experiment=experiment, system_metrics=False)
    done = {}
    for r in rows:
        g = r["_group"]
        if g.reference or g.key.startswith("run:"):
            continue
        tags = {GROUP_TAG: g.key, GROUP_RUN_TAG: "true"}
        run_id, created = (g.group_run.run_id, False) if g.group_run else (store.create_run(experiment, g.key, tags),
                                                                            True)
        t = MlflowTracker(run_id, cfg)
        if created:
            t.log_params(shared_params(g.members))
        t.set_tags({**tags, INTERVAL_TAG: r["interval"] or "none", "mvar.group_size": str(r["seeds"]),
                    "mvar.group_members": ",".join(m.run_id for m in g.members)[:5000]})
        t.log_metrics(aggregates(r), step=0)
        t.close(status="FINISHED" if created else "")
        done[g.key] = run_id
    return done


def shared_params(runs) -> dict[str, str]:
    """The params every member logged with the same value (the group's config, without seed or name)."""
    first, rest = runs[0].params, runs[1:]
    return {k: v for k, v in first.items() if all(r.params.get(k) == v for r in rest)
            and k not in ("run.seed", "run.name")}


def _cell(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def tokenizer_markdown(experiment: str, uri: str = "") -> str:
    """A section per tokenizer run of the experiment (tag mvar.task=tokenizer) that validated on held-out
    images: codebook usage and perplexity per scale, PSNR, codes restarted; '' when there is none."""
    from mvar.tracking import Store
    parts = []
    for run in Store(uri).runs(experiment):
        m = run.metrics
        if run.tags.get("mvar.task") != "tokenizer" or "tok/val_psnr" not in m:
            continue
        scales = sorted(int(k.rsplit("_s", 1)[1]) for k in m if k.startswith("tok/val_usage_s"))
        title = (f"\n## Tokenizer {run.name}: held-out PSNR {m['tok/val_psnr']:.2f} dB, "
                 f"{int(m.get('tok/restarts', 0))} codes restarted\n")
        lines = [title,
                 "| scale | usage % | perplexity |", "| --- | --- | --- |"]
        lines += [f"| {k} | {m[f'tok/val_usage_s{k}']:.1f} | {m.get(f'tok/val_perplexity_s{k}', float('nan')):.1f} |"
                  for k in scales]
        if run.tags.get("mvar.codebook_warning"):
            lines.append(f"\nwarning: {run.tags['mvar.codebook_warning']}")
        parts.append("\n".join(lines) + "\n")
    return "".join(parts)


def make_report(experiment: str, out: str | Path, uri: str = "", log: bool = True,
                extra_files: list[Path] = (), where: str = "", study: str = "", latex: bool = False) -> Report:
    """Tables, plots and the tokenizer section; ``extra_files`` (a picture ...) are logged with them.
    ``where``: an MLflow search filter, ``study``: the tag `mvar.study`, narrowing the runs."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(experiment, uri, where, study)
    add_ratios(rows)
    files = write_tables(rows, out, latex) + write_plots(rows, out)
    markdown = to_markdown(rows) + tokenizer_markdown(experiment, uri)
    (out / "ablation.md").write_text(markdown)
    files += [Path(f) for f in extra_files]
    if log:
        log_group_runs(experiment, uri, rows)
        log_report(experiment, uri, files, rows)
    for r in rows:
        r.pop("_group")
    return Report(rows=rows, markdown=markdown, files=files)


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="ablation table and plots of an MLflow experiment",
                              description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--out", default="out/report", help="directory for the table and plots")
    p.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else out/mlflow/mlflow.db")
    p.add_argument("--filter", default="", help="MLflow search filter of the runs, e.g. \"params.`run.steps` = '600'\"")
    p.add_argument("--study", default="", help="only the runs of this study (tag mvar.study)")
    p.add_argument("--latex", action="store_true", help="also write ablation.tex (a booktabs tabular)")
    p.add_argument("--no-log", action="store_true", help="do not log the report (nor the group aggregates) to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = make_report(args.experiment, args.out, args.tracking_uri, log=not args.no_log, where=args.filter,
                         study=args.study, latex=args.latex)
    print(report.markdown)
    print("wrote " + ", ".join(str(f) for f in report.files))
    return 0
