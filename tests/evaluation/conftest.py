"""Inputs of the evaluation tests: a tiny checkpoint, stand-in Inception weights, reference images.

Nothing is downloaded: the Inception weights are a seeded random state dict for torch-fidelity's
architecture (`write_standin_inception_weights`). The checkpoint is a random-weight tiny MVAR
(10 classes, 64 px) unless MVAR_EVAL_CHECKPOINT names another one, e.g. a checkpoint that the
training tests wrote. Inception at 299 px costs ~0.3 s per image on 2 cores: keep image counts small.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from mvar.config import from_dict, merge
from mvar.data.synth import write_synth
from mvar.evaluation.config import EvaluateConfig
from mvar.metrics.fidelity import compute_reference, save_reference
from mvar.metrics.inception import resolve_weights, write_standin_inception_weights

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@dataclass
class EvalInputs:
    root: Path
    checkpoint: str
    weights: str
    ref_shards: str      # 20 synthetic 64 px images, 10 classes
    ref_npz: str         # `mvar eval make-ref` of ref_shards

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.root}/mlflow.db"

    def config(self, out: Path, **eval_keys) -> EvaluateConfig:
        """A small evaluation: 2 per class (20 samples), batches of 8, shards of 8, in this process, no MLflow."""
        base = {"checkpoint": self.checkpoint, "track": False,
                "tracking": {"uri": self.tracking_uri, "experiment": "tests"},
                "eval": {"num_per_class": 2, "batch_size": 8, "samples_per_shard": 8, "num_workers": 0,
                         "cpus_per_worker": 0.5, "reference": self.ref_npz, "feature_extractor_weights": self.weights,
                         "isc_splits": 2, "feature_batch_size": 10, "out_dir": str(out), "device": "cpu"}}
        top = {k: eval_keys.pop(k) for k in ("checkpoint", "run_id", "track", "tracking") if k in eval_keys}
        return from_dict(EvaluateConfig, merge(base, {**top, "eval": eval_keys}))


def _checkpoint(root: Path) -> str:
    """MVAR_EVAL_CHECKPOINT, else a tiny MVAR with seeded random weights (the authors' tiny shape)."""
    given = os.environ.get("MVAR_EVAL_CHECKPOINT", "")
    if given:
        return given
    import torch

    from mvar.checkpoint import save_checkpoint
    from mvar.models import NextScaleTransformer, named_model
    from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.tiny()
    model = NextScaleTransformer(named_model("mvar-tiny"), tok_cfg.vocab_size, tok_cfg.z_channels, tok_cfg.patch_nums)
    out = save_checkpoint(root / "tiny-mvar", model, MultiScaleVQVAE(tok_cfg), tok_cfg,
                          extra={"source": {"note": "random stand-in weights"}})
    return str(out)


@pytest.fixture(scope="session")
def eval_inputs(tmp_path_factory) -> EvalInputs:
    root = tmp_path_factory.mktemp("eval")
    weights = str(root / "inception-standin.pt")
    write_standin_inception_weights(weights, seed=0)
    ref_shards = str(root / "ref-images")
    write_synth(ref_shards, num_images=20, image_size=64, num_classes=10, seed=7, shard_size=10)
    ref_npz = str(root / "ref.npz")
    import torch
    save_reference(ref_npz, compute_reference(ref_shards, resolve_weights(weights), torch.device("cpu"), 10))
    return EvalInputs(root, _checkpoint(root), weights, ref_shards, ref_npz)
