"""Packages whose names load on first use (PEP 562), so that importing one for a command's parser
does not import torch, webdataset or torch-fidelity."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_getattr(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """A package's ``__getattr__``: ``exports`` maps each public name to the module that defines it."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module '{package}' has no attribute '{name}'")
        return getattr(importlib.import_module(exports[name]), name)
    return __getattr__
