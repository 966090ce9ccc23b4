"""Bad study input fails before any trial starts, with an error that names the key; the shipped study files
resolve. No Ray, no training: seconds."""
from __future__ import annotations

from pathlib import Path

import optuna
import pytest
import yaml

from mvar.config import ConfigError
from sweeps.checks import check_space, common_overrides, points
from sweeps.run import main
from sweeps.storage import masked, storage_url
from sweeps.study import load_study, override

STUDIES = sorted(Path("sweeps").glob("*.yaml"))


def run_check(capsys, study: str, *args: str) -> tuple[int, str]:
    rc = main([study, "--check", *args])
    return rc, capsys.readouterr().err


def no_study_in(storage: str) -> bool:
    return not optuna.get_all_study_summaries(storage_url(storage))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_shipped_study_files_resolve_against_their_base_configs(path):
    study = load_study(path)
    assert study.study_name and study.objectives and study.n_trials >= 1
    check_space(study, common_overrides(study, []))  # every point loads and validates (no inputs needed)


def test_the_k_sweep_and_the_progressive_ablation_search_what_the_paper_varies():
    k_depth, ablation = load_study("sweeps/k_depth.yaml"), load_study("sweeps/ablation_progressive.yaml")
    assert k_depth.search_space["model.window_size"] == [3, 5, 7, 9] and "model.depth" in k_depth.search_space
    assert set(k_depth.objectives) == {"eval/fid", "infer/peak_mem_mb"}
    assert ablation.search_space == {"model.attention": ["var", "scale_markov", "mvar"]}
    assert ablation.sampler.name == "grid" and ablation.n_trials == 3


def test_override_values_survive_the_config_loader():
    from mvar.config import parse_overrides
    for value in (1e-05, 0.001, "var", "3", True, None, 3):
        key, = parse_overrides([override("a", value)]).values()
        assert key == value and type(key) is type(value)


def test_grid_points_cover_every_combination():
    assert points({"a": [1, 2], "b": ["x", "y", "z"]})[-1] == {"a": 2, "b": "z"}
    assert len(points({"a": [1, 2], "b": {"low": 0.1, "high": 1.0}})) == 4


@pytest.mark.parametrize("extra, key, message", [
    (["study.search_space.model.widow_size=[3]"], "search_space.model.widow_size",
     "not a key of the training config .* did you mean 'model.window_size'"),
    (["study.search_space.model.depth=[]"], "search_space.model.depth", "is an empty list"),
    (["study.objectives.eval/fdi=minimize"], "objectives.eval/fdi", "no run logs this metric"),
    (["study.objectives.eval/fid=lowest"], "objectives.eval/fid", "minimize or maximize"),
    (["study.sampler.name=cmaes"], "sampler.name", "one of 'tpe', 'nsga2', 'grid', 'random'"),
    (["study.pruner.name=median"], "pruner.name", "single-objective"),
    (["--n-trials", "7"], "n_trials", "more than the grid's 6 points"),
    (["study.storage=postgresql+psycopg2://optuna:secret@db:5432/optuna"], "storage", "holds a password"),
    (["study.search_space.run.name=[a]"], "search_space.run.name", "set by the sweep"),
    (["study.repeats=0"], "repeats", r"must be >= 1 \(training seeds per trial\), got 0"),
    (["study.repeats=-1"], "repeats", r"must be >= 1 \(training seeds per trial\), got -1"),
    (["study.search_space.run.repeats=[1,2]"], "search_space.run.repeats", "set by the sweep"),
    (["study.overrides.run.repeats=2"], "overrides.run.repeats", "use `repeats: N`"),
    (["run.repeats=2"], "run.repeats", "study.repeats=N"),
    (["model.attention=var", "train.scale_schedule=cycle"], "train.scale_schedule", "full sequences only"),
])
def test_bad_study_input_is_refused_naming_the_key(capsys, tmp_path, extra, key, message):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", "--storage", storage, *extra)
    assert rc == 2
    assert f"'{key}'" in err or f"{key}:" in err, err
    import re
    assert re.search(message, err), err
    assert no_study_in(storage)


def test_a_storage_that_does_not_answer_is_refused_before_anything(capsys):
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", "--storage", "postgresql://optuna@127.0.0.1:1/optuna")
    assert rc == 2 and "--storage 'postgresql+psycopg2://optuna@127.0.0.1:1/optuna' does not answer" in err, err
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", "--storage", "optuna.db")
    assert rc == 2 and "is not a database URL" in err


def test_passwords_are_masked_in_what_is_shown():
    assert masked("postgresql+psycopg2://optuna:secret@db:5432/optuna") == \
        "postgresql+psycopg2://optuna:***@db:5432/optuna"


def test_checks_that_need_the_inputs(capsys, tmp_path, sweep_inputs):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    args = ["--storage", storage, *sweep_inputs.args("checks")]
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", *args)
    assert rc == 0, err
    # a window larger than the first windowed scale of the tokenizer (3x3): found for the trial that would have it
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", *args, "study.search_space.model.window_size=[3,5]")
    assert rc == 2 and "model.window_size=5" in err and "larger than the first windowed scale" in err, err
    # an objective no run logs without data.eval_shards
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", *args, "data.eval_shards=",
                        "study.objectives.val/loss=minimize")
    assert rc == 2 and "'objectives.val/loss'" in err and "data.eval_shards" in err, err
    # the evaluation's metrics need a reference that exists
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", *args, f"study.eval.reference={tmp_path}/nothing.npz")
    assert rc == 2 and "eval.reference" in err, err
    rc, err = run_check(capsys, "sweeps/k_depth_tiny.yaml", *args, "study.eval.cfg=[1.5,2.0]")
    assert rc == 2 and "'eval.cfg'" in err, err
    assert no_study_in(storage)


def test_study_file_errors_name_the_file(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"base_config": "workflows/configs/mvar_tiny_local.yaml",
                                    "search_space": {"model.depth": [1]}, "objectives": {"eval/fid": "minimize"},
                                    "n_trials": 0}))
    with pytest.raises(ConfigError, match=r"study file '.*s.yaml': config key 'n_trials': must be >= 1"):
        load_study(path)
    assert load_study(path, ["n_trials=2"]).study_name == "s"
    path.write_text(yaml.safe_dump({"base_config": "workflows/configs/mvar_tiny_local.yaml",
                                    "search_space": {"model.depth": [1]}, "objectives": {"eval/fid": "minimize"},
                                    "repeats": 0}))
    with pytest.raises(ConfigError, match=r"study file '.*s.yaml': config key 'repeats': must be >= 1"):
        load_study(path)
    assert load_study(path, ["repeats=2"]).repeats == 2
