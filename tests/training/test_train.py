"""Real Ray Train runs (2 CPU workers on a local Ray) of tiny VAR and MVAR, tracked in a real MLflow store."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from mvar import tracking
from mvar.checkpoint import load_checkpoint, read_checkpoint_meta
from mvar.training import TrainingFailed, load_train_config, train, train_repeats
from mvar.training import run_dir as rundir
from mvar.training.launch import group_key_of

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("local_ray")]


def history(uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in tracking.client(uri).get_metric_history(run_id, key))


def fit_overrides(tiny_inputs, variant: str, **extra) -> list[str]:
    return tiny_inputs.overrides(f"{variant}-fit", **{"run.steps": 40, "run.checkpoint_every": 20, "run.log_every": 2,
                                                      "data.eval_shards": tiny_inputs.eval_tokens, **extra})


@pytest.mark.parametrize("variant", ["var", "mvar"])
def test_tiny_model_trains_and_the_run_holds_everything(tiny_inputs, variant, local_ray, capsys, step_tally,
                                                        tiny_classifier, checkpoint_eval_keys):
    """For var, each checkpoint evaluated beside the training too (checkpoint_eval), and system metrics
    sampled (each second: both workers are on this one node). Then, for mvar, a rerun with more steps: it
    continues the same MLflow run, and passes over its latest checkpoint, damaged (train_state.pt cut in
    half), for the one before."""
    evaluated = checkpoint_eval_keys(tiny_inputs, tiny_classifier) if variant == "var" else {}
    sampled = ["tracking.system_metrics=true", "tracking.system_metrics_interval_s=1"] if variant == "var" else []
    cfg = load_train_config(f"workflows/configs/{variant}_tiny_local.yaml",
                            fit_overrides(tiny_inputs, variant, **evaluated) + sampled)
    outcome = train(cfg)
    uri, run_id = cfg.tracking.uri, outcome.run_id
    run = tracking.client(uri).get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["model.attention"] == variant and run.data.params["run.steps"] == "40"
    assert run.data.tags["mvar.variant"] == variant and run.data.tags["mvar.git_commit"]
    assert run.data.tags["mvar.seed"] == "0" and run.data.tags["mvar.group"] == group_key_of(cfg)
    assert "mlflow.parentRunId" not in run.data.tags  # one seed: no group run
    assert run.data.tags["mvar.checkpoint"] == outcome.checkpoint
    losses = history(uri, run_id, "train/loss")
    assert [s for s, _ in losses] == list(range(2, 41, 2))  # every log step once
    first, last = sum(v for _, v in losses[:4]) / 4, sum(v for _, v in losses[-4:]) / 4
    assert last < first - 0.05, f"loss did not decrease: {first:.3f} -> {last:.3f}"
    for key in ("train/acc", "train/acc_s0", "train/lr", "train/grad_norm", "perf/step_s", "perf/images_per_s",
                "perf/peak_mem_mb", "perf/peak_rss_mb", "val/loss", "model/attn_gflops", "model/params_m",
                "cost/device_hours"):
        assert key in run.data.metrics, key
    # provenance: the workers' device type and count, the torch build
    tags = run.data.tags
    assert (tags["mvar.device_type"], tags["mvar.device_count"]) == ("cpu", str(cfg.scaling.num_workers))
    assert tags["mvar.device_model"] and tags["mvar.torch_version"] and tags["mvar.nccl_version"]
    assert [s for s, _ in history(uri, run_id, "val/loss")] == [20, 40]
    assert "config.yaml" in {a.path for a in tracking.client(uri).list_artifacts(run_id)}
    # the final checkpoint is a model checkpoint that sampling and evaluation load as they are
    meta = read_checkpoint_meta(outcome.checkpoint)
    assert meta["train"]["step"] == 40 and meta["train"]["mlflow_run_id"] == run_id
    _, _, mcfg, _ = load_checkpoint(outcome.checkpoint)
    assert mcfg.attention == variant
    # a sample grid per checkpoint in MLflow's image view (key `samples`, the checkpoint's step)
    images = [a.path for a in tracking.client(uri).list_artifacts(run_id, "images")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images
                  if p.startswith("images/samples+") and p.endswith(".png")) == [20, 40], images
    # the shard sets as MLflow datasets, their digest from the manifests' sha256 values
    inputs = {d.context: d for d in tracking.Store(uri).inputs(run_id)}
    assert {c: (d.name, d.source) for c, d in inputs.items()} == {
        "training": ("tokens", tiny_inputs.tokens), "evaluation": ("eval-tokens", tiny_inputs.eval_tokens)}
    assert inputs["training"].profile["num_samples"] == 160 and inputs["training"].profile["num_classes"] == 10
    assert len(inputs["training"].digest) == 16 and inputs["training"].digest != inputs["evaluation"].digest
    # the registry: the final checkpoint is models:/<variant>-tiny@final, the best by val/loss @best
    store = tracking.Store(uri)
    assert store.resolve_model(f"models:/{variant}-tiny@final") == outcome.checkpoint
    latest, best = (store.model_version(f"models:/{variant}-tiny@{a}") for a in ("final", "best"))
    assert latest["run_id"] == best["run_id"] == run_id and latest["mvar.step"] == "40"
    val = dict(history(uri, run_id, "val/loss"))
    assert float(best["val/loss"]) == pytest.approx(min(val.values()), rel=1e-5)
    assert best["mvar.step"] == str(min(val, key=val.get))
    if variant == "var":
        assert_one_system_metrics_sampler_per_node(uri, run_id)
    # 2 workers: rank 0's rendezvous store and both ranks' gloo sockets listen on loopback only
    local_ray.assert_listeners_on("127.0.0.1", expect=("RayTrainWorker", "gcs_server", "raylet"))
    if variant == "var":
        checkpoints_evaluated_beside_the_training(uri, run_id, outcome.checkpoint, best)
    if variant == "mvar":
        rerun_past_a_damaged_checkpoint(tiny_inputs, outcome, capsys, step_tally)


def checkpoints_evaluated_beside_the_training(uri: str, run_id: str, final: str, best: dict) -> None:
    """checkpoint_eval on Ray Train: Ray Train's validation task evaluated each checkpoint while the training
    went on (step 20's eval/fid reached the run after step 22's train/loss: the loop did not wait for it),
    each once, with finite values; Ray's checkpoint record holds them with each checkpoint, the registered
    versions too (@best by val/loss: checkpoint_eval.best_by unset)."""
    for key in ("eval/fid", "eval/kid", "eval/precision", "eval/recall", "eval/is", "eval/class_acc"):
        values = history(uri, run_id, key)
        assert [s for s, _ in values] == [20, 40] and all(math.isfinite(v) for _, v in values), (key, values)
    fid = dict(history(uri, run_id, "eval/fid"))
    client = tracking.client(uri)
    logged_at = {(m.key, m.step): m.timestamp for key in ("train/loss", "eval/fid")
                 for m in client.get_metric_history(run_id, key)}
    assert logged_at[("eval/fid", 20)] > logged_at[("train/loss", 22)], logged_at
    reg = rundir.registered(Path(final).parent)
    assert {n: reg.metrics[n]["eval/fid"] for n in reg.names} == pytest.approx(
        {"step_00000020": fid[20], "step_00000040": fid[40]})
    assert float(best["eval/fid"]) == pytest.approx(fid[int(best["mvar.step"])], rel=1e-4)


def assert_one_system_metrics_sampler_per_node(uri: str, run_id: str) -> None:
    """Both ranks run on this machine's one Ray node (node rank 0): rank 0 samples it, as system/node_0/*; rank 1
    (local rank 1 of the same node) samples nothing, so no step of a node's metric is there twice. A second node's
    first rank would log system/node_1/* (tests/test_tracking.py runs two nodes' samplers into one run)."""
    metrics = tracking.client(uri).get_run(run_id).data.metrics
    keys = sorted(k for k in metrics if k.startswith("system/"))
    assert keys and all(k.startswith("system/node_0/") for k in keys), keys
    assert {"system/node_0/cpu_utilization_percentage", "system/node_0/system_memory_usage_megabytes"} <= set(keys)
    steps = [s for s, _ in history(uri, run_id, "system/node_0/cpu_utilization_percentage")]
    assert len(steps) >= 2 and len(set(steps)) == len(steps), steps


def rerun_past_a_damaged_checkpoint(tiny_inputs, first, capsys, step_tally):
    state = Path(first.checkpoint) / "train_state.pt"
    assert state.parent.name == "step_00000040"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    capsys.readouterr()
    longer = train(load_train_config("workflows/configs/mvar_tiny_local.yaml",
                                     fit_overrides(tiny_inputs, "mvar") + ["run.steps=50"]))
    printed = capsys.readouterr().out
    assert f"checkpoint step_00000040 is damaged (cannot read train state file '{state}'" in printed, printed
    assert "the run resumes from step_00000020 (step 20)" in printed, printed
    assert longer.run_id == first.run_id and longer.step == 50
    uri = tiny_inputs.tracking_uri
    assert tracking.client(uri).get_run(first.run_id).data.tags["mvar.resumes"] == "1"
    # steps 21..40 were computed again: each is logged once all the same (0 lost, 0 duplicated)
    step_tally.of_run(uri, first.run_id, range(2, 51, 2), samples_per_step=32).assert_clean()
    assert [s for s, _ in history(uri, first.run_id, "val/loss")] == [20, 40, 50]
    images = [a.path for a in tracking.client(uri).list_artifacts(first.run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [20, 40, 50], images  # 40 once
    # the rewritten step 40 got a name of its own; Ray's retention (2) dropped the damaged one
    run_dir = Path(first.checkpoint).parent
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["step_00000040-2", "step_00000050"]


def test_nonfinite_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tiny_inputs):
    cfg = load_train_config("workflows/configs/mvar_tiny_local.yaml", tiny_inputs.overrides(
        "nan", **{"run.steps": 20, "run.checkpoint_every": 4, "run.log_every": 1, "run.fault_nan_at_step": 7}))
    with pytest.raises(TrainingFailed, match=r"stopped at step 7: the loss or a gradient is NaN.*step_00000004"):
        train(cfg)
    c = tracking.client(cfg.tracking.uri)
    run = c.search_runs([c.get_experiment_by_name("tests").experiment_id],
                        filter_string="tags.`mvar.run_key` LIKE '%/nan'")[0]
    assert run.info.status == "FAILED"
    assert max(s for s, _ in history(cfg.tracking.uri, run.info.run_id, "train/loss")) == 6


def test_repeats_train_each_seed_as_its_own_run_under_a_group_run(tiny_inputs, capsys):
    """`mvar train --repeats 2`: seeds 0 and 1, one after the other, each a run of its own nested under the
    group run; the same command again finds every run again and trains nothing (no Ray Train start)."""
    from mvar.cli import main
    argv = ["train", "--config", "workflows/configs/var_tiny_local.yaml", "--repeats", "2", *tiny_inputs.overrides(
        "rep", **{"run.steps": 4, "run.checkpoint_every": 4, "run.log_every": 1, "scaling.num_workers": 1,
                  "train.sample_images": 0})]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    uri = tiny_inputs.tracking_uri
    c, store = tracking.client(uri), tracking.Store(uri)
    [group] = c.search_runs([c.get_experiment_by_name("tests").experiment_id],
                            filter_string="tags.`mvar.group_run` = 'true' and attributes.run_name = 'rep'")
    gid, tags = group.info.run_id, group.data.tags
    assert f"group run {gid} (mvar.group {tags['mvar.group']}): 2 seeds" in printed, printed
    assert group.info.status == "FINISHED" and tags["mvar.seeds"] == "0,1" and "mvar.variant" not in tags
    assert group.data.params["run.repeats"] == "2" and group.data.params["model.attention"] == "var"
    seeds = [store.get(r) for r in store.children(gid)]  # oldest first: seed 0 trained first
    assert [(r.name, r.tags["mvar.seed"], r.params["run.seed"]) for r in seeds] == [
        ("rep-seed0", "0", "0"), ("rep-seed1", "1", "1")]
    for r in seeds:
        assert r.status == "FINISHED" and r.tags["mlflow.parentRunId"] == gid and r.tags["mvar.variant"] == "var"
        assert r.tags["mvar.group"] == tags["mvar.group"] and r.tags["mvar.run_key"].endswith(f"/{r.name}")
        assert [s for s, _ in history(uri, r.run_id, "train/loss")] == [1, 2, 3, 4]
        assert read_checkpoint_meta(r.tags["mvar.checkpoint"])["train"]["mlflow_run_id"] == r.run_id
        assert f"done: seed {r.tags['mvar.seed']}: 4 steps, MLflow run {r.run_id}" in printed
    assert history(uri, seeds[0].run_id, "train/loss") != history(uri, seeds[1].run_id, "train/loss")
    # a rerun (the python API the quickstart calls): the same group run and seed runs, nothing trained again
    cfg = load_train_config("workflows/configs/var_tiny_local.yaml", tiny_inputs.overrides(
        "rep", **{"run.steps": 4, "run.checkpoint_every": 4, "run.log_every": 1, "scaling.num_workers": 1,
                  "train.sample_images": 0, "run.repeats": 2}))
    outcomes = train_repeats(cfg)
    assert [(o.run_id, o.seed, o.step, o.group_run_id, o.group) for o in outcomes] == [
        (r.run_id, int(r.tags["mvar.seed"]), 4, gid, tags["mvar.group"]) for r in seeds]
    printed = capsys.readouterr().out
    assert printed.count("is finished already") == 2 and "Ray Train:" not in printed, printed
    again = store.get(gid)
    assert again.status == "FINISHED" and again.tags["mvar.resumes"] == "1" and len(store.children(gid)) == 2
