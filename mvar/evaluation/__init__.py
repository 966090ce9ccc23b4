"""Evaluation of a checkpoint: class-balanced sampling on Ray workers, FID / IS / precision / recall.

    from mvar.config import from_dict
    from mvar.evaluation import EvaluateConfig, evaluate
    cfg = from_dict(EvaluateConfig, {"checkpoint": "ckpt/mvar-d16", "eval": {"reference": "in256_ref.npz"}})
    results = evaluate(cfg)     # per setting: metrics, output directory, MLflow run

`mvar eval` and `python -m workflows.evaluate` are the command-line entry points (docs in
mvar/commands/evaluate.py); the `eval.*` keys are EvalConfig's fields.
"""
from __future__ import annotations

from mvar.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mvar.evaluation.config": ["EvalConfig", "EvaluateConfig"],
    "mvar.evaluation.plan": ["SamplePlan"],
    "mvar.evaluation.run": ["evaluate", "prepare", "SettingResult"],
})
