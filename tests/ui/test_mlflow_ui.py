"""The MLflow UI, in a real browser, shows the VAR and MVAR runs and lines their metrics up.

A fresh MLflow server (SQLite store) on 127.0.0.1 gets two small runs logged through the project's
own tracking code (`mvar.tracking`: the same params, tags and metric names a training run logs);
headless Chromium (Debian's, driven with Selenium through Debian's chromedriver) opens the experiment's runs in chart view
and the two runs' compare page and reads the rendered text. Screenshots (and the page text) are kept
in `out/test-artifacts/mlflow-ui/` (or `$MVAR_TEST_ARTIFACTS/mlflow-ui/`) and in the test's tmp dir.
"""
from __future__ import annotations

import json
import re
import urllib.parse
from dataclasses import dataclass

import pytest

pytestmark = pytest.mark.slow

EXPERIMENT = "ui-test"


@dataclass(frozen=True)
class LoggedRun:
    name: str
    variant: str
    run_id: str
    losses: tuple[float, ...]
    fid: float
    peak_mem_mb: float


@dataclass(frozen=True)
class Logged:
    experiment_id: str
    runs: tuple[LoggedRun, ...]


def _log_run(uri: str, name: str, variant: str, losses: tuple[float, ...], fid: float, mem: float) -> LoggedRun:
    from mvar.tracking import MlflowTracker, TrackingConfig, start_run
    cfg = TrackingConfig(uri=uri, experiment=EXPERIMENT, system_metrics=False, retry_s=30)
    run_id = start_run(cfg, name, tags={"mvar.variant": variant, "mvar.model": f"{variant}-tiny"})
    tracker = MlflowTracker(run_id, cfg)
    tracker.log_params({"model": {"attention": variant, "depth": 2, "window_size": 3 if variant == "mvar" else 0}})
    for step, loss in enumerate(losses):
        tracker.log_metrics({"train/loss": loss}, step=step)
    tracker.log_metrics({"eval/fid": fid, "infer/peak_mem_mb": mem}, step=len(losses) - 1)
    tracker.close()
    assert tracker.failures == 0, "logging to the test's MLflow server failed"
    return LoggedRun(name, variant, run_id, losses, fid, mem)


@pytest.fixture(scope="module")
def logged(mlflow_server) -> Logged:
    """Two runs of one experiment, VAR then MVAR, with values that print the same in every view."""
    from mvar.tracking import experiment_id
    runs = (_log_run(mlflow_server, "var-tiny", "var", (5.0, 4.5, 4.25, 4.0), fid=41.25, mem=812.0),
            _log_run(mlflow_server, "mvar-tiny", "mvar", (4.75, 4.0, 3.75, 3.5), fid=37.5, mem=406.0))
    return Logged(experiment_id(EXPERIMENT, mlflow_server), runs)


def _missing(text: str, needles: list[str]) -> list[str]:
    return [n for n in needles if n not in text]


@pytest.fixture(scope="module")
def shots(artifact_dirs):
    return artifact_dirs("mlflow-ui")


def test_experiment_page_shows_both_runs_and_their_metrics(browser, mlflow_server, logged, shots):
    # MLflow 3 opens an experiment without a kind on its GenAI overview: ask for the training runs, charts view
    query = urllib.parse.urlencode({"workflowType": "machine_learning", "compareRunsMode": "CHART"})
    url = f"{mlflow_server}/#/experiments/{logged.experiment_id}/runs?{query}"
    var, mvar = logged.runs
    metric_names = ["eval/fid", "infer/peak_mem_mb", "train/loss"]
    # one chart per metric, each with a legend entry per run ("var-tiny (eval/fid)"); the values are
    # read on the compare page (a line chart of single points prints none)
    needles = [var.name, mvar.name, *metric_names, *(f"{r.name} ({m})" for r in logged.runs for m in metric_names)]
    browser.set_window(1600, 2000)
    browser.open(url, needles)
    text = browser.keep(shots, "experiment-runs-charts")
    assert not _missing(text, needles), f"not on the experiment page: {_missing(text, needles)}; page text:\n{text[:3000]}"
    assert f"{len(logged.runs)} matching runs" in text


def test_compare_page_lines_up_var_and_mvar(browser, mlflow_server, logged, shots):
    var, mvar = logged.runs
    query = urllib.parse.urlencode({"runs": json.dumps([var.run_id, mvar.run_id]),
                                    "experiments": json.dumps([logged.experiment_id])})
    url = f"{mlflow_server}/#/compare-runs?{query}"
    needles = ["Comparing 2 Runs", var.name, mvar.name, var.run_id, mvar.run_id, "model.attention", "mvar.variant",
               "eval/fid", "infer/peak_mem_mb", "train/loss", f"{var.fid:g}", f"{mvar.fid:g}"]
    browser.set_window(1600, 2400)  # tall enough for the params, metrics and tags tables under the plots
    browser.open(url, needles)
    text = browser.keep(shots, "compare-runs")
    assert not _missing(text, needles), f"not on the compare page: {_missing(text, needles)}; page text:\n{text[:3000]}"
    # one column per run, in the order asked for: VAR's value comes first in each row
    assert re.search(r"model\.attention\s+var\s+mvar", text), "params row model.attention is not 'var | mvar'"
    assert re.search(r"mvar\.variant\s+var\s+mvar", text), "tags row mvar.variant is not 'var | mvar'"
    shown = _numbers_between(text, "Metrics", "Artifacts")
    expected = [var.fid, mvar.fid, var.peak_mem_mb, mvar.peak_mem_mb, var.losses[-1], mvar.losses[-1]]
    assert shown == pytest.approx(expected, rel=1e-3), (
        f"metrics table shows {shown}, expected {expected} (eval/fid, infer/peak_mem_mb, train/loss; VAR then MVAR)")


def _numbers_between(text: str, start: str, end: str) -> list[float]:
    """The lines of ``text`` between the headings ``start`` and ``end`` that are numbers."""
    lines = [line.strip() for line in text.splitlines()]
    if end not in lines or start not in lines[:lines.index(end)]:
        return []
    stop = lines.index(end)
    begin = stop - lines[:stop][::-1].index(start)  # the last `start` before `end`
    section = lines[begin:stop]
    return [float(line) for line in section if re.fullmatch(r"-?\d+(\.\d+)?(e-?\d+)?", line)]
