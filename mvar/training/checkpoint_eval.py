"""Each checkpoint of a training run evaluated while the run goes on (`checkpoint_eval.every_checkpoint`).

    evaluator = CheckpointEvaluator.of(cfg, run_id, run_dir)   # None when checkpoint_eval is off
    metrics = evaluator(checkpoint_dir)   # {'eval/fid': ..., 'eval/precision': ...}, logged at its step

The evaluation is `mvar eval`'s (`mvar.evaluation.run.evaluate_checkpoint`: the same `eval.*` keys, sampled
in this process, a small ``num_per_class``); its `eval/*` metrics go into the TRAINING run at the
checkpoint's step, so MLflow draws them as curves beside `val/loss`, and back to the caller, who records
them with the checkpoint (Ray Train's checkpoint record), where `models:/NAME@best` is chosen from
(``checkpoint_eval.best_by``).

Where it runs: on Ray Train a validation task that Ray Train's controller starts beside the training
(`ray.train.report(..., validation=True)`, `TorchTrainer(validation_config=...)`; `mvar.training.launch`),
one at a time, so the training loop does not wait for it; in a local run (`mvar.training.local`) in the
training process right after the checkpoint is written (the loop waits).

Once per checkpoint: a checkpoint whose `eval/fid` the run holds at its step already (an evaluation that
logged and then died before its end was recorded) is not evaluated again; its logged values are returned.
A checkpoint whose evaluation was pending when the run stopped is evaluated when the run resumes (Ray
Train queues its pending validations again; a local run evaluates them before training on).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

from mvar import faults
from mvar.data.storage import is_local
from mvar.tracking import MlflowTracker, Store, TrackingConfig
from mvar.training.config import CheckpointEvalConfig

log = logging.getLogger(__name__)

PRIMARY = "eval/fid"      # every evaluation with metrics logs it: its step says the checkpoint was evaluated
EVAL_DIR = "checkpoint_eval"  # under the run's directory: each checkpoint's grid and metrics.json


def default_out_dir(run_dir: str, run_name: str) -> str:
    """``run.storage_path/run.name/checkpoint_eval`` for local (or shared) storage, else ``out/eval/<run name>``
    (an object store holds checkpoints, not the evaluation's files)."""
    if is_local(run_dir):
        return str(Path(run_dir) / EVAL_DIR)
    return str(Path("out/eval").resolve() / f"{run_name}-{EVAL_DIR}")


@dataclass(frozen=True)
class CheckpointEvaluator:
    """What a checkpoint's evaluation needs: its keys, the training run it logs into, where it writes.
    Picklable: Ray Train sends it to the validation task."""

    ecfg: CheckpointEvalConfig
    tracking: TrackingConfig
    run_id: str
    out_dir: str                  # <out_dir>/<checkpoint name>/<setting>/{grid.png, metrics.json}

    @classmethod
    def of(cls, cfg, run_id: str, run_dir: str) -> "CheckpointEvaluator | None":
        ecfg = cfg.checkpoint_eval
        if not ecfg.every_checkpoint:
            return None
        out = str(Path(ecfg.out_dir).resolve()) if ecfg.out_dir else default_out_dir(run_dir, cfg.run.name)
        return cls(ecfg, cfg.tracking, run_id, out)

    def __call__(self, checkpoint: Path) -> dict[str, float]:
        """The `eval/*` metrics of ``checkpoint`` (a local directory), logged into the run at its step."""
        from mvar.checkpoint import read_checkpoint_meta
        checkpoint = Path(checkpoint)
        step = int(read_checkpoint_meta(checkpoint)["train"]["step"])
        logged = self.logged_at(step)
        if logged:
            log.info("checkpoint %s: eval/* at step %d are in the run already; not evaluated again",
                     checkpoint.name, step)
            return logged
        faults.point("checkpoint-eval", step)  # testing aid: MVAR_FAULT (mvar.faults)
        t0 = time.perf_counter()
        metrics = self.measure(checkpoint)
        tracker = MlflowTracker(self.run_id, self.tracking)
        tracker.log_metrics(metrics, step)
        tracker.close(status="")  # the driver ends the run
        print(f"checkpoint {checkpoint.name} (step {step}) evaluated in {time.perf_counter() - t0:.1f} s: "
              + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())), flush=True)
        return metrics

    def measure(self, checkpoint: Path) -> dict[str, float]:
        """`mvar eval`'s metrics of one checkpoint (the `eval/*` of them: sampling speed and memory are the
        evaluation task's, not the training's)."""
        from mvar.evaluation.run import evaluate_checkpoint, reference_statistics
        root = Path(self.out_dir)
        reference = reference_statistics(self.ecfg.plain(str(root), self.ecfg.reference), str(checkpoint), root)
        result = evaluate_checkpoint(self.ecfg.plain(str(root / checkpoint.name), reference), str(checkpoint))
        return {k: float(v) for k, v in result.metrics.items() if k.startswith("eval/")}

    def logged_at(self, step: int) -> dict[str, float]:
        """The run's `eval/*` values at ``step`` when its `eval/fid` has one there, else {}."""
        store = Store(self.tracking.uri)
        if step not in {s for s, _ in store.history(self.run_id, PRIMARY)}:
            return {}
        keys = [k for k in store.get(self.run_id).metrics if k.startswith("eval/")]
        out = {}
        for key in keys:
            values = [v for s, v in store.history(self.run_id, key) if s == step]
            if values:
                out[key] = values[0]  # the first: MLflow keeps the first values of a step a resume repeats
        return out

    def safely(self, checkpoint: Path) -> dict[str, float] | None:
        """``self(checkpoint)``, or None after logging why it failed: an evaluation never stops the training."""
        try:
            return self(checkpoint)
        except Exception as err:  # noqa: BLE001 - reported; the run goes on (Ray Train: VALIDATION_FAILED)
            log.error("checkpoint %s: its evaluation failed (%s: %s); the training goes on", Path(checkpoint).name,
                      type(err).__name__, err)
            return None
