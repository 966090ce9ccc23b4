"""A registered generator as an MLflow pyfunc: ``mlflow.pyfunc.load_model("models:/mvar-d16@final")``
returns a model whose ``predict`` samples images.

    model = mlflow.pyfunc.load_model("models:/mvar-tiny@final")          # model_config={"device": "cuda"}
    images = model.predict({"class_id": [1, 7], "num_per_class": 2, "seed": 0})
    images.shape, images.dtype   # (4, H, W, 3) uint8: class 1 twice, then class 7 twice

Input: a table (a pandas DataFrame, a dict of columns, or a list of row dicts), one row per class id.
``class_id`` is required; ``num_per_class`` (default 1), ``seed`` (0), ``cfg``, ``top_k`` and ``top_p``
(default: the checkpoint's own sampling settings, else 1.5 / 900 / 0.96) are optional and hold one value
for the whole call. Output: one uint8 array (N, H, W, 3), N = rows x num_per_class, each row's class
``num_per_class`` times in row order: the images `mvar sample --classes ... --per-class ... --seed ...`
draws from the same checkpoint. Same input, same images.

The model's artifact is the checkpoint directory (checkpoint.yaml, model.pt, tokenizer/; no optimizer
state), so loading needs neither the run's storage nor Ray nor a network: only this package and torch.
This is the one module besides `mvar.tracking` that imports MLflow: the class must subclass MLflow's
``PythonModel`` where it is defined (MLflow checks that when it saves the model and unpickles it by its
module name when it loads it), and `mvar.tracking` keeps its MLflow imports inside functions, so that
importing it stays cheap for every worker and command. `mvar.tracking` (``Store.register_model``) is its
only user.
"""
from __future__ import annotations

import shutil
import tempfile
from dataclasses import fields
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ColSpec, Schema, TensorSpec

from mvar.errors import UserError

ARTIFACT = "checkpoint"                  # the name of the checkpoint directory among the model's artifacts
SKIPPED = ("train_state.pt",)            # a training checkpoint's optimizer state: not needed to sample
SETTINGS = {"num_per_class": "long", "seed": "long", "cfg": "double", "top_k": "long", "top_p": "double"}


class GeneratorModel(PythonModel):
    """The pyfunc of a generator checkpoint. ``model_config``: ``device`` ('auto': cuda when torch sees a
    GPU, else cpu; or cpu, cuda, cuda:N)."""

    def load_context(self, context) -> None:
        from mvar.checkpoint import load_checkpoint, read_checkpoint_meta
        from mvar.sampling import SamplingConfig, check_device
        import torch
        path = context.artifacts[ARTIFACT]
        name = (context.model_config or {}).get("device", "auto")
        if name == "auto":
            name = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = check_device(name, "model_config device")
        self.model, self.tokenizer, self.cfg, _ = load_checkpoint(path, self.device)
        stored = read_checkpoint_meta(path).get("sampling") or {}
        known = {f.name for f in fields(SamplingConfig)}
        self.defaults = SamplingConfig(**{k: v for k, v in stored.items() if k in known})

    def predict(self, context, model_input: pd.DataFrame, params=None):
        # pd.DataFrame: what MLflow's schema enforcement hands over; a hint it infers no schema from, so the
        # logged signature stays the schema (no hint at all draws MLflow's "add type hints" warning)
        import torch

        from mvar.sampling import make_generator, sample_images
        rows = as_table(model_input)
        labels, s = self.request(rows)
        gen = make_generator(s["seed"], self.device)
        imgs = sample_images(self.model, self.tokenizer, torch.tensor(labels, device=self.device),
                             cfg=s["cfg"], top_k=s["top_k"], top_p=s["top_p"], generator=gen)  # (N, 3, H, W) in [0, 1]
        return imgs.mul(255).round().clamp(0, 255).byte().permute(0, 2, 3, 1).cpu().numpy()

    def request(self, rows: dict[str, list]) -> tuple[list[int], dict]:
        """(the labels to sample, the call's settings) of an input table; a UserError naming the column."""
        d = self.defaults
        s = {"num_per_class": 1, "seed": d.seed, "cfg": d.cfg, "top_k": d.top_k, "top_p": d.top_p}
        for key in SETTINGS:
            values = {v for v in rows.get(key, []) if not _missing(v)}
            if len(values) > 1:
                raise UserError(f"input column '{key}' holds {sorted(values)}: one value per call (sample the "
                                f"other settings in a call of their own)")
            if values:
                s[key] = _number(key, values.pop())
        _check(s)
        classes = [_number("class_id", c) for c in rows["class_id"]]
        bad = [c for c in classes if not 0 <= c < self.cfg.num_classes]
        if bad:
            raise UserError(f"input column 'class_id': ids {bad} are outside [0, {self.cfg.num_classes - 1}]")
        return [c for c in classes for _ in range(s["num_per_class"])], s


def as_table(model_input) -> dict[str, list]:
    """Columns of a DataFrame, a dict (scalars for one row, or lists) or a list of row dicts."""
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a pandas DataFrame
        table = {str(k): list(v) for k, v in model_input.to_dict(orient="list").items()}
    elif isinstance(model_input, dict):
        table = {k: list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v] for k, v in model_input.items()}
    elif isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        keys = {k for r in model_input for k in r}
        table = {k: [r.get(k) for r in model_input] for k in keys}
    else:
        raise UserError(f"input: expected a table with a 'class_id' column (DataFrame, dict or list of dicts), "
                        f"got {type(model_input).__name__}")
    if not table.get("class_id"):
        raise UserError("input: no 'class_id' column, or it is empty: name the classes to sample, "
                        "e.g. {'class_id': [1, 2]}")
    unknown = sorted(set(table) - {"class_id", *SETTINGS})
    if unknown:
        raise UserError(f"input columns {unknown} are unknown; known: class_id, {', '.join(SETTINGS)}")
    return table


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _number(key: str, value):
    """An int of an integer column ('long'), a float of a 'double' one; a UserError naming the column."""
    kind = "long" if key == "class_id" else SETTINGS[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"input column '{key}': {value!r} is not a number") from None
    if kind == "long":
        if number != int(number):
            raise UserError(f"input column '{key}': {value!r} is not a whole number")
        return int(number)
    return number


def _check(s: dict) -> None:
    rules = {"num_per_class": (s["num_per_class"] >= 1, "must be >= 1"),
             "cfg": (s["cfg"] >= 0, "guidance must be >= 0 (0 turns CFG off)"),
             "top_k": (s["top_k"] >= 0, "must be >= 0 (0 = no top-k)"),
             "top_p": (0 <= s["top_p"] <= 1, "must lie in [0, 1] (0 = no nucleus filtering)")}
    for key, (ok, rule) in rules.items():
        if not ok:
            raise UserError(f"input column '{key}': {s[key]:g} {rule}")


def signature(image_size: int) -> ModelSignature:
    inputs = Schema([ColSpec("long", "class_id"),
                     *(ColSpec(kind, key, required=False) for key, kind in SETTINGS.items())])
    images = TensorSpec(np.dtype(np.uint8), (-1, image_size, image_size, 3))  # (N, H, W, 3)
    return ModelSignature(inputs=inputs, outputs=Schema([images]))


def _link_or_copy(src: str, dst: str) -> str:
    """A hard link where the staging folder shares the checkpoint's file system (no bytes copied), else a copy."""
    try:
        Path(dst).hardlink_to(src)
        return dst
    except OSError:
        return shutil.copy2(src, dst)


def save(checkpoint: str | Path, out: Path) -> Path:
    """The pyfunc of ``checkpoint`` saved as an MLflow model directory ``out`` (MLmodel, the pickled
    ``GeneratorModel``, the checkpoint as its artifact, the signature and an input example)."""
    import mlflow
    import torch

    from mvar.checkpoint import read_checkpoint_meta, read_tokenizer_config
    checkpoint = Path(checkpoint)
    read_checkpoint_meta(checkpoint)  # a model checkpoint, or a UserError naming it
    size = read_tokenizer_config(checkpoint).image_size
    with tempfile.TemporaryDirectory(prefix="mvar-pyfunc-", dir=out.parent) as tmp:
        staged = Path(tmp) / ARTIFACT
        shutil.copytree(checkpoint, staged, ignore=shutil.ignore_patterns(*SKIPPED), copy_function=_link_or_copy)
        # requirements named, not inferred: MLflow would load and run the model in a subprocess to find them
        mlflow.pyfunc.save_model(
            str(out), python_model=GeneratorModel(), artifacts={ARTIFACT: str(staged)}, signature=signature(size),
            input_example={"class_id": [0, 1], "num_per_class": [1, 1], "seed": [0, 0]},
            model_config={"device": "auto"}, metadata={"mvar.checkpoint": str(checkpoint)},
            pip_requirements=[f"mlflow=={mlflow.__version__}", f"torch=={torch.__version__.split('+')[0]}"])
    return out
