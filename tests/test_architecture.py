"""The layers of docs/architecture.md, read off the source with `ast` (every import, also those inside functions).

A module may import its own floor and the floors below it, never one above; MLflow is imported by
mvar/tracking.py alone, Ray's session and Optuna stay out of the lower floors, and model code imports
torch and the ground floor only.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mvar", "workflows", "sweeps", "tools")

# module (or package) -> floor; the longest matching prefix decides (docs/architecture.md draws the same)
FLOORS = {
    "mvar.errors": 0, "mvar.files": 0, "mvar.config": 0, "mvar.lazy": 0, "mvar": 0,
    "mvar.models": 1, "mvar.tokenizer": 1, "mvar.sampling": 1, "mvar.checkpoint": 1, "mvar.var_weights": 1,
    "mvar.measure": 1,
    "mvar.data": 2, "mvar.metrics": 2,
    "mvar.tracking": 3, "mvar.cluster": 3,
    "mvar.training": 4, "mvar.evaluation": 4, "sweeps": 4,
    "mvar.cli": 5, "mvar.commands": 5, "mvar.report": 5, "mvar.bench": 5, "mvar.stack": 5,
    "mvar.data.commands": 5, "mvar.data.bench": 5,
    "mvar.config_reference": 5, "workflows": 5, "sweeps.run": 5, "sweeps.train_child": 5, "tools": 5,
}
MODEL_CODE = ("mvar.models", "mvar.tokenizer", "mvar.sampling")
OUTSIDE = ("mlflow", "ray", "optuna", "optuna_integration", "webdataset", "torch_fidelity")


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return names


def floor(name: str) -> int | None:
    keys = [k for k in FLOORS if name == k or name.startswith(k + ".")]
    return FLOORS[max(keys, key=len)] if keys else None


def within(name: str, roots: tuple[str, ...]) -> bool:
    return any(name == r or name.startswith(r + ".") for r in roots)


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {name: imports(path) for name, path in modules().items()}


def test_every_module_has_a_floor(graph):
    assert [m for m in graph if floor(m) is None] == []


def test_no_module_imports_a_floor_above_its_own(graph):
    bad = [f"{m} (floor {floor(m)}) imports {n} (floor {floor(n)})" for m, names in graph.items()
           for n in names if within(n, PACKAGES) and floor(n) is not None and floor(n) > floor(m)]
    assert bad == [], "\n".join(bad)


def test_only_tracking_imports_mlflow_and_the_lower_floors_no_outside_system(graph):
    mlflow = sorted(m for m, names in graph.items() if any(within(n, ("mlflow",)) for n in names))
    assert mlflow == ["mvar.tracking"]
    low = [f"{m} imports {n}" for m, names in graph.items() if floor(m) <= 1
           for n in names if within(n, OUTSIDE)]
    assert low == [], "\n".join(low)


def test_model_code_imports_torch_and_the_ground_floor_only(graph):
    bad = [f"{m} imports {n}" for m, names in graph.items() if within(m, MODEL_CODE)
           for n in names if (within(n, PACKAGES) and floor(n) not in (0, 1)) or within(n, OUTSIDE + ("yaml",))
           or (within(n, PACKAGES) and within(n, ("mvar.checkpoint", "mvar.var_weights")))]
    assert bad == [], "\n".join(bad)


def test_no_production_module_imports_the_benchmark_harness(graph):
    bad = sorted(m for m, names in graph.items() if floor(m) < 5 and any(within(n, ("mvar.bench",)) for n in names))
    assert bad == []
