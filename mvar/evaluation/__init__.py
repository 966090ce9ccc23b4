"""Evaluation of a checkpoint: class-balanced sampling on Ray workers, FID / IS / precision / recall.

    from mvar.config import from_dict
    from mvar.evaluation import EvaluateConfig, evaluate
    cfg = from_dict(EvaluateConfig, {"checkpoint": "ckpt/mvar-d16", "eval": {"reference": "in256_ref.npz"}})
    results = evaluate(cfg)     # per setting: metrics, output directory, MLflow run

`mvar eval` and `python -m workflows.evaluate` are the command-line entry points (docs in
mvar/commands/evaluate.py); the `eval.*` keys are EvalConfig's fields.
"""
from __future__ import annotations

from mvar.lazy import lazy_getattr

_EXPORTS = {
    "EvalConfig": "mvar.evaluation.config",
    "EvaluateConfig": "mvar.evaluation.config",
    "SamplePlan": "mvar.evaluation.plan",
    "evaluate": "mvar.evaluation.run",
    "prepare": "mvar.evaluation.run",
    "SettingResult": "mvar.evaluation.run",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
