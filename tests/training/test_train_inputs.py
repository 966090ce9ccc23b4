"""Bad input to workflows.train fails with a message naming the key, before Ray or any worker starts."""
from __future__ import annotations

import glob
import math
import re

import pytest

from mvar.errors import UserError
from mvar.training import load_train_config
from mvar.training.launch import prepare
from workflows.train import main

LOCAL = "workflows/configs/mvar_tiny_local.yaml"


@pytest.fixture(autouse=True)
def no_ray_started(monkeypatch):
    """A bad-input run must fail before it starts or joins a Ray. Refusing the connection (rather than
    asking whether a Ray is up) holds whatever another test of the session left running."""
    import ray
    from mvar import cluster

    def refuse(*args, **kwargs):
        raise AssertionError("a bad-input run must fail before Ray starts")
    monkeypatch.setattr(cluster, "connect", refuse)
    monkeypatch.setattr(ray, "init", refuse)
    yield


@pytest.mark.parametrize("override, message", [
    ("model.depthh=3", "unknown config key 'model.depthh'"),
    ("run.steps=0", "config key 'run.steps': must be >= 1"),
    ("model_name=mvar-d99", "config key 'model_name': unknown model 'mvar-d99'"),
    ("train.scale_schedule=cycle model.attention=var", "train.scale_schedule"),
    ("model.window_size=5", "model.window_size"),  # larger than the tiny model's first windowed scale (3x3)
])
def test_config_errors_name_the_key(tiny_inputs, capsys, override, message):
    rc = main(["--config", LOCAL, *tiny_inputs.overrides("bad"), *override.split()])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_missing_shards_fail_before_training(tiny_inputs, capsys):
    missing = tiny_inputs.root / "nowhere"
    rc = main(["--config", LOCAL, *tiny_inputs.overrides("bad"), f"data.shards={missing}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "data.shards" in err and str(missing) in err


def test_token_shards_of_another_tokenizer_are_refused(tiny_inputs, tmp_path):
    import torch

    from mvar.checkpoint import save_tokenizer
    from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
    torch.manual_seed(1)
    cfg = TokenizerConfig.tiny()
    save_tokenizer(tmp_path / "other", MultiScaleVQVAE(cfg), cfg)
    cfg = load_train_config(LOCAL, tiny_inputs.overrides("bad", tokenizer=tmp_path / "other"))
    with pytest.raises(UserError, match="data.shards: .*made with tokenizer sha256"):
        prepare(cfg)


def test_missing_tokenizer_and_wrong_init_weights(tiny_inputs, tmp_path):
    cfg = load_train_config(LOCAL, tiny_inputs.overrides("bad", tokenizer=tmp_path / "none"))
    with pytest.raises(UserError, match="is not a tokenizer checkpoint"):
        prepare(cfg)
    from mvar.checkpoint import load_tokenizer, save_checkpoint
    from mvar.models import NextScaleTransformer, named_model
    tok, tok_cfg = load_tokenizer(tiny_inputs.tokenizer)
    other = NextScaleTransformer(named_model("var-tiny", depth=3), 32, 8, (1, 2, 3, 4))
    save_checkpoint(tmp_path / "d3", other, tok, tok_cfg)
    cfg = load_train_config(LOCAL, tiny_inputs.overrides("bad", init_from=tmp_path / "d3"))
    with pytest.raises(UserError, match="init_from: .* has depth 3, this run's model has 2"):
        prepare(cfg)


def test_model_name_fills_the_model_section_and_yaml_wins(tmp_path):
    cfg = load_train_config(LOCAL, ["tokenizer=t", "data.shards=s", "model.window_size=1"])
    assert cfg.model.depth == 2 and cfg.model.attention == "mvar" and cfg.model.window_size == 1
    assert cfg.run.name == "mvar_tiny_local"  # rerunning the same config resumes the same run


@pytest.mark.parametrize("path", sorted(p for p in glob.glob("workflows/configs/*.yaml") if "tokenizer" not in p))
def test_every_shipped_training_config_resolves(path):
    cfg = load_train_config(path)
    assert cfg.model.attention in ("var", "scale_markov", "mvar") and (cfg.run.steps > 0 or cfg.run.epochs > 0)
    if "_in256" in path or "_ft_" in path:
        assert cfg.scaling.use_gpu and cfg.scaling.num_workers == 8
        assert cfg.train.schedule_for(cfg.model.attention) == ("full" if cfg.model.attention == "var" else "cycle")
        assert cfg.tokenizer.startswith("/") and cfg.run.storage_path.startswith("/")
        assert cfg.run.epochs > 0 and cfg.run.steps == 0  # the authors' epochs, turned into steps by prepare


# the authors' settings in a recipe: every such line names its source ([M5], [Vd] ... in the file's header)
SOURCED = {"model": None, "optim": None, "train": None, "sampling": None, "data": ("batch_size",),
           "run": ("epochs",)}


@pytest.mark.parametrize("path", sorted(p for p in glob.glob("workflows/configs/*_in256.yaml") + glob.glob(
    "workflows/configs/*_ft_from_var.yaml") if "tokenizer" not in p))
def test_every_recipe_number_names_its_source(path):
    text = open(path).read()
    defined = set(re.findall(r"^#.*?(\[[A-Z][a-z0-9]?\]) =", text, re.M))  # [M5] = MVAR README ... in the header
    section, section_tag = None, None
    for line in text.splitlines():
        tag = re.search(r"# (\[\w+\])", line)
        if line and not line.startswith((" ", "#")):  # a top-level key or section
            section, section_tag = line.split(":")[0], tag
            assert section != "model_name" or tag, line
            continue
        key = line.strip().split(":")[0]
        keys = SOURCED.get(section, ())
        if line.startswith("  ") and not line.strip().startswith("#") and (keys is None or key in keys):
            found = tag or section_tag
            assert found, f"{path}: '{line.strip()}' names no source"
            assert found.group(1) in defined, f"{path}: {found.group(1)} is not defined in the header"


def test_epochs_become_steps_from_the_manifest_before_ray(tiny_inputs):
    from mvar.data.manifest import read_manifest
    cfg = load_train_config(LOCAL, tiny_inputs.overrides("epochs", **{"run.epochs": 2.5}))
    assert cfg.run.steps == 0
    prepare(cfg)
    samples = read_manifest(tiny_inputs.tokens).num_samples
    assert cfg.run.steps == math.ceil(2.5 * samples / (cfg.data.batch_size * cfg.scaling.num_workers))


@pytest.mark.parametrize("override, message", [
    ("model.attention=scale_markov model.markov_from_scale=4", "'model.markov_from_scale': is 4: the scale cycle"),
    ("train.cycle_ratio=0", "'train.cycle_ratio': must be >= 1"),
    ("optim.hold_ratio=1.0", "'optim.hold_ratio': must lie in [0, 1)"),
    ("run.epochs=2", "'run.steps' and 'run.epochs' are exclusive"),
])
def test_cycle_schedule_and_length_errors_name_the_key_before_ray(tiny_inputs, capsys, override, message):
    extra = override.split()
    if "run.epochs" in override:
        extra.append("run.steps=5")  # both on the command line
    rc = main(["--config", LOCAL, *tiny_inputs.overrides("bad"), *extra])
    assert rc == 2
    assert message in capsys.readouterr().err


def test_relative_paths_are_refused_inside_a_ray_job(tiny_inputs, monkeypatch):
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", '{"metadata": {"job_submission_id": "raysubmit_1"}}')
    cfg = load_train_config(LOCAL, tiny_inputs.overrides("bad", **{"run.storage_path": "out/runs"}))
    with pytest.raises(UserError, match="'run.storage_path': 'out/runs' is relative, but a Ray job"):
        prepare(cfg)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_train_config(LOCAL, tiny_inputs.overrides("bad", **{"tracking.uri": "''"}))
    with pytest.raises(UserError, match="'tracking.uri': not set and no MLFLOW_TRACKING_URI"):
        prepare(cfg)
    from mvar import cluster
    assert cluster.job_id() == "raysubmit_1"


def test_a_config_is_validated_once_at_load_and_crosses_to_the_workers_as_itself(monkeypatch, tmp_path):
    """The registry entry of `model_name` is merged as plain keys (no ModelConfig built and validated on the
    way), and the driver hands Ray Train the loaded config object, not a dict the worker rebuilds."""
    from mvar.models.config import ModelConfig
    from mvar.training import driver, launch
    from mvar.training.tasks import GENERATOR
    calls = []
    validate = ModelConfig.validate
    monkeypatch.setattr(ModelConfig, "validate", lambda self, prefix="": calls.append(prefix) or validate(self, prefix))
    cfg = load_train_config(LOCAL, [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    assert calls == ["model."] and cfg.model.attention == "mvar" and cfg.model.depth == 2
    seen = {}
    monkeypatch.setattr(launch, "fit", lambda cfg, fn, loop_config, storage, evaluator=None:
                        seen.update(loop_config) or 1 / 0)
    monkeypatch.setattr(driver, "attach_run", lambda *a: ("run-1", False))
    monkeypatch.setattr(driver.Store, "set_tags", lambda *a: None)
    monkeypatch.setattr(driver, "log_config", lambda *a: None)
    monkeypatch.setattr(driver, "log_datasets", lambda *a: None)
    monkeypatch.setattr(launch.cluster, "connect", lambda **kw: "local")  # Ray's side: the slow tests run it
    monkeypatch.setattr(launch, "check_resources", lambda *a: None)
    with pytest.raises(ZeroDivisionError):
        launch.launch(GENERATOR, cfg, checked={})
    assert seen["train"] is cfg and seen["run_id"] == "run-1" and calls == ["model."]


def test_check_runs_every_check_of_the_run_prints_ok_and_makes_nothing(tiny_inputs, tmp_path, capsys, monkeypatch):
    from mvar.cli import main as mvar_main
    store = tmp_path / "mlflow.db"
    argv = ["--config", LOCAL, *tiny_inputs.overrides("checked", **{"tracking.uri": f"sqlite:///{store}"}), "--check"]
    assert main(argv) == 0 and mvar_main(["train", *argv]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1] and out[0].startswith("OK: run 'checked'")
    assert not store.exists() and not (tiny_inputs.root / "runs" / "checked").exists()
    assert main([*argv, f"tokenizer={tmp_path}"]) == 2
    assert "is not a tokenizer checkpoint" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main([*argv, f"tracking.uri=http://127.0.0.1:{port}"]) == 2
    assert "does not answer" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--repeats", "0"], "workflows.train: error: --repeats: must be >= 1 (the number of training seeds), got 0"),
    (["--repeats", "-2"], "workflows.train: error: --repeats: must be >= 1 (the number of training seeds), got -2"),
    (["run.repeats=0"], "workflows.train: error: config key 'run.repeats': must be >= 1 (the number of training "
                        "seeds), got 0"),
])
def test_repeats_below_one_are_refused_in_one_line(tiny_inputs, capsys, args, message):
    rc = main(["--config", LOCAL, *tiny_inputs.overrides("bad"), *args])
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [message]


def test_the_repeats_flag_is_run_repeats_and_wins_over_the_overrides(tiny_inputs, capsys):
    import yaml
    assert main(["--config", LOCAL, *tiny_inputs.overrides("r"), "run.repeats=2", "--repeats", "3",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["run"]["repeats"] == 3
    assert main(["--config", LOCAL, *tiny_inputs.overrides("r"), "--repeats", "3", "--check"]) == 0
    assert capsys.readouterr().out.startswith("OK: run 'r', 200 steps x 3 seeds:")


def test_one_run_entry_points_refuse_several_seeds_naming_run_repeats(tiny_inputs):
    """`train` trains one run, and so does the tokenizer's training (`launch`): several seeds are train_repeats'."""
    from mvar.training import launch, train
    from mvar.training.tasks import TOKENIZER
    from mvar.training.tokenizer_config import load_tokenizer_train_config
    with pytest.raises(UserError, match=r"^run.repeats: 2 training seeds are trained by `mvar train`"):
        train(load_train_config(LOCAL, tiny_inputs.overrides("r", **{"run.repeats": 2})))
    tok = load_tokenizer_train_config("workflows/configs/tokenizer_tiny_local.yaml", ["run.repeats=2"])
    with pytest.raises(UserError, match=r"^run.repeats: 2 training seeds"):
        launch.launch(TOKENIZER, tok)


def test_seed_configs_differ_in_seed_and_name_only_and_share_the_group_key():
    from mvar.config import flatten
    from mvar.training.launch import group_key_of, seed_configs
    cfg = load_train_config(LOCAL, ["tokenizer=t", "data.shards=s", "run.seed=5", "run.repeats=3",
                                    "tracking.run_name=shown"])
    seeds = seed_configs(cfg, "group-run")
    assert [(c.run.seed, c.run.name, c.tracking.run_name) for c in seeds] == [
        (5, "mvar_tiny_local-seed5", "shown-seed5"), (6, "mvar_tiny_local-seed6", "shown-seed6"),
        (7, "mvar_tiny_local-seed7", "shown-seed7")]
    assert all(c.run.repeats == 1 and c.tracking.parent_run_id == "group-run" for c in seeds)
    assert cfg.run.seed == 5 and cfg.run.repeats == 3 and cfg.tracking.parent_run_id == ""  # the base is kept
    differ = {k for k, v in flatten(seeds[0]).items() if flatten(seeds[1])[k] != v}
    assert differ == {"run.seed", "run.name", "tracking.run_name"}
    assert len({group_key_of(c) for c in [cfg, *seeds]}) == 1
    deeper = load_train_config(LOCAL, ["tokenizer=t", "data.shards=s", "model.depth=3"])
    assert group_key_of(deeper) != group_key_of(cfg)
