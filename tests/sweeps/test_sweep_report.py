"""The parent run's report from a study in memory (no training): trials table, Pareto front, importances."""
from __future__ import annotations

import json

import optuna

from sweeps.report import pareto_points, points_study, write_report
from sweeps.storage import quiet_experimental

OBJECTIVES = {"eval/fid": "minimize", "infer/peak_mem_mb": "minimize"}


def study_with(points: list[tuple[int, int, float, float]]) -> optuna.Study:
    """(window, depth, fid, memory) per complete trial, as the sweep records them."""
    study = optuna.create_study(directions=["minimize", "minimize"])
    with quiet_experimental():
        study.set_metric_names(list(OBJECTIVES))
    dists = {"model.window_size": optuna.distributions.CategoricalDistribution([1, 3, 5]),
             "model.depth": optuna.distributions.CategoricalDistribution([1, 2, 3])}
    for window, depth, fid, mem in points:
        study.add_trial(optuna.create_trial(params={"model.window_size": window, "model.depth": depth},
                                            distributions=dists, values=[fid, mem],
                                            user_attrs={"eval/fid": fid, "infer/peak_mem_mb": mem}))
    return study


def test_report_files_and_the_pareto_front(tmp_path):
    study = study_with([(1, 1, 9.0, 10.0), (3, 2, 8.0, 20.0), (5, 3, 8.5, 30.0), (3, 1, 7.0, 40.0)])
    files = write_report(study, OBJECTIVES, tmp_path)
    plots = {"pareto_front.png", "importances.png", "history_eval_fid.png", "history_infer_peak_mem_mb.png"}
    assert {f.name for f in files} == {"trials.csv", "cost.json", "importances.json"} | plots
    for name in plots:  # Optuna's matplotlib plots, written as PNG
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / name).stat().st_size > 10_000
    header = (tmp_path / "trials.csv").read_text().splitlines()[0]
    assert "values_eval/fid" in header and "params_model.window_size" in header and "user_attrs_eval/fid" in header
    _, front = pareto_points(study)
    assert [n for _, _, n in front] == [0, 1, 3]  # trial 2 (8.5 at 30 MB) is dominated by trial 1
    # the plotted study has the same front (Optuna draws its best trials as the front)
    assert sorted(t.user_attrs["number"] for t in points_study(study).best_trials) == [0, 1, 3]
    result = json.loads((tmp_path / "importances.json").read_text())
    assert set(result) == set(OBJECTIVES) and set(result["eval/fid"]) == {"model.window_size", "model.depth"}


def test_report_with_too_few_trials_says_why(tmp_path):
    files = write_report(study_with([(1, 1, 9.0, 10.0)]), OBJECTIVES, tmp_path)
    assert "importances.png" not in {f.name for f in files}
    result = json.loads((tmp_path / "importances.json").read_text())
    assert all("too small" in v["error"] for v in result.values())
    assert (tmp_path / "pareto_front.png").is_file() and (tmp_path / "history_eval_fid.png").is_file()


def test_a_trial_of_several_seeds_is_their_mean_with_each_seed_kept():
    """combine_seeds: the trial's user attrs; group_aggregates: the group run's metrics (mvar report's names)."""
    import numpy as np
    import pytest

    from sweeps.objective import combine_seeds, group_aggregates
    per_seed = {3: {"eval/fid": 41.5, "infer/peak_mem_mb": 20.0, "val/loss": 2.5},
                4: {"eval/fid": 43.0, "infer/peak_mem_mb": 20.5},
                5: {"eval/fid": 42.1, "infer/peak_mem_mb": 19.0}}
    fids = np.array([41.5, 43.0, 42.1])
    attrs = combine_seeds(per_seed)
    assert attrs["eval/fid"] == pytest.approx(fids.mean()) and attrs["eval/fid_std"] == pytest.approx(fids.std(ddof=1))
    assert [attrs[f"seed{s}/eval/fid"] for s in (3, 4, 5)] == [41.5, 43.0, 42.1]
    assert "val/loss" not in attrs and "seed3/val/loss" not in attrs  # a metric not every seed has: not averaged
    assert attrs["infer/peak_mem_mb"] == pytest.approx(59.5 / 3)
    group = group_aggregates(per_seed)
    assert set(group) == {f"{m}_{a}" for m in ("eval_fid", "infer_peak_mem_mb") for a in ("mean", "std", "n")}
    assert group["eval_fid_mean"] == attrs["eval/fid"] and group["eval_fid_std"] == attrs["eval/fid_std"]
    assert group["eval_fid_n"] == 3


def test_device_hours_are_summed_over_a_trials_seeds_and_over_the_study(tmp_path):
    """A trial of one run holds its cost; one of several seeds their mean, the seeds' own under seed<k>/."""
    import csv

    import pytest

    from sweeps.driver import summary
    from sweeps.objective import combine_seeds
    from sweeps.report import study_device_hours, trial_device_hours
    study = study_with([(1, 1, 9.0, 10.0), (3, 2, 8.0, 20.0)])  # trials 0 and 1: no cost recorded
    seeds = {3: {"eval/fid": 8.1, "cost/device_hours": 2.0}, 4: {"eval/fid": 8.3, "cost/device_hours": 2.5},
             5: {"eval/fid": 8.2, "cost/device_hours": 3.0}}
    dists = {"model.window_size": optuna.distributions.CategoricalDistribution([1, 3, 5]),
             "model.depth": optuna.distributions.CategoricalDistribution([1, 2, 3])}
    for attrs in ({"eval/fid": 7.5, "infer/peak_mem_mb": 30.0, "cost/device_hours": 1.5},
                  {**combine_seeds(seeds), "infer/peak_mem_mb": 25.0}):
        study.add_trial(optuna.create_trial(params={"model.window_size": 5, "model.depth": 3}, distributions=dists,
                                            values=[attrs["eval/fid"], attrs["infer/peak_mem_mb"]], user_attrs=attrs))
    assert study.trials[3].user_attrs["cost/device_hours"] == pytest.approx(2.5)  # the seeds' mean ...
    assert trial_device_hours(study) == pytest.approx({2: 1.5, 3: 7.5})           # ... but the trial cost their sum
    assert study_device_hours(study) == pytest.approx(9.0) == summary(study)["cost/device_hours"]
    write_report(study, OBJECTIVES, tmp_path)
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost == {"device_hours": {"2": pytest.approx(1.5), "3": pytest.approx(7.5)}, "total": pytest.approx(9.0)}
    with open(tmp_path / "trials.csv") as fh:
        hours = [row["device_hours"] for row in csv.DictReader(fh)]
    assert hours[:2] == ["", ""] and [float(h) for h in hours[2:]] == pytest.approx([1.5, 7.5])
