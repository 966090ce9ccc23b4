"""Evaluation in this process (no Ray): end to end into MLflow, reproducibility, resume, bad input."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from mvar import tracking
from mvar.cli import main as mvar_main
from mvar.config import ConfigError
from mvar.data.loader import open_shard_set
from mvar.data.synth import write_synth
from mvar.errors import UserError
from mvar.evaluation.run import evaluate
from mvar.metrics.fidelity import load_reference, save_reference
from mvar.metrics.images import iter_shard_images
from mvar.provenance import cpu_model
from mvar.tracking import TrackingConfig

SETTING = "cfg1.5-topk900-topp0.96"


def training_run(inputs, checkpoint: str | None = None) -> str:
    """A stand-in for a finished training run: tags as the training workflow sets them."""
    cfg = TrackingConfig(uri=inputs.tracking_uri, experiment="tests", system_metrics=False)
    tags = {"mvar.variant": "mvar", **({"mvar.checkpoint": checkpoint} if checkpoint else {})}
    run_id = tracking.start_run(cfg, "train-tiny", tags=tags)
    tracking.client(inputs.tracking_uri).set_terminated(run_id, "FINISHED")
    return run_id


def shard_bytes(out) -> dict[str, bytes]:
    samples = out / SETTING / "samples"
    return {p.name: p.read_bytes() for p in sorted(samples.glob("shard-*.tar"))}


def test_training_run_is_evaluated_end_to_end_and_logged(eval_inputs, tmp_path):
    run_id = training_run(eval_inputs, eval_inputs.checkpoint)
    # reference: the image shard set itself; its statistics are computed once and cached beside the samples
    [result] = evaluate(eval_inputs.config(tmp_path / "ev", run_id=run_id, track=True, checkpoint="",
                                           reference=eval_inputs.ref_shards))
    [cached] = (tmp_path / "ev").glob("reference-*.npz")
    assert load_reference(cached).num_images == 20
    assert result.run_id == run_id
    m = result.metrics
    assert m["eval/fid"] >= 0 and m["eval/is"] >= 1 and 0 <= m["eval/precision"] <= 1 and 0 <= m["eval/recall"] <= 1
    # KID: 20 samples and 20 reference images, so each subset is all of them (the std over subsets ~ 0)
    assert m["eval/kid_std"] == pytest.approx(0, abs=1e-4) and "eval/kid" in m
    assert m["infer/latency_s"] > 0 and m["infer/peak_mem_mb"] >= 0 and m["infer/kv_cache_mb"] == 0  # mvar: no cache
    # eval.bootstrap (100 resamples by default): an interval of the FID over the samples
    assert 0 <= m["eval/fid_boot_low"] < m["eval/fid_boot_high"] and m["eval/fid_boot_std"] > 0
    # samples: 2 of each of the 10 classes, as shards with a manifest and as ADM's .npz
    manifest = open_shard_set(str(result.out / "samples"), "images", 64)
    assert manifest.num_samples == 20 and len(manifest.shards) == 3  # shards of 8, 8, 4
    assert Counter(label for _, label in iter_shard_images(str(result.out / "samples"))) == {c: 2 for c in range(10)}
    with np.load(result.out / "samples.npz") as data:
        assert data["arr_0"].shape == (20, 64, 64, 3) and data["arr_0"].dtype == np.uint8
    assert Image.open(result.out / "grid.png").size == (8 * 66 + 2, 2 * 66 + 2)  # 8 classes x 2 per class
    assert json.loads((result.out / "metrics.json").read_text()) == pytest.approx(m)
    # the training run holds the metrics, the settings as params, the grid and the comparability tag
    c = tracking.client(eval_inputs.tracking_uri)
    run = c.get_run(run_id)
    assert run.data.metrics["eval/fid"] == pytest.approx(m["eval/fid"])
    assert {"eval/is", "eval/precision", "eval/recall", "infer/latency_s", "infer/peak_mem_mb", "eval/kid",
            "eval/kid_std", "infer/kv_cache_mb", "eval/fid_boot_std", "eval/fid_boot_low",
            "eval/fid_boot_high"} <= set(run.data.metrics)
    assert run.data.params["eval.cfg"] == "1.5" and run.data.params["eval.top_k"] == "900"
    assert run.data.params["eval.num_per_class"] == "2" and run.data.params["eval.seed"] == "0"
    assert run.data.tags["mvar.metrics_comparable"] == "false"
    assert run.data.tags["mvar.feature_extractor"] == "inception-v3-compat"  # never mixed with a classifier's
    # what sampled it, under eval_ names (the training run's own mvar.device_* tags are the training's)
    tags = run.data.tags
    assert (tags["mvar.eval_device_type"], tags["mvar.eval_device_count"]) == ("cpu", "1")
    assert tags["mvar.eval_device_model"] == cpu_model() and tags["mvar.eval_torch_version"] in torch.__version__
    assert "mvar.device_type" not in tags
    assert f"eval/{SETTING}/grid.png" in {a.path for a in c.list_artifacts(run_id, f"eval/{SETTING}")}
    assert run.info.status == "FINISHED"
    # the reference is the run's evaluation dataset, its digest from the shard manifest
    [ref] = tracking.Store(eval_inputs.tracking_uri).inputs(run_id)
    assert (ref.context, ref.source, ref.profile["num_samples"]) == ("evaluation", eval_inputs.ref_shards, 20)
    # another setting later: params are immutable, so it goes to a child run of the training run
    [child] = evaluate(eval_inputs.config(tmp_path / "ev", run_id=run_id, track=True, checkpoint="", cfg=[0.0],
                                          metrics=False))
    assert child.run_id != run_id
    child_run = c.get_run(child.run_id)
    assert child_run.data.tags["mlflow.parentRunId"] == run_id
    assert child_run.data.params["eval.cfg"] == "0.0" and "infer/latency_s" in child_run.data.metrics
    assert c.get_run(run_id).data.params["eval.cfg"] == "1.5"


def test_checkpoint_without_run_gets_its_own_run_and_several_settings_get_children(eval_inputs, tmp_path):
    cfg = eval_inputs.config(tmp_path / "ev", track=True, metrics=False, num_per_class=1, cfg=[0.0, 1.5])
    results = evaluate(cfg)
    c = tracking.client(eval_inputs.tracking_uri)
    parents = {c.get_run(r.run_id).data.tags["mlflow.parentRunId"] for r in results}
    assert len(parents) == 1 and len({r.run_id for r in results}) == 2
    parent = c.get_run(parents.pop())
    assert parent.info.run_name.startswith("eval-") and parent.info.status == "FINISHED"
    assert parent.data.tags["mvar.checkpoint"] == os.path.realpath(eval_inputs.checkpoint)
    # the same command again finds the same runs and reuses every shard
    again = evaluate(eval_inputs.config(tmp_path / "ev", track=True, metrics=False, num_per_class=1, cfg=[0.0, 1.5]))
    assert [r.run_id for r in again] == [r.run_id for r in results]
    assert all(r.reused_shards == 2 for r in again)


def test_same_seed_same_samples_and_an_interrupted_run_resumes(eval_inputs, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MVAR_PROGRESS", "1")  # the bar as on a terminal (mvar.progress)
    first = evaluate(eval_inputs.config(tmp_path / "a", metrics=False))[0]
    assert re.search(r"sample \S+ shards 0\+: 100%\|.*\| 20/20 ", capsys.readouterr().err)
    monkeypatch.delenv("MVAR_PROGRESS")  # stderr is no terminal here: no bars
    reference = shard_bytes(tmp_path / "a")
    assert len(reference) == 3
    evaluate(eval_inputs.config(tmp_path / "c", metrics=False))
    assert shard_bytes(tmp_path / "c") == reference  # same command, same images, byte for byte
    # interruption: shard 1 never finished (only a partial temp file is left), shards 0 and 2 did
    samples = first.out / "samples"
    (samples / "shard-000001.tar").unlink()
    (samples / ".mvar-data" / "shard-000001.tar.json").unlink()
    (samples / "shard-000001.tar.tmp-12345").write_bytes(b"partial")
    (samples / "manifest.json").unlink()
    kept = {n: os.stat(samples / n).st_mtime_ns for n in ("shard-000000.tar", "shard-000002.tar")}
    second = evaluate(eval_inputs.config(tmp_path / "a", metrics=False))[0]
    assert "sample " not in capsys.readouterr().err
    assert second.reused_shards == 2
    assert {n: os.stat(samples / n).st_mtime_ns for n in kept} == kept  # finished shards untouched
    assert not list(samples.glob("*.tmp-*"))                              # partial ones dropped, never reused
    assert shard_bytes(tmp_path / "a") == reference                       # and the redone shard is identical
    # another seed gives other images; other settings in the same directory are refused, not mixed
    evaluate(eval_inputs.config(tmp_path / "b", metrics=False, seed=1))
    assert all(shard_bytes(tmp_path / "b")[name] != data for name, data in reference.items())
    with pytest.raises(UserError, match="holds shards of another job"):
        evaluate(eval_inputs.config(tmp_path / "a", metrics=False, batch_size=4))


# -- bad input: a clear error before any sampling ------------------------------------------

def assert_refused_before_sampling(cfg, match: str, out) -> None:
    with pytest.raises(UserError, match=match):
        evaluate(cfg)
    assert not out.exists(), "nothing may be written before the inputs are checked"


def test_unknown_class_ids_are_refused(eval_inputs, tmp_path):
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", classes=[0, 3, 12]),
                                   r"eval.classes: ids \[12\] are outside \[0, 9\]", tmp_path / "o")


def test_reference_of_another_resolution_is_refused(eval_inputs, tmp_path):
    small = str(tmp_path / "ref32")
    write_synth(small, num_images=8, image_size=32, num_classes=10, seed=0, shard_size=8)
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", reference=small),
                                   "holds 32 px images but the model makes 64 px", tmp_path / "o")
    ref = load_reference(eval_inputs.ref_npz)
    ref.image_size = 32
    other = save_reference(tmp_path / "ref32.npz", ref)
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", reference=str(other)),
                                   "holds 32 px images but the model makes 64 px", tmp_path / "o")


def test_too_few_samples_for_precision_recall_k_are_refused(eval_inputs, tmp_path):
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", num_per_class=1, classes=[0, 1, 2]),
                                   r"eval.num_per_class: 3 samples .* more than eval.prc_neighborhood=3", tmp_path / "o")
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", num_per_class=3, prc_neighborhood=20),
                                   "reference .* has 20 images", tmp_path / "o")


def test_checkpoint_without_tokenizer_is_refused(eval_inputs, tmp_path):
    broken = tmp_path / "no-tokenizer"
    shutil.copytree(eval_inputs.checkpoint, broken)
    shutil.rmtree(broken / "tokenizer")
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", checkpoint=str(broken)),
                                   "has no tokenizer", tmp_path / "o")


def test_run_without_checkpoint_tag_or_unknown_run_is_refused(eval_inputs, tmp_path):
    run_id = training_run(eval_inputs)
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", run_id=run_id, track=True, checkpoint=""),
                                   "has no 'mvar.checkpoint' tag", tmp_path / "o")
    assert_refused_before_sampling(eval_inputs.config(tmp_path / "o", run_id="0123456789abcdef", track=True,
                                                      checkpoint=""), "not found", tmp_path / "o")


def test_config_errors_name_the_key(eval_inputs, tmp_path):
    with pytest.raises(ConfigError, match="eval.samples_per_shard"):
        eval_inputs.config(tmp_path, samples_per_shard=0)
    assert eval_inputs.config(tmp_path, batch_size=20, samples_per_shard=1024).eval.shard_size == 1020  # whole batches
    assert eval_inputs.config(tmp_path, batch_size=20, samples_per_shard=8).eval.shard_size == 20
    with pytest.raises(ConfigError, match="eval.reference"):
        eval_inputs.config(tmp_path, reference="")
    with pytest.raises(ConfigError, match="eval.attention"):
        eval_inputs.config(tmp_path, attention="full")
    with pytest.raises(ConfigError, match="eval.bootstrap"):
        eval_inputs.config(tmp_path, bootstrap=-1)


def test_cli_prints_one_line_and_exits_2_on_bad_input(eval_inputs, tmp_path, capsys):
    rc = mvar_main(["eval", "--checkpoint", eval_inputs.checkpoint, "--reference", eval_inputs.ref_npz,
                    "--feature-extractor-weights", eval_inputs.weights, "--classes", "0,99", "--num-workers", "0",
                    "--out", str(tmp_path / "o"), "--no-tracking"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "eval.classes" in err[0]


def test_relative_paths_are_refused_inside_a_ray_job(eval_inputs, tmp_path, monkeypatch):
    monkeypatch.setattr("mvar.cluster.in_ray_job", lambda: True)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(UserError, match="'eval.out_dir': 'rel/out' is relative"):
        evaluate(eval_inputs.config(tmp_path / "o", out_dir="rel/out"))
    with pytest.raises(UserError, match="'tracking.uri': not set"):
        evaluate(eval_inputs.config(tmp_path / "o", track=True, tracking={"uri": ""}))


def test_the_checkpoints_sampling_defaults_fill_what_is_not_given(eval_inputs, tmp_path):
    """A training run stores its `sampling.*` in checkpoint.yaml; eval.cfg / top_k / top_p left empty take them."""
    import yaml

    from mvar.evaluation.run import prepare
    from mvar.sampling import SamplingConfig
    own = tmp_path / "own"
    shutil.copytree(eval_inputs.checkpoint, own)
    meta = yaml.safe_load((own / "checkpoint.yaml").read_text())
    (own / "checkpoint.yaml").write_text(yaml.safe_dump({**meta, "sampling": {"cfg": 2.7, "top_k": 1200,
                                                                              "top_p": 0.99}}))
    cfg = eval_inputs.config(tmp_path / "ev", checkpoint=str(own), metrics=False)
    assert cfg.eval.settings(prepare(cfg).sampling) == [SamplingConfig(cfg=2.7, top_k=1200, top_p=0.99)]
    cfg = eval_inputs.config(tmp_path / "ev", checkpoint=str(own), metrics=False, cfg=[0.0, 1.5])
    assert [(s.cfg, s.top_k, s.top_p) for s in cfg.eval.settings(prepare(cfg).sampling)] == [
        (0.0, 1200, 0.99), (1.5, 1200, 0.99)]
    plain = eval_inputs.config(tmp_path / "ev", metrics=False)  # no `sampling` in it: the defaults
    assert plain.eval.settings(prepare(plain).sampling) == [SamplingConfig()]


def test_check_runs_every_check_prints_ok_and_samples_nothing(eval_inputs, tmp_path, capsys):
    from workflows.evaluate import main as workflow_main
    store = tmp_path / "mlflow.db"
    argv = ["--checkpoint", eval_inputs.checkpoint, "--reference", eval_inputs.ref_npz, "--feature-extractor-weights",
            eval_inputs.weights, "--out", str(tmp_path / "o"), "--tracking-uri", f"sqlite:///{store}",
            "eval.num_per_class=2", "eval.isc_splits=2", "--check"]
    assert mvar_main(["eval", *argv]) == 0 and workflow_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[0] == out[1] and out[0].startswith("OK: checkpoint ")
    assert "20 samples per setting, 1 setting(s)" in out[0]
    assert not (tmp_path / "o").exists() and not store.exists()
    assert mvar_main(["eval", *argv, "eval.classes=[0,99]"]) == 2
    assert "eval.classes: ids [99] are outside" in capsys.readouterr().err
