"""Packages whose names load on first use (PEP 562), so that importing one for a command's parser
does not import torch, webdataset or torch-fidelity.

A package's ``__init__`` is one call::

    __all__, __getattr__, __dir__ = lazy_exports(__name__, {
        "mvar.data.config": ["DataConfig"],
        "mvar.data.loader": ["build_train_loader", "build_eval_loader"],
    })
"""
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


def lazy_exports(package: str, modules: dict[str, list[str]]
                 ) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """(``__all__``, ``__getattr__``, ``__dir__``) of a package whose public names are those of ``modules``
    (module -> the names it defines), each imported from its module on first use."""
    exports = {name: module for module, names in modules.items() for name in names}
    names = list(exports)
    return names, lazy_getattr(package, exports), lambda: sorted(names)
