"""Every use of a private Ray API, in one place: what a Ray upgrade must re-check.

Checked on Ray ``CHECKED_ON`` (the version pyproject.toml pins). Each name below is Ray's own,
imported on first use (``from mvar.ray_private import TorchBackend``), so importing this module
imports no Ray; `tests/test_ray_seam.py` imports every one and fails when one moves. Outside this
module the project uses Ray's public API only (the same test checks the sources).

- ``TorchBackend``, ``set_torch_distributed_env_vars``, ``V1WorkerGroup``: Ray Train's stock torch
  backend, which `mvar.training.backend` extends to bind its rendezvous store to the node's address.
- ``train_context``: the module whose logger (named by its file path) logs every `ray.train.report`
  at INFO (`report_logger`).
- ``ray_constants``: Ray's single-machine switch ``ENABLE_RAY_CLUSTER`` (`single_machine_mode`).
- ``CheckpointManagerState``, ``TrainingResultState``: the model of Ray Train V2's checkpoint record,
  ``checkpoint_manager_snapshot.json`` in a run's directory; `mvar.training.run_dir` reads and writes
  that file as plain JSON (no Ray needed), `tests/test_ray_seam.py` checks it against this model.
"""
from __future__ import annotations

import importlib
import logging

CHECKED_ON = "2.60.0"

_CHECKPOINT_MANAGER = "ray.train.v2._internal.execution.checkpoint.checkpoint_manager"

# name here -> (Ray module, its attribute; None: the module itself)
PRIVATE: dict[str, tuple[str, str | None]] = {
    "TorchBackend": ("ray.train.torch.config", "_TorchBackend"),
    "set_torch_distributed_env_vars": ("ray.train.torch.config", "_set_torch_distributed_env_vars"),
    "V1WorkerGroup": ("ray.train._internal.worker_group", "WorkerGroup"),
    "train_context": ("ray.train.v2._internal.execution.context", None),
    "ray_constants": ("ray._private.ray_constants", None),
    "CheckpointManagerState": (_CHECKPOINT_MANAGER, "_CheckpointManagerState"),
    "TrainingResultState": (_CHECKPOINT_MANAGER, "_TrainingResultState"),
}
# attributes of those modules that the project reads or sets
ATTRIBUTES = {"ray_constants": ("ENABLE_RAY_CLUSTER",), "train_context": ("logger",)}


def _load(name: str):
    module, attr = PRIVATE[name]
    found = importlib.import_module(module)
    return found if attr is None else getattr(found, attr)


def __getattr__(name: str):
    if name not in PRIVATE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return _load(name)


def single_machine_mode() -> None:
    """Ray's single-machine mode (the one it uses on macOS and Windows): `ray.init` keeps a loopback
    ``_node_ip_address`` instead of rewriting it to the machine's routable address. Read at call time."""
    _load("ray_constants").ENABLE_RAY_CLUSTER = False


def report_logger() -> logging.Logger:
    """The logger that Ray Train's worker context logs each `ray.train.report` on at INFO (named by its
    file path, outside the ``ray.train`` loggers that Ray Train's LoggingConfig sets)."""
    return _load("train_context").logger
