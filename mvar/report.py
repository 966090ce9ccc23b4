"""`mvar report --experiment NAME`: the ablation table of an MLflow experiment, with ratios to VAR.

One row per run that carries `mvar.variant` (training runs, and evaluation runs of checkpoints
that were not trained here, and a sweep's trials, nested under its run); evaluation child runs and sweep
parents are left out. Columns are
the paper's (inference time, attention GFLOPs, KV cache, inference memory, train s/it, train
memory, FID, IS, precision, recall), each followed by its ratio to the VAR run of the same
depth (the latest finished one). Written as Markdown, CSV and HTML with three plots (FID vs
window size, inference memory vs depth per variant, the FID / memory Pareto front) and logged
as the artifacts of a report run (tag `mvar.report`), the table also with MLflow's ``log_table``.
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from mvar.models.config import PATTERNS

# (column, MLflow metric, lower is better?)
COLUMNS = [
    ("infer s/batch", "infer/latency_s", True),
    ("attn GFLOPs", "model/attn_gflops", True),
    ("KV cache MB", "infer/kv_cache_mb", True),
    ("infer mem MB", "infer/peak_mem_mb", True),
    ("train s/it", "perf/step_s", True),
    ("train mem MB", "perf/peak_mem_mb", True),
    ("FID", "eval/fid", True),
    ("IS", "eval/is", False),
    ("precision", "eval/precision", False),
    ("recall", "eval/recall", False),
]
VARIANT_ORDER = {variant: i for i, variant in enumerate(PATTERNS)}


@dataclass
class Report:
    rows: list[dict]
    markdown: str
    files: list[Path]


def collect(experiment: str, uri: str = "") -> list[dict]:
    """Rows of the experiment's runs: identity columns plus the latest value of each metric."""
    from mvar.tracking import PARENT_TAG, Store
    rows = []
    for run in Store(uri).runs(experiment):
        tags, params, metrics = run.tags, run.params, run.metrics
        nested_eval = PARENT_TAG in tags and "mvar.run_key" not in tags  # a sweep's trials are nested training runs
        if "mvar.variant" not in tags or nested_eval or tags.get("mvar.report"):
            continue
        depth = params.get("model.depth") or _depth_of(tags.get("mvar.size", ""))
        rows.append({"run": run.name, "run_id": run.run_id, "status": run.status,
                     "variant": tags["mvar.variant"], "depth": int(depth) if depth else 0,
                     "window": int(params["model.window_size"]) if params.get("model.window_size") else 0,
                     "comparable": tags.get("mvar.metrics_comparable", ""), "start": run.start_time,
                     **{col: metrics.get(key) for col, key, _ in COLUMNS}})
    rows.sort(key=lambda r: (r["depth"], VARIANT_ORDER.get(r["variant"], 9), r["window"], r["start"]))
    return rows


def _depth_of(size: str) -> str:
    return size[1:] if size.startswith("d") and size[1:].isdigit() else ""


def add_ratios(rows: list[dict]) -> None:
    """`<col> x VAR`: this run's value over the VAR baseline of the same depth (latest finished)."""
    baselines: dict[int, dict] = {}
    for r in rows:
        newer = r["depth"] not in baselines or r["start"] > baselines[r["depth"]]["start"]
        if r["variant"] == "var" and r["status"] == "FINISHED" and newer:
            baselines[r["depth"]] = r
    for r in rows:
        base = baselines.get(r["depth"])
        for col, _, _ in COLUMNS:
            v, b = r.get(col), base.get(col) if base else None
            r[f"{col} x VAR"] = v / b if v is not None and b not in (None, 0) else None


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table_columns() -> list[str]:
    cols = ["run", "variant", "depth", "window"]
    for col, _, _ in COLUMNS:
        cols += [col, f"{col} x VAR"]
    return cols


def to_markdown(rows: list[dict]) -> str:
    cols = table_columns()
    lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    if any(r["comparable"] == "false" for r in rows):
        lines.append("\nFID/IS/precision/recall computed with stand-in feature-extractor weights: "
                     "not comparable with published numbers.")
    return "\n".join(lines) + "\n"


def write_tables(rows: list[dict], out: Path) -> list[Path]:
    import csv
    cols = table_columns() + ["run_id", "status", "comparable"]
    with open(out / "ablation.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (out / "ablation.md").write_text(to_markdown(rows))
    head = "".join(f"<th>{c}</th>" for c in table_columns())
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in table_columns()) + "</tr>" for r in rows)
    (out / "ablation.html").write_text(f"<html><head><meta charset='utf-8'><title>MVAR ablation</title></head>"
                                       f"<body><table border='1'><tr>{head}</tr>{body}</table></body></html>\n")
    return [out / "ablation.md", out / "ablation.csv", out / "ablation.html"]


def pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points not dominated when both coordinates are minimised, sorted by the first."""
    front = [p for p in points if not any(q[0] <= p[0] and q[1] <= p[1] and q != p for q in points)]
    return sorted(set(front))


def _plot(path: Path, title: str, xlabel: str, ylabel: str, series: dict[str, list[tuple[float, float]]],
          line: list[tuple[float, float]] | None = None) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, pts in series.items():
        if pts:
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-" if len(pts) > 1 else "o", label=name)
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


def write_plots(rows: list[dict], out: Path) -> list[Path]:
    has = [r for r in rows if r.get("FID") is not None]
    fid_k = {f"mvar d{d}": [(r["window"], r["FID"]) for r in has if r["variant"] == "mvar" and r["depth"] == d]
             for d in sorted({r["depth"] for r in has})}
    mem_depth = {v: [(r["depth"], r["infer mem MB"]) for r in rows
                     if r["variant"] == v and r.get("infer mem MB") is not None] for v in VARIANT_ORDER}
    pts = {v: [(r["infer mem MB"], r["FID"]) for r in has if r["variant"] == v and r.get("infer mem MB") is not None]
           for v in VARIANT_ORDER}
    front = pareto([p for v in pts.values() for p in v])
    return [_plot(out / "fid_vs_window.png", "FID vs window size k", "k", "FID", fid_k),
            _plot(out / "memory_vs_depth.png", "Inference memory vs depth", "depth", "peak MB", mem_depth),
            _plot(out / "pareto_fid_memory.png", "FID vs inference memory", "peak MB", "FID", pts, front)]


TABLE_FILE = "report/ablation_table.json"   # the table as MLflow's log_table stores it


def log_report(experiment: str, uri: str, files: list[Path], rows: list[dict] = ()) -> str:
    """A report run: the files as artifacts, and the table (one row per run, the same columns) with
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


def _cell(v):
    return None if isinstance(v, float) and math.isnan(v) else v


def make_report(experiment: str, out: str | Path, uri: str = "", log: bool = True) -> Report:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(experiment, uri)
    add_ratios(rows)
    files = write_tables(rows, out) + write_plots(rows, out)
    if log:
        log_report(experiment, uri, files, rows)
    return Report(rows=rows, markdown=to_markdown(rows), files=files)


def register(subparsers) -> None:
    p = subparsers.add_parser("report", help="ablation table and plots of an MLflow experiment",
                              description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--out", default="out/report", help="directory for the table and plots")
    p.add_argument("--tracking-uri", default="", help="default: MLFLOW_TRACKING_URI, else out/mlflow/mlflow.db")
    p.add_argument("--no-log", action="store_true", help="do not log the report as an MLflow run")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    report = make_report(args.experiment, args.out, args.tracking_uri, log=not args.no_log)
    print(report.markdown)
    print("wrote " + ", ".join(str(f) for f in report.files))
    return 0
