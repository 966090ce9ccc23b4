"""`mvar report` over a real MLflow store holding a small ablation logged by the test."""
from __future__ import annotations

import csv
import json

import pytest

from mvar import tracking
from mvar.cli import main
from mvar.report import make_report, pareto
from mvar.tracking import MlflowTracker, TrackingConfig

# variant, depth, window, metrics
RUNS = [
    ("var", 2, 3, {"eval/fid": 40.0, "infer/peak_mem_mb": 100.0, "perf/step_s": 0.50, "infer/kv_cache_mb": 8.0,
                   "model/attn_gflops": 2.0, "eval/is": 3.0}),
    ("scale_markov", 2, 3, {"eval/fid": 38.0, "infer/peak_mem_mb": 60.0, "perf/step_s": 0.40,
                            "infer/kv_cache_mb": 0.0}),
    ("mvar", 2, 3, {"eval/fid": 39.0, "infer/peak_mem_mb": 50.0, "perf/step_s": 0.30, "infer/kv_cache_mb": 0.0}),
    ("mvar", 2, 5, {"eval/fid": 36.0, "infer/peak_mem_mb": 55.0, "perf/step_s": 0.35, "infer/kv_cache_mb": 0.0}),
    ("var", 4, 3, {"eval/fid": 30.0, "infer/peak_mem_mb": 200.0}),
    ("mvar", 4, 3, {"eval/fid": 29.0, "infer/peak_mem_mb": 80.0}),
]


@pytest.fixture()
def store(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="abl", system_metrics=False)
    for variant, depth, window, metrics in RUNS:
        run_id = tracking.start_run(cfg, f"{variant}-d{depth}-k{window}", tags={"mvar.variant": variant})
        t = MlflowTracker(run_id, cfg)
        t.log_params({"model": {"depth": depth, "window_size": window, "attention": variant}})
        t.log_metrics(metrics, 1)
        t.close()
    # an evaluation child run is not a row of its own; a sweep's trial (a nested training run) is
    child = tracking.start_run(cfg, "eval-child", tags={"mvar.variant": "mvar"}, parent_run_id=run_id)
    MlflowTracker(child, cfg).close()
    trial = tracking.start_run(cfg, "sweep-trial", tags={"mvar.variant": "mvar", "mvar.run_key": "/runs/s-t0"},
                               parent_run_id=run_id)
    t = MlflowTracker(trial, cfg)
    t.log_params({"model": {"depth": 4, "window_size": 2, "attention": "mvar"}})
    t.close()
    return cfg


def test_table_has_a_row_per_run_and_ratios_to_var_of_the_same_depth(store, tmp_path):
    report = make_report("abl", tmp_path / "out", store.uri)
    rows = {r["run"]: r for r in report.rows}
    assert set(rows) == {f"{v}-d{d}-k{k}" for v, d, k, _ in RUNS} | {"sweep-trial"}
    assert rows["mvar-d2-k3"]["infer mem MB x VAR"] == pytest.approx(0.5)
    assert rows["mvar-d4-k3"]["infer mem MB x VAR"] == pytest.approx(0.4)  # against var-d4, not var-d2
    assert rows["var-d2-k3"]["FID x VAR"] == pytest.approx(1.0)
    assert rows["mvar-d2-k5"]["train s/it x VAR"] == pytest.approx(0.7)
    assert rows["mvar-d2-k3"]["IS x VAR"] is None  # no IS logged for that run
    names = {f.name for f in report.files}
    assert names == {"ablation.md", "ablation.csv", "ablation.html", "fid_vs_window.png", "memory_vs_depth.png",
                     "pareto_fid_memory.png"}
    with open(tmp_path / "out" / "ablation.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(RUNS) + 1
    assert "| mvar-d2-k5 | mvar | 2 | 5 |" in report.markdown
    c = tracking.client(store.uri)
    logged = c.search_runs([c.get_experiment_by_name("abl").experiment_id], "tags.`mvar.report` = 'true'")
    assert len(logged) == 1
    assert {a.path for a in c.list_artifacts(logged[0].info.run_id, "report")} >= {"report/ablation.md",
                                                                                   "report/pareto_fid_memory.png"}
    # the same table through MLflow's log_table
    run = c.get_run(logged[0].info.run_id)
    assert {"path": "report/ablation_table.json", "type": "table"} in json.loads(run.data.tags["mlflow.loggedArtifacts"])
    table = json.loads(open(c.download_artifacts(run.info.run_id, "report/ablation_table.json", str(tmp_path))).read())
    assert table["columns"][:4] == ["run", "variant", "depth", "window"] and len(table["data"]) == len(RUNS) + 1
    by_run = {row[0]: dict(zip(table["columns"], row)) for row in table["data"]}
    assert by_run["mvar-d2-k3"]["infer mem MB x VAR"] == pytest.approx(0.5)
    assert by_run["mvar-d2-k3"]["FID"] == pytest.approx(39.0) and by_run["mvar-d2-k3"]["IS"] is None


def test_pareto_front_keeps_only_undominated_points():
    pts = [(100.0, 40.0), (60.0, 38.0), (50.0, 39.0), (55.0, 36.0), (70.0, 37.0)]
    assert pareto(pts) == [(50.0, 39.0), (55.0, 36.0)]


def test_cli_prints_the_table_and_unknown_experiment_is_a_clear_error(store, tmp_path, capsys):
    assert main(["report", "--experiment", "abl", "--out", str(tmp_path / "o"), "--tracking-uri", store.uri,
                 "--no-log"]) == 0
    assert "| run | variant | depth | window |" in capsys.readouterr().out
    assert main(["report", "--experiment", "nope", "--tracking-uri", store.uri, "--out", str(tmp_path / "o")]) == 2
    assert "no MLflow experiment 'nope'" in capsys.readouterr().err


def test_reference_rows_come_first_are_no_baseline_and_the_tokenizer_has_its_section(tmp_path):
    """The quickstart's frame: a real-images row and an untrained VAR (variant var, newer than the trained
    one) around the variants; class accuracy is a column; the tokenizer run's held-out usage is a section."""
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="qs", system_metrics=False)
    logged = [("var", {"mvar.variant": "var"}, {"eval/fid": 10.0, "eval/class_acc": 0.8}),
              ("real", {"mvar.reference_row": "real"}, {"eval/fid": 1.0, "eval/class_acc": 1.0}),
              ("untrained", {"mvar.variant": "var", "mvar.reference_row": "untrained"}, {"eval/fid": 40.0}),
              ("tok", {"mvar.task": "tokenizer"}, {"tok/val_psnr": 22.5, "tok/restarts": 7.0,
                                                   **{f"tok/val_usage_s{k}": 10.0 * (k + 1) for k in range(3)}})]
    for name, tags, metrics in logged:
        run_id = tracking.start_run(cfg, name, tags=tags)
        t = MlflowTracker(run_id, cfg)
        t.log_params({"model": {"depth": 2}} if name != "real" and name != "tok" else {})
        t.log_metrics(metrics, 1)
        t.close(status="FINISHED")
    picture = tmp_path / "pic.png"
    picture.write_bytes(b"png")
    report = make_report("qs", tmp_path / "out", cfg.uri, extra_files=[picture])
    rows = [(r["run"], r["variant"]) for r in report.rows]
    assert rows == [("real", "real"), ("untrained", "untrained"), ("var", "var")]
    by = {r["run"]: r for r in report.rows}
    assert by["untrained"]["FID x VAR"] == pytest.approx(4.0)  # against the trained var, not itself
    assert by["real"]["FID x VAR"] == pytest.approx(0.1) and by["var"]["class acc"] == pytest.approx(0.8)
    assert "class acc x VAR" in report.markdown
    assert "## Tokenizer tok: held-out PSNR 22.50 dB, 7 codes restarted" in report.markdown
    assert "| 2 | 30.0 |" in (tmp_path / "out" / "ablation.md").read_text()
    assert picture in report.files
