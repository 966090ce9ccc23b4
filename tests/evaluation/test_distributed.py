"""Evaluation on Ray: two CPU workers (0.5 CPU each) on one local Ray shared by the module."""
from __future__ import annotations

import json

import pytest

from mvar import tracking
from mvar.evaluation.run import evaluate, quality_metrics
from mvar.evaluation.workers import Workers
from workflows.evaluate import main as evaluate_main

from .test_evaluate import SETTING, shard_bytes, training_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def local_ray(listeners):
    """One local Ray (127.0.0.1, 2 CPUs) for the module; evaluations join it instead of starting their own.
    Yields a watch of the listening sockets of this process and all below it (the Ray and its workers)."""
    from mvar import cluster
    cluster.connect(num_cpus=2)
    try:
        with listeners.of_descendants() as watch:
            yield watch
    finally:
        cluster.shutdown()
    watch.assert_listeners_on("127.0.0.1")


def test_workflow_evaluates_a_training_run_on_two_ray_workers_with_the_same_images(eval_inputs, tmp_path, local_ray):
    run_id = training_run(eval_inputs, eval_inputs.checkpoint)
    rc = evaluate_main(["--run-id", run_id, "--tracking-uri", eval_inputs.tracking_uri,
                        "--reference", eval_inputs.ref_npz,
                        "--feature-extractor-weights", eval_inputs.weights, "--num-per-class", "2", "--seed", "0",
                        "--cfg", "1.5", "--top-k", "900", "--top-p", "0.96", "--batch-size", "8",
                        "--num-workers", "2", "--cpus-per-worker", "0.5", "--out", str(tmp_path / "ray"),
                        "--device", "cpu", "eval.samples_per_shard=8", "eval.isc_splits=2"])
    assert rc == 0
    import ray
    assert ray.is_initialized(), "an evaluation leaves a Ray it did not start running"
    run = tracking.client(eval_inputs.tracking_uri).get_run(run_id)
    assert {"eval/fid", "eval/is", "eval/precision", "eval/recall", "infer/latency_s", "infer/peak_mem_mb",
            "infer/kv_cache_mb"} <= set(run.data.metrics)
    assert run.data.tags["mvar.metrics_comparable"] == "false"
    # what sampled, as a sampling worker saw it: two CPU workers
    assert (run.data.tags["mvar.eval_device_type"], run.data.tags["mvar.eval_device_count"]) == ("cpu", "2")
    assert run.data.tags["mvar.eval_device_model"] and "eval/kid" in run.data.metrics
    # the same seed in one process (one worker) gives the same shards, byte for byte
    evaluate(eval_inputs.config(tmp_path / "one", metrics=False))
    assert shard_bytes(tmp_path / "one") == shard_bytes(tmp_path / "ray")
    assert len(shard_bytes(tmp_path / "ray")) == 3 and (tmp_path / "ray" / SETTING / "samples.npz").is_file()
    # with eval.use_gpu the metrics run as a task on a GPU worker: the same task on a CPU worker agrees
    cfg = eval_inputs.config(tmp_path / "ray", num_workers=2)
    with Workers(cfg.eval) as workers:
        remote = workers.call(quality_metrics, cfg.eval, 64, tmp_path / "ray", tmp_path / "ray" / SETTING / "samples")
    driver = json.loads((tmp_path / "ray" / SETTING / "metrics.json").read_text())
    # abs: eval/kid_std is rounding noise here (~1e-7: every KID subset is all 20 samples)
    assert remote == pytest.approx({k: v for k, v in driver.items() if k.startswith("eval/")}, rel=1e-3, abs=1e-6)
    # the sampling and metrics workers listen on loopback only
    local_ray.assert_listeners_on("127.0.0.1", expect=("ray::",))
