"""Inputs of the training tests: a stand-in tiny tokenizer, synthetic image shards and their token shards."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from mvar.checkpoint import save_tokenizer
from mvar.data.synth import write_synth
from mvar.data.tokens import tokenize
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass
class TinyInputs:
    root: Path
    tokenizer: str
    images: str
    tokens: str
    eval_tokens: str

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def overrides(self, name: str, **extra) -> list[str]:
        """Overrides that point a tiny local config at these inputs and at a store under ``root``."""
        base = {"tokenizer": self.tokenizer, "data.shards": self.tokens, "run.name": name,
                "run.storage_path": str(self.root / "runs"), "tracking.uri": self.tracking_uri,
                "tracking.experiment": "tests", "tracking.system_metrics": "false", "data.num_workers": 0}
        base.update(extra)
        return [f"{k}={v}" for k, v in base.items()]


@pytest.fixture(scope="session")
def tiny_inputs(tmp_path_factory) -> TinyInputs:
    root = tmp_path_factory.mktemp("train")
    torch.manual_seed(0)
    cfg = TokenizerConfig.tiny()
    save_tokenizer(root / "tokenizer", MultiScaleVQVAE(cfg), cfg)
    write_synth(str(root / "images"), num_images=160, image_size=64, num_classes=10, seed=0, shard_size=40)
    write_synth(str(root / "eval-images"), num_images=32, image_size=64, num_classes=10, seed=1, shard_size=16)
    tokenize(str(root / "tokenizer"), str(root / "images"), str(root / "tokens"), progress=False)
    tokenize(str(root / "tokenizer"), str(root / "eval-images"), str(root / "eval-tokens"), progress=False)
    return TinyInputs(root=root, tokenizer=str(root / "tokenizer"), images=str(root / "images"),
                      tokens=str(root / "tokens"), eval_tokens=str(root / "eval-tokens"))


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
