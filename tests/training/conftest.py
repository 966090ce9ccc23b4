"""Fixtures of the training tests: a local Ray; the tiny inputs (``tiny_inputs``: a stand-in tokenizer,
synthetic image shards and their token shards) and ``tiny_classifier`` are tests/conftest.py's (the UI
tests train on them too)."""
from __future__ import annotations

import os
import re

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def local_ray(listeners):
    """One local Ray (127.0.0.1, 2 CPUs) shared by a test module's in-process training runs.

    Yields a watch of the listening sockets of this process and all below it (the Ray, its training
    workers), sampled while the module runs: at the end every one must be on 127.0.0.1.
    """
    from mvar import cluster
    cluster.connect(num_cpus=2)
    try:
        with listeners.of_descendants() as watch:
            yield watch
    finally:
        cluster.shutdown()
    watch.assert_listeners_on("127.0.0.1")


@pytest.fixture(scope="session")
def progress_line_pattern() -> re.Pattern:
    """Rank 0's console line at a log step (mvar.training.ray_worker.progress_line): step, total, then the fields."""
    return re.compile(r"step (\d+)/(\d+) \(\d+%\)  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  \d+\.\d{3} s/step  "
                      r"\d+\.\d images/s  ETA \d+:\d\d:\d\d")
