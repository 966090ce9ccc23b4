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
    ("class acc", "eval/class_acc", False),  # with a classifier feature extractor only
]
# runs tagged `mvar.reference_row` (real, untrained) frame the variants: listed first, never a baseline
REFERENCE_TAG = "mvar.reference_row"
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
        reference = tags.get(REFERENCE_TAG, "")
        nested_eval = PARENT_TAG in tags and "mvar.run_key" not in tags  # a sweep's trials are nested training runs
        if ("mvar.variant" not in tags and not reference) or nested_eval or tags.get("mvar.report"):
            continue
        depth = params.get("model.depth") or _depth_of(tags.get("mvar.size", ""))
        rows.append({"run": run.name, "run_id": run.run_id, "status": run.status, "reference": reference,
                     "variant": reference or tags["mvar.variant"], "depth": int(depth) if depth else 0,
                     "window": int(params["model.window_size"]) if params.get("model.window_size") else 0,
                     "comparable": tags.get("mvar.metrics_comparable", ""), "start": run.start_time,
                     "extractor": tags.get("mvar.feature_extractor", ""),
                     **{col: metrics.get(key) for col, key, _ in COLUMNS}})
    rows.sort(key=lambda r: (not r["reference"], r["depth"], VARIANT_ORDER.get(r["variant"], 9), r["window"],
                             r["start"]))
    return rows


def _depth_of(size: str) -> str:
    return size[1:] if size.startswith("d") and size[1:].isdigit() else ""


def add_ratios(rows: list[dict]) -> None:
    """`<col> x VAR`: this run's value over the VAR baseline of the same depth (latest finished)."""
    baselines: dict[int, dict] = {}
    for r in rows:
        newer = r["depth"] not in baselines or r["start"] > baselines[r["depth"]]["start"]
        if r["variant"] == "var" and r["status"] == "FINISHED" and newer and not r.get("reference"):
            baselines[r["depth"]] = r
    depths = sorted(baselines)
    for r in rows:
        # a reference row of no known depth (the real images) is set against the only VAR baseline
        base = baselines.get(r["depth"]) or (baselines[depths[0]] if r.get("reference") and len(depths) == 1
                                             else None)
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
    if any(r.get("extractor") == "classifier" for r in rows):
        lines.append("\nFID/IS/precision/recall/class acc computed with a classifier of the training split "
                     "(mvar.feature_extractor=classifier): not comparable with Inception numbers.")
    elif any(r["comparable"] == "false" for r in rows):
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
                extra_files: list[Path] = ()) -> Report:
    """Tables, plots and the tokenizer section; ``extra_files`` (a picture ...) are logged with them."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = collect(experiment, uri)
    add_ratios(rows)
    files = write_tables(rows, out) + write_plots(rows, out)
    markdown = to_markdown(rows) + tokenizer_markdown(experiment, uri)
    (out / "ablation.md").write_text(markdown)
    files += [Path(f) for f in extra_files]
    if log:
        log_report(experiment, uri, files, rows)
    return Report(rows=rows, markdown=markdown, files=files)


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
