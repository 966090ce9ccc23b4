"""The layers of docs/architecture.md, read off the source with `ast` (every import, also those inside functions).

A module may import its own floor and the floors below it, never one above; no two modules import each
other, directly or around a circle; MLflow is imported by mvar/tracking.py alone and Ray by the Ray
adapter modules alone; Ray's session and Optuna stay out of the lower floors, and model code imports
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
    "mvar.errors": 0, "mvar.files": 0, "mvar.config": 0, "mvar.lazy": 0, "mvar.metric_names": 0, "mvar": 0,
    "mvar.models": 1, "mvar.tokenizer": 1, "mvar.sampling": 1, "mvar.checkpoint": 1, "mvar.var_weights": 1,
    "mvar.measure": 1,
    "mvar.data": 2, "mvar.metrics": 2,
    "mvar.tracking": 3, "mvar.generator_pyfunc": 3, "mvar.cluster": 3, "mvar.ray_private": 3,
    "mvar.training": 4, "mvar.evaluation": 4, "sweeps": 4,
    "mvar.cli": 5, "mvar.commands": 5, "mvar.report": 5, "mvar.bench": 5, "mvar.stack": 5,
    "mvar.data.commands": 5, "mvar.data.bench": 5,
    "mvar.config_reference": 5, "workflows": 5, "sweeps.run": 5, "sweeps.train_child": 5, "tools": 5,
}
MODEL_CODE = ("mvar.models", "mvar.tokenizer", "mvar.sampling")
OUTSIDE = ("mlflow", "ray", "optuna", "optuna_integration", "webdataset", "torch_fidelity")
# the only modules that import mlflow: tracking, and the registered generator's pyfunc class, which must subclass
# MLflow's PythonModel where it is defined (tracking imports MLflow inside its functions only, and is its one user)
MLFLOW_MODULES = ["mvar.generator_pyfunc", "mvar.tracking"]
# the only modules that may import ray (docs/architecture.md, "Ray behind one seam"); the one-process
# driver (mvar.training.local) must not
RAY_ADAPTERS = ("mvar.cluster", "mvar.ray_private", "mvar.training.ray_worker", "mvar.training.backend",
                "mvar.training.launch", "mvar.training.driver", "mvar.training.tokenizer_loop",
                "mvar.evaluation.workers", "mvar.evaluation.sampler", "sweeps.driver")
NO_RAY = ("mvar.training.local",)


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
    assert mlflow == MLFLOW_MODULES
    users = sorted(m for m, names in graph.items() if any(within(n, ("mvar.generator_pyfunc",)) for n in names))
    assert users == ["mvar.tracking"], users
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


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules a file imports: `from mvar.training import run_dir` is an edge to the module
    mvar.training.run_dir, `from mvar.models.config import PATTERNS` one to mvar.models.config (the
    longest known module a name starts with). A package's `__init__` is an edge only where a name is
    taken from it: importing a submodule runs it too, but that is no dependency of the importer's."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"{node.module}.{a.name}" for a in node.names}
    out = set()
    for n in names:
        keys = [k for k in known if n == k or n.startswith(k + ".")]
        if keys:
            out.add(max(keys, key=len))
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle (a -> b -> ... -> a) through each back edge of a depth-first walk; [] when there is none."""
    found, state, path = [], {}, []

    def visit(m: str) -> None:
        state[m] = "open"
        path.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == "open":
                found.append(path[path.index(n):] + [n])
            elif n not in state:
                visit(n)
        path.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    return found


def test_the_cycle_finder_finds_a_circle_and_says_which(tmp_path):
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert cycles({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []
    source = tmp_path / "m.py"
    source.write_text("import mvar.y\nfrom mvar.p import sub, name\n\ndef f():\n    from mvar.q.r import X\n")
    assert imported_modules(source, {"mvar.y", "mvar.p", "mvar.p.sub", "mvar.q", "mvar.q.r"}) == \
        {"mvar.y", "mvar.p", "mvar.p.sub", "mvar.q.r"}


def test_the_import_graph_has_no_circle():
    known = modules()
    edges = {m: imported_modules(path, set(known)) - {m} for m, path in known.items()}
    found = cycles(edges)
    assert found == [], "import circles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_only_the_ray_adapters_import_ray(graph):
    ray = sorted(m for m, names in graph.items() if any(within(n, ("ray",)) for n in names))
    assert "mvar.cluster" in ray and set(ray) <= set(RAY_ADAPTERS), \
        f"importing ray outside the adapters: {sorted(set(ray) - set(RAY_ADAPTERS))}"
    assert not set(ray) & set(NO_RAY)

