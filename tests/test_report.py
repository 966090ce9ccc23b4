"""`mvar report` over a real MLflow store holding a small ablation logged by the test."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from scipy import stats

from mvar import tracking
from mvar.cli import main
from mvar.errors import UserError
from mvar.report import make_report, pareto
from mvar.tracking import MlflowTracker, TrackingConfig

# variant, depth, window, metrics
RUNS = [
    ("var", 2, 3, {"eval/fid": 40.0, "infer/peak_mem_mb": 100.0, "perf/step_s": 0.50, "infer/kv_cache_mb": 8.0,
                   "model/attn_gflops": 2.0, "eval/is": 3.0, "train/pyramid_s": 0.50, "eval/kid": 0.040,
                   "cost/device_hours": 2.0}),
    ("scale_markov", 2, 3, {"eval/fid": 38.0, "infer/peak_mem_mb": 60.0, "perf/step_s": 0.40,
                            "infer/kv_cache_mb": 0.0}),
    ("mvar", 2, 3, {"eval/fid": 39.0, "infer/peak_mem_mb": 50.0, "perf/step_s": 0.30, "infer/kv_cache_mb": 0.0,
                    "eval/kid": 0.030, "cost/device_hours": 1.5}),
    ("mvar", 2, 5, {"eval/fid": 36.0, "infer/peak_mem_mb": 55.0, "perf/step_s": 0.10, "infer/kv_cache_mb": 0.0,
                    "train/pyramid_s": 0.35}),
    ("var", 4, 3, {"eval/fid": 30.0, "infer/peak_mem_mb": 200.0}),
    ("mvar", 4, 3, {"eval/fid": 29.0, "infer/peak_mem_mb": 80.0}),
]


def header(markdown: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith("| run "))
    return [c.strip() for c in line.strip("|").split("|")]


def table_row(markdown: str, run: str) -> list[str]:
    line = next(x for x in markdown.splitlines() if x.startswith(f"| {run} "))
    return [c.strip() for c in line.strip("|").split("|")]


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
    # training cost like for like: the ratio is of seconds per full pyramid; s/it stays a raw column
    assert rows["mvar-d2-k5"]["train s/pyramid x VAR"] == pytest.approx(0.7)
    assert rows["mvar-d2-k5"]["train s/it (raw)"] == pytest.approx(0.10)
    assert rows["mvar-d2-k3"]["train s/pyramid"] is None and rows["mvar-d2-k3"]["train s/pyramid x VAR"] is None
    assert rows["mvar-d2-k3"]["IS x VAR"] is None  # no IS logged for that run
    # KID beside FID, and the training's device-hours, each with its ratio to VAR
    assert rows["mvar-d2-k3"]["KID x VAR"] == pytest.approx(0.030 / 0.040)
    assert rows["mvar-d2-k3"]["device h"] == 1.5 and rows["mvar-d2-k3"]["device h x VAR"] == pytest.approx(0.75)
    hdr = header(report.markdown)
    assert hdr.index("FID") < hdr.index("KID") and "device h" in hdr
    assert table_row(report.markdown, "var-d2-k3")[hdr.index("device h")] == "2"
    names = {f.name for f in report.files}
    assert names == {"ablation.md", "ablation.csv", "ablation.html", "fid_vs_window.png", "memory_vs_depth.png",
                     "pareto_fid_memory.png"}
    with open(tmp_path / "out" / "ablation.csv") as fh:
        assert len(list(csv.DictReader(fh))) == len(RUNS) + 1
    cells = table_row(report.markdown, "mvar-d2-k5")
    assert cells[:4] == ["mvar-d2-k5", "mvar", "2", "5"] and cells[-1] == "1"  # one seed, no interval
    assert cells[header(report.markdown).index("train s/pyramid")] == "0.35"
    assert table_row(report.markdown, "mvar-d2-k3")[header(report.markdown).index("train s/pyramid")] == "-"
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
    # each training group got a group run holding its aggregates (one seed: n 1, no interval)
    groups = c.search_runs([run.info.experiment_id], "tags.`mvar.group_run` = 'true'")
    assert len(groups) == len(RUNS) + 1
    var_group = next(g for g in groups if g.data.params.get("model.attention") == "var"
                     and g.data.params.get("model.depth") == "2")
    assert var_group.data.metrics["eval_fid_mean"] == 40.0 and var_group.data.metrics["eval_fid_n"] == 1
    assert "eval_fid_ci95_low" not in var_group.data.metrics and var_group.data.tags["mvar.interval"] == "none"
    assert "mlflow.parentRunId" not in var_group.data.tags and var_group.info.status == "FINISHED"


def test_pareto_front_keeps_only_undominated_points():
    pts = [(100.0, 40.0), (60.0, 38.0), (50.0, 39.0), (55.0, 36.0), (70.0, 37.0)]
    assert pareto(pts) == [(50.0, 39.0), (55.0, 36.0)]


def test_cli_prints_the_table_and_unknown_experiment_is_a_clear_error(store, tmp_path, capsys):
    assert main(["report", "--experiment", "abl", "--out", str(tmp_path / "o"), "--tracking-uri", store.uri,
                 "--no-log"]) == 0
    assert header(capsys.readouterr().out)[:4] == ["run", "variant", "depth", "window"]
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


def _log(cfg, name, variant, seed, metrics, params=None, tags=None, parent=None):
    run_id = tracking.start_run(cfg, name, tags={"mvar.variant": variant, "mvar.seed": str(seed),
                                                 "mvar.run_key": f"/runs/{name}", **(tags or {})},
                                parent_run_id=parent)
    t = MlflowTracker(run_id, cfg)
    t.log_params({"model.attention": variant, "model.depth": 2, "model.window_size": 3, "run.steps": 100,
                  "run.seed": seed, "run.name": name, "data.shards": "/data/a", "tokenizer": "/tok",
                  "eval.reference": "/ref", "eval.num_samples": 200, "eval.cfg": 1.5, **(params or {})})
    t.log_metrics(metrics, 1)
    t.close()
    return run_id


# FID: mvar lower by ~5 with a noise of ~0.5 (clear); memory: 1 apart with a noise of ~10 (not)
SEEDED = {"var": [(40.1, 100.0), (40.9, 112.0), (39.6, 95.0)], "mvar": [(35.2, 101.0), (35.8, 96.0), (34.7, 111.0)]}


@pytest.fixture()
def seeded(tmp_path):
    """Three training seeds of var and of mvar; var's seeds are the children of a group run of its own."""
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="seeds", system_metrics=False)
    parent = tracking.start_run(cfg, "var-group", tags={"mvar.group": "var-g", "mvar.group_run": "true"})
    for variant, values in SEEDED.items():
        for seed, (fid, mem) in enumerate(values):
            _log(cfg, f"{variant}-s{seed}", variant, seed, {"eval/fid": fid, "infer/peak_mem_mb": mem},
                 tags={"mvar.group": "var-g"} if variant == "var" else {}, parent=parent if variant == "var" else None)
    return cfg, parent


def test_groups_of_seeds_show_t_intervals_and_verdicts_and_fill_their_group_runs(seeded, tmp_path):
    cfg, parent = seeded
    report = make_report("seeds", tmp_path / "out", cfg.uri)
    rows = {r["variant"]: r for r in report.rows}
    assert len(report.rows) == 2 and rows["var"]["run"] == "var-group" and rows["mvar"]["seeds"] == 3
    fids = [v[0] for v in SEEDED["mvar"]]
    low, high = stats.t.interval(0.95, 2, loc=np.mean(fids), scale=stats.sem(fids))
    assert rows["mvar"]["FID"] == pytest.approx(np.mean(fids))
    assert (rows["mvar"]["FID low"], rows["mvar"]["FID high"]) == pytest.approx((low, high))
    assert rows["mvar"]["FID std"] == pytest.approx(np.std(fids, ddof=1)) and rows["mvar"]["FID interval"] == "t"
    # paired over the seeds: FID clearly better, memory within the noise
    assert rows["mvar"]["FID x VAR"] == pytest.approx(np.mean(fids) / np.mean([v[0] for v in SEEDED["var"]]))
    assert rows["mvar"]["FID x VAR verdict"] == "better" and rows["mvar"]["FID x VAR method"] == "paired n=3"
    assert rows["mvar"]["infer mem MB x VAR verdict"] == "inconclusive"
    assert rows["var"]["FID x VAR verdict"] == ""  # the baseline itself
    cells = table_row(report.markdown, rows["mvar"]["run"])
    cols = header(report.markdown)
    assert cells[cols.index("FID")] == f"{np.mean(fids):.3g} ± {(high - low) / 2:.3g}"
    assert cells[cols.index("FID x VAR")].endswith("(better)") and cells[cols.index("seeds")] == "3 (t)"
    assert cells[cols.index("infer mem MB x VAR")].endswith("(inconclusive)")
    # the aggregates: into var's own group run, and into a group run made for mvar (nested under nothing)
    c = tracking.client(cfg.uri)
    var_group = c.get_run(parent)
    assert var_group.data.metrics["eval_fid_mean"] == pytest.approx(rows["var"]["FID"])
    assert var_group.data.metrics["eval_fid_n"] == 3 and var_group.data.tags["mvar.interval"] == "t"
    exp = var_group.info.experiment_id
    [made] = c.search_runs([exp], f"tags.`mvar.group` = '{rows['mvar']['group']}' and tags.`mvar.group_run` = 'true'")
    m = made.data.metrics
    assert (m["eval_fid_ci95_low"], m["eval_fid_ci95_high"]) == pytest.approx((low, high))
    assert m["eval_fid_std"] == pytest.approx(np.std(fids, ddof=1)) and "infer_peak_mem_mb_mean" in m
    assert made.data.params["model.attention"] == "mvar" and "run.seed" not in made.data.params
    assert "mlflow.parentRunId" not in made.data.tags
    # a second report finds the same group runs
    make_report("seeds", tmp_path / "out", cfg.uri)
    assert len(c.search_runs([exp], "tags.`mvar.group_run` = 'true'")) == 2


def test_one_seed_takes_the_evaluations_bootstrap_and_says_so(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="one", system_metrics=False)
    boot = {"eval/fid_boot_low": 38.0, "eval/fid_boot_high": 43.5, "eval/fid_boot_std": 1.4}
    _log(cfg, "var-s0", "var", 0, {"eval/fid": 40.0, **boot, "eval/class_acc": 0.5})
    _log(cfg, "mvar-s0", "mvar", 0, {"eval/fid": 39.0, **boot})
    report = make_report("one", tmp_path / "out", cfg.uri, latex=True)
    row = next(r for r in report.rows if r["variant"] == "mvar")
    assert row["FID interval"] == "bootstrap" and (row["FID low"], row["FID high"]) == (38.0, 43.5)
    assert row["class acc interval"] == "" and row["interval"] == "bootstrap"
    assert row["FID x VAR verdict"] == "inconclusive"  # one seed each: nothing to pair over
    cells, cols = table_row(report.markdown, "mvar-s0"), header(report.markdown)
    assert cells[cols.index("FID")] == "39 [38, 43.5]" and cells[cols.index("seeds")] == "1 (bootstrap)"
    assert "bootstrap over the generated samples" in report.markdown
    c = tracking.client(cfg.uri)
    [group] = c.search_runs([c.get_experiment_by_name("one").experiment_id],
                            f"tags.`mvar.group` = '{row['group']}'")
    assert group.data.tags["mvar.interval"] == "bootstrap" and group.data.metrics["eval_fid_ci95_high"] == 43.5
    tex = (tmp_path / "out" / "ablation.tex").read_text()
    assert "\\toprule" in tex and "39 [38, 43.5]" in tex and "mvar-s0" in tex


def test_seeds_that_do_not_match_are_compared_unpaired_and_labelled(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="welch", system_metrics=False)
    for seed, fid in ((0, 40.0), (1, 41.0)):
        _log(cfg, f"var-s{seed}", "var", seed, {"eval/fid": fid})
    for seed, fid in ((5, 30.0), (6, 30.5), (7, 29.8)):
        _log(cfg, f"mvar-s{seed}", "mvar", seed, {"eval/fid": fid})
    report = make_report("welch", tmp_path / "out", cfg.uri, log=False)
    row = next(r for r in report.rows if r["variant"] == "mvar")
    assert row["FID x VAR method"] == "welch n=2" and row["FID x VAR verdict"] == "better"
    with open(tmp_path / "out" / "ablation.csv") as fh:
        csv_row = next(r for r in csv.DictReader(fh) if r["variant"] == "mvar")
    assert csv_row["FID x VAR method"] == "welch n=2" and float(csv_row["FID n"]) == 3


@pytest.mark.parametrize("field, member, compared", [
    ("data.shards", {"params": {"data.shards": "/data/b"}}, False),
    ("tokenizer", {"params": {"tokenizer": "/tok2"}}, True),
    ("eval.reference", {"params": {"eval.reference": "/ref2"}}, True),
    ("eval.num_samples", {"params": {"eval.num_samples": 50}}, True),
    ("eval.cfg", {"params": {"eval.cfg": 2.0}}, False),
    ("mvar.feature_extractor", {"tags": {"mvar.feature_extractor": "mvar-classifier"}}, True),
])
def test_groups_or_comparisons_that_mix_data_or_evaluations_are_refused(tmp_path, capsys, field, member, compared):
    """A seed of var (or the mvar row set against var) that differs in ``field``: refused, naming both runs."""
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="mix", system_metrics=False)
    base = {"tags": {"mvar.feature_extractor": "inception-v3-compat", "mvar.group": "var-g"}}
    _log(cfg, "var-s0", "var", 0, {"eval/fid": 40.0}, tags=base["tags"])
    other = {"params": member.get("params"), "tags": {**base["tags"], **member.get("tags", {})}}
    if compared:
        other["tags"].pop("mvar.group")
        _log(cfg, "mvar-s0", "mvar", 0, {"eval/fid": 39.0}, **other)
    else:
        _log(cfg, "var-s1", "var", 1, {"eval/fid": 41.0}, **other)
    second = "mvar-s0" if compared else "var-s1"
    with pytest.raises(UserError, match=rf"'var-s0' and '{second}'|'{second}' and 'var-s0'") as err:
        make_report("mix", tmp_path / "out", cfg.uri, log=False)
    assert field in str(err.value) and "\n" not in str(err.value)
    assert main(["report", "--experiment", "mix", "--out", str(tmp_path / "o"), "--tracking-uri", cfg.uri]) == 2
    assert field in capsys.readouterr().err


def test_the_real_images_row_is_compared_whatever_its_extractor_is_called(tmp_path):
    """The quickstart tags its real row with the config's name (classifier), evaluations with the extractor's."""
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="q", system_metrics=False)
    _log(cfg, "var-s0", "var", 0, {"eval/fid": 40.0}, tags={"mvar.feature_extractor": "mvar-classifier"})
    run_id = tracking.start_run(cfg, "real", tags={"mvar.reference_row": "real",
                                                   "mvar.feature_extractor": "classifier"})
    t = MlflowTracker(run_id, cfg)
    t.log_params({"eval.reference": "/ref"})
    t.log_metrics({"eval/fid": 4.0}, 0)
    t.close()
    report = make_report("q", tmp_path / "out", cfg.uri, log=False)
    assert [r["run"] for r in report.rows] == ["real", "var-s0"] and report.rows[0]["FID x VAR"] == 0.1
    assert "classifier of the training split" in report.markdown


def test_filter_and_study_narrow_the_runs_and_a_bad_filter_is_one_line(seeded, tmp_path, capsys):
    cfg, _ = seeded
    _log(cfg, "study-mvar", "mvar", 0, {"eval/fid": 20.0}, params={"run.steps": 50}, tags={"mvar.study": "k"})
    assert main(["report", "--experiment", "seeds", "--out", str(tmp_path / "o"), "--tracking-uri", cfg.uri,
                 "--no-log", "--study", "k"]) == 0
    out = capsys.readouterr().out
    assert "| study-mvar " in out and "| var-group " not in out
    report = make_report("seeds", tmp_path / "o", cfg.uri, log=False, where="tags.`mvar.variant` = 'var'")
    assert [r["run"] for r in report.rows] == ["var-group"]
    assert main(["report", "--experiment", "seeds", "--out", str(tmp_path / "o"), "--tracking-uri", cfg.uri,
                 "--no-log", "--filter", "params.nope = = 1"]) == 2
    err = capsys.readouterr().err
    assert "--filter" in err and len(err.strip().splitlines()) == 1


def test_html_is_escaped(tmp_path):
    cfg = TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="h", system_metrics=False)
    _log(cfg, "<b>var</b>", "var", 0, {"eval/fid": 40.0})
    make_report("h", tmp_path / "out", cfg.uri, log=False)
    html = (tmp_path / "out" / "ablation.html").read_text()
    assert "&lt;b&gt;var&lt;/b&gt;" in html and "<b>var" not in html


def test_the_report_says_what_the_rows_held_equal():
    from mvar.report import budget_note
    rows = [{"reference": "", "budget": "pyramids"}, {"reference": "", "budget": "pyramids"},
            {"reference": "real", "budget": ""}]
    assert "equal full pyramids" in budget_note(rows)
    assert "MIXED (pyramids, steps)" in budget_note(rows + [{"reference": "", "budget": "steps"}])
    assert "not stated" in budget_note([{"reference": "", "budget": ""}])
