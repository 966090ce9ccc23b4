"""The tracking interface against a real MLflow SQLite store (and a server that is not there)."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from mvar import tracking
from mvar.errors import UserError
from mvar.tracking import MlflowTracker, TrackingConfig


@pytest.fixture()
def cfg(tmp_path):
    return TrackingConfig(uri=f"sqlite:///{tmp_path}/mlflow.db", experiment="t", system_metrics=False)


def test_run_holds_params_tags_metrics_and_artifacts(cfg, tmp_path):
    run_id = tracking.start_run(cfg, "r1", tags={"mvar.variant": "mvar"})
    t = MlflowTracker(run_id, cfg)
    t.log_params({"model": {"depth": 2, "attention": "mvar"}, "optim": {"lr": 1e-4}})
    for step in range(1, 4):
        t.log_metrics({"train/loss": 3.0 - step}, step)
    (tmp_path / "a.txt").write_text("hello")
    t.log_artifact(tmp_path / "a.txt", "files")
    t.log_text("x: 1\n", "config.yaml")
    t.close()
    c = tracking.client(cfg.uri)
    run = c.get_run(run_id)
    assert run.data.params["model.depth"] == "2" and run.data.params["optim.lr"] == "0.0001"
    assert run.data.tags["mvar.variant"] == "mvar" and run.data.tags["mvar.git_commit"]
    # MLflow's own source tags: the UI's Source, Version and User columns
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == tracking.git_commit().removesuffix("-dirty")
    assert len(tags["mlflow.source.git.commit"]) == 40 and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.name"]
    assert run.info.status == "FINISHED"
    assert [m.step for m in c.get_metric_history(run_id, "train/loss")] == [1, 2, 3]
    assert tracking.last_logged_step(run_id, "train/loss", cfg.uri) == 3
    names = {a.path for a in c.list_artifacts(run_id)} | {a.path for a in c.list_artifacts(run_id, "files")}
    assert {"config.yaml", "files/a.txt"} <= names
    # artifacts sit beside the database, not in the working directory
    assert str(tmp_path) in run.info.artifact_uri


def test_source_name_is_the_command_or_the_checkout_path():
    root = str(Path(tracking.__file__).resolve().parents[1])
    assert tracking.source_name(["/usr/bin/mvar", "train", "--config", "x.yaml"]) == "mvar train"
    assert tracking.source_name(["/venv/bin/mvar", "--help"]) == "mvar"
    assert tracking.source_name([f"{root}/mvar/cli.py", "eval", "--run-id", "r"]) == "mvar eval"
    assert tracking.source_name([f"{root}/workflows/train.py", "--config", "x"]) == "workflows/train.py"
    assert tracking.source_name(["/elsewhere/tool.py"]) == "tool.py"


def test_params_past_one_batch_and_past_the_value_limit_reach_the_store(cfg):
    """MLflow's client splits a batch of > 100 params and its store truncates a value of > 6000 characters:
    the tracker hands both over as they are."""
    run_id = tracking.start_run(cfg, "many")
    t = MlflowTracker(run_id, cfg)
    t.log_params({"p": {f"k{i:03d}": i for i in range(250)}, "long": "x" * 7000})
    t.close()
    assert t.failures == 0
    params = tracking.client(cfg.uri).get_run(run_id).data.params
    assert len(params) == 251 and params["p.k249"] == "249"
    assert params["long"] == "x" * 6000


def test_resumed_tracker_skips_steps_already_logged_per_key(cfg):
    run_id = tracking.start_run(cfg, "r2")
    first = MlflowTracker(run_id, cfg)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0}, step)
    first.log_metrics({"val/loss": 1.0}, 2)  # killed after train/loss of step 3, before its val/loss
    first.close(status="")
    assert tracking.logged_steps(run_id, cfg.uri) == {"train/loss": 3, "val/loss": 2}
    second = MlflowTracker(run_id, cfg, skip_logged=True)
    for step in (2, 3, 4, 5):
        second.log_metrics({"train/loss": 2.0}, step)
        second.log_metrics({"val/loss": 2.0}, step)
    second.close()
    history = tracking.client(cfg.uri).get_metric_history
    assert sorted(m.step for m in history(run_id, "train/loss")) == [1, 2, 3, 4, 5]
    assert sorted((m.step, m.value) for m in history(run_id, "val/loss")) == [(2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_server_that_is_gone_does_not_raise(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}", system_metrics=False, retry_s=1.0,
                         flush_timeout_s=20)
    t = MlflowTracker("0" * 32, cfg)
    start = time.monotonic()
    t.log_metrics({"train/loss": 1.0}, 1)  # returns at once: sending happens in the background
    assert time.monotonic() - start < 1.0
    t.close()
    assert t.failures >= 1


def test_flush_returns_once_everything_queued_is_sent_and_gives_up_after_its_timeout(cfg, monkeypatch):
    run_id = tracking.start_run(cfg, "r3")
    t = MlflowTracker(run_id, cfg)
    for step in range(1, 6):
        t.log_metrics({"train/loss": 1.0}, step)
    assert t.flush()
    assert tracking.last_logged_step(run_id, "train/loss", cfg.uri) == 5  # sent before flush returned
    t.close()
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    gone = MlflowTracker("0" * 32, TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}", system_metrics=False,
                                                  retry_s=30.0, flush_timeout_s=1.0))
    gone.log_metrics({"train/loss": 1.0}, 1)
    start = time.monotonic()
    assert not gone.flush()  # the server is not there: a bounded wait, then training goes on
    assert time.monotonic() - start < 5.0
    gone.close()


def test_unreachable_store_is_a_clear_error_before_work(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(UserError, match="does not answer"):
        tracking.start_run(cfg, "r")


def test_relative_sqlite_uri_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_uri("sqlite:///x/m.db") == f"sqlite:///{tmp_path}/x/m.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_uri("") == f"sqlite:///{tmp_path}/out/mlflow/mlflow.db"
    with pytest.raises(UserError, match="no scheme"):
        tracking.resolve_uri("somewhere")


def test_store_finds_or_creates_runs_by_key_nests_children_and_ends_them(cfg):
    store = tracking.Store(cfg.uri)
    assert store.find_run("t", {"mvar.run_key": "a"}) is None  # no experiment yet: nothing found, nothing made
    run_id, found = store.find_or_create("t", {"mvar.run_key": "a"}, "first", {"mvar.variant": "mvar"})
    assert not found and store.find_or_create("t", {"mvar.run_key": "a"}, "again")[0:2] == (run_id, True)
    run = store.get(run_id)
    assert (run.name, run.status, run.tags["mvar.variant"], run.tags["mvar.run_key"]) == ("first", "RUNNING", "mvar", "a")
    kids = [store.find_or_create("t", {"mvar.trial": str(i)}, f"trial-{i}", parent=run_id)[0] for i in (0, 1)]
    assert store.children(run_id) == kids and store.children(run_id, {"mvar.trial": "1"}) == kids[1:]
    assert store.find_or_create("t", {"mvar.trial": "0"}, "x", parent=run_id) == (kids[0], True)
    grandchild, found = store.find_or_create("t", {"mvar.trial": "0"}, "x", parent=kids[1])
    assert not found and store.children(kids[1]) == [grandchild]  # the key is looked up under its parent only
    t = MlflowTracker(run_id, cfg)
    for step, value in ((2, 0.5), (1, 1.0), (3, 0.25)):
        t.log_metrics({"val/loss": value}, step)
    t.close(status="")
    assert store.history(run_id, "val/loss") == [(1, 1.0), (2, 0.5), (3, 0.25)]
    store.set_tags(run_id, {"mvar.resumes": 1, "mvar.checkpoint": "/ckpt"})
    store.terminate(run_id, "KILLED")
    run = store.get(run_id)
    assert run.status == "KILLED" and run.tags["mvar.resumes"] == "1" and run.metrics == {"val/loss": 0.25}
    store.reopen(run_id)
    assert store.get(run_id).status == "RUNNING"
    assert {r.run_id for r in store.runs("t")} == {run_id, *kids, grandchild}
    with pytest.raises(UserError, match="no MLflow experiment 'nope'"):
        store.runs("nope")
    with pytest.raises(UserError, match="MLflow run 'f00' not found in sqlite:///"):
        store.get("f00")
    assert not store.exists("f00") and store.exists(run_id)


def test_store_registers_checkpoints_as_model_versions_and_resolves_aliases(cfg, tmp_path):
    store = tracking.Store(cfg.uri)
    run_id = store.create_run("t", "train")
    first = store.register_model("mvar-tiny", run_id, str(tmp_path / "step_1"))
    second = store.register_model("mvar-tiny", run_id, str(tmp_path / "step_2"), tags={"mvar.step": "2"})
    assert (first, second) == ("1", "2")
    assert store.register_model("mvar-tiny", run_id, str(tmp_path / "step_1")) == "1"  # a rerun: the same version
    third = store.register_model("mvar-tiny", run_id, str(tmp_path / "step_3"), step=3, metrics={"val/loss": 2.5})
    mv = store.model_version(f"models:/mvar-tiny/{third}")
    assert (mv["mvar.step"], mv["val/loss"], mv["run_id"]) == ("3", "2.5", run_id)
    model = tracking.client(cfg.uri).get_logged_model(mv["mvar.logged_model"])  # MLflow 3's LoggedModel
    assert model.source_run_id == run_id and model.tags["val/loss"] == "2.5" and model.params["step"] == "3"
    assert store.history(run_id, "val/loss") == []  # the run's own history is left as it was
    store.set_alias("mvar-tiny", "best", first)
    assert store.resolve_model("models:/mvar-tiny@best") == str(tmp_path / "step_1")
    store.set_alias("mvar-tiny", "best", second)  # an alias moves
    assert store.resolve_model("models:/mvar-tiny@best") == str(tmp_path / "step_2")
    assert store.resolve_model("models:/mvar-tiny/1") == str(tmp_path / "step_1")
    assert store.resolve_model("models:/mvar-tiny/latest") == str(tmp_path / "step_3")  # MLflow's newest version
    with pytest.raises(UserError, match=r"'models:/mvar-tiny@nope' is not a registered model version .*mvar-tiny"):
        store.resolve_model("models:/mvar-tiny@nope")
    for bad in ("mvar-tiny@best", "models:/mvar-tiny", "models:/@best", "models:/a/b@c"):
        with pytest.raises(UserError, match="not of the form models:/NAME@ALIAS"):
            store.resolve_model(bad)


def test_a_shard_manifest_is_a_dataset_of_the_run_logged_once(cfg):
    from dataclasses import replace

    from mvar.data.manifest import Manifest, ShardInfo, describe
    shards = [ShardInfo("shard-000000.tar", 40, "a" * 64, 1000), ShardInfo("shard-000001.tar", 20, "b" * 64, 500)]
    manifest = Manifest("images", 60, ["cat", "dog"], 64, "png", shards)
    d = describe(manifest, "/data/train-images/")
    assert (d["name"], d["source"]) == ("train-images", "/data/train-images/")
    assert d["profile"]["num_samples"] == 60 and d["profile"]["classes"] == ["cat", "dog"]
    other = describe(replace(manifest, shards=[shards[0], replace(shards[1], sha256="c" * 64)]), "/data/train-images")
    assert other["digest"] != d["digest"]  # other bytes, other digest
    store = tracking.Store(cfg.uri)
    run_id = store.create_run("t", "train")
    records = [tracking.DatasetRecord(**d, context="training"), tracking.DatasetRecord(**other, context="evaluation")]
    store.log_inputs(run_id, records)
    store.log_inputs(run_id, records)  # a resumed run logs them again: still one record each
    assert sorted(store.inputs(run_id), key=lambda r: r.context) == sorted(records, key=lambda r: r.context)


def test_mlflow_gpu_system_metrics_have_nvidia_ml_py():
    """MLflow's GPU sampler needs pynvml (nvidia-ml-py, a dependency, also pinned in the cluster image): here it
    gets past the import and, where no GPU is, stops at NVML's own init instead; on a GPU it samples."""
    import re
    from pathlib import Path

    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor
    repo = Path(__file__).resolve().parents[1]
    pins = [re.findall(r'"nvidia-ml-py==([\d.]+)"', (repo / f).read_text())
            for f in ("pyproject.toml", "infra/cluster/Dockerfile")]
    assert pins[0] and pins[0] == pins[1], pins
    try:
        monitor = GPUMonitor()
    except RuntimeError as err:  # no GPU or driver on this machine
        assert "Failed to initialize NVML" in str(err)
    else:
        monitor.collect_metrics()
        assert any(k.startswith("gpu_0_") for k in monitor.metrics)


def test_a_resumed_tracker_logs_no_second_sample_image_for_a_step(cfg):
    import numpy as np
    run_id = tracking.start_run(cfg, "images")
    image = np.zeros((8, 8, 3), np.uint8)
    first = MlflowTracker(run_id, cfg)
    first.log_image(image, "samples", 10)
    first.close(status="")
    second = MlflowTracker(run_id, cfg, skip_logged=True)  # resumed from step 0: step 10's checkpoint again
    second.log_image(image, "samples", 10)
    second.log_image(image, "samples", 20)
    second.close()
    c = tracking.client(cfg.uri)
    pngs = sorted(a.path.rsplit("/", 1)[-1].split("+")[2] for a in c.list_artifacts(run_id, "images")
                  if a.path.endswith(".png"))
    assert pngs == ["10", "20"]
    assert tracking.logged_image_steps(c, run_id, "samples") == {10, 20}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny MVAR checkpoint with seeded random weights, its own sampling settings, and an optimizer state that
    the registered model leaves out."""
    import torch

    from mvar.checkpoint import save_checkpoint
    from mvar.models import NextScaleTransformer, named_model
    from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.tiny()
    model = NextScaleTransformer(named_model("mvar-tiny"), tok_cfg.vocab_size, tok_cfg.z_channels, tok_cfg.patch_nums)
    out = save_checkpoint(tmp_path_factory.mktemp("pyfunc") / "step_00000002", model, MultiScaleVQVAE(tok_cfg),
                          tok_cfg, extra={"sampling": {"cfg": 2.0, "top_k": 50, "top_p": 0.9}})
    torch.save({"optimizer": {}, "scheduler": {}, "step": 2}, out / "train_state.pt")
    return out


def test_a_loadable_version_is_an_mlflow_pyfunc_that_samples_the_checkpoints_images(cfg, tiny_checkpoint):
    """models:/NAME@final loads with MLflow's own loader; predict takes a table of class ids (settings in optional
    columns, one value a call) and returns uint8 (N, H, W, 3): the images of the same sampling from the
    checkpoint (the checkpoint's own cfg / top-k / top-p unless given). Bad input: one line naming the column."""
    import mlflow.pyfunc
    import numpy as np
    import pandas as pd
    import torch

    from mvar.checkpoint import load_checkpoint
    from mvar.sampling import make_generator, sample_images
    store = tracking.Store(cfg.uri)
    run_id = store.create_run("t", "train")
    version = store.register_model("mvar-tiny", run_id, str(tiny_checkpoint), step=2, loadable=True)
    store.set_alias("mvar-tiny", "final", version)
    assert store.resolve_model("models:/mvar-tiny@final") == str(tiny_checkpoint)  # mvar sample --model: as before
    mv = store.model_version("models:/mvar-tiny@final")
    logged = tracking.client(cfg.uri).get_logged_model(mv["mvar.logged_model"])
    assert mv["source"] == logged.artifact_location and logged.model_type == "mvar-pyfunc"  # the pyfunc
    files = {a.path for a in tracking.client(cfg.uri).list_logged_model_artifacts(logged.model_id,
                                                                                  "artifacts/checkpoint")}
    assert files == {"artifacts/checkpoint/checkpoint.yaml", "artifacts/checkpoint/model.pt",
                     "artifacts/checkpoint/tokenizer"}  # no train_state.pt

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(cfg.uri)
    try:
        model = mlflow.pyfunc.load_model("models:/mvar-tiny@final", model_config={"device": "cpu"})
    finally:
        mlflow.set_tracking_uri(before)
    assert [c.name for c in model.metadata.get_input_schema().inputs][:2] == ["class_id", "num_per_class"]
    images = model.predict({"class_id": [3, 7], "num_per_class": 2, "seed": 5})
    assert images.dtype == np.uint8 and images.shape == (4, 64, 64, 3)
    gen, tok_model = make_generator(5, torch.device("cpu")), load_checkpoint(tiny_checkpoint)
    expected = sample_images(tok_model[0], tok_model[1], torch.tensor([3, 3, 7, 7]), cfg=2.0, top_k=50, top_p=0.9,
                             generator=gen)
    assert np.array_equal(images, expected.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy())
    again = model.predict(pd.DataFrame({"class_id": [3, 7], "num_per_class": [2, 2], "seed": [5, 5]}))
    assert np.array_equal(again, images)  # same input, same images; a DataFrame as a dict
    assert not np.array_equal(model.predict({"class_id": [3, 7], "num_per_class": 2, "seed": 6}), images)
    assert model.predict([{"class_id": 1, "cfg": 0.0, "top_k": 0, "top_p": 0.0}]).shape == (1, 64, 64, 3)
    for bad, message in ((pd.DataFrame({"class_id": [1, 2], "seed": [1, 2]}), "column 'seed' holds \\[1, 2\\]"),
                         ({"class_id": [10]}, "column 'class_id': ids \\[10\\] are outside \\[0, 9\\]"),
                         ({"class_id": [1], "top_p": 2.0}, "column 'top_p': 2 must lie in \\[0, 1\\]")):
        with pytest.raises(UserError, match=message):
            model.predict(bad)


def test_system_metrics_of_two_nodes_reach_one_run_under_their_node_ids(cfg):
    """MLflow's public API, one sampler per node (here two in threads of one process): each node's metrics
    under system/<node id>/, one value per step; the run keeps its status; the process-wide settings MLflow
    takes them from (node id, interval, tracking URI) are as they were; a sampler started again goes on after
    the last step."""
    import threading
    cfg = TrackingConfig(uri=cfg.uri, experiment="t", system_metrics=True, system_metrics_interval_s=0.2)
    run_id = tracking.start_run(cfg, "nodes")
    env = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_SYSTEM_METRICS_NODE_ID",
                                          "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")}
    rank0 = MlflowTracker(run_id, cfg)
    rank0.start_system_metrics(tracking.system_metrics_node(0))
    started, done = threading.Event(), threading.Event()

    def other_node() -> None:  # MLflow's active run is per thread: started and stopped in the same one
        node = tracking.NodeTracker(run_id, cfg, tracking.system_metrics_node(1))
        started.set()
        done.wait(30)
        node.close()

    node1 = threading.Thread(target=other_node)
    node1.start()
    started.wait(30)
    time.sleep(1.5)
    done.set()
    node1.join(30)
    rank0.close(status="")
    store = tracking.Store(cfg.uri)
    run = store.get(run_id)
    assert run.status == "RUNNING"
    keys = {k for k in run.metrics if k.startswith("system/")}
    for node in ("node_0", "node_1"):
        assert f"system/{node}/cpu_utilization_percentage" in keys, keys
    assert all(k.split("/")[1] in ("node_0", "node_1") for k in keys), keys  # nothing unnamed
    steps = [s for s, _ in store.history(run_id, "system/node_0/cpu_utilization_percentage")]
    assert len(steps) >= 2 and len(set(steps)) == len(steps)
    assert {k: os.environ.get(k) for k in env} == env
    resumed = MlflowTracker(run_id, cfg)
    resumed.start_system_metrics("node_0")
    time.sleep(0.6)
    resumed.close(status="")
    more = [s for s, _ in store.history(run_id, "system/node_0/cpu_utilization_percentage")]
    assert len(more) > len(steps) and min(more[len(steps):]) > max(steps)
