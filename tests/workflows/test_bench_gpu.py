"""workflows.bench_gpu runs on a bare GPU machine: torch, numpy, pyyaml, tqdm, pillow, psutil and nothing else."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# What the GPU machine lacks; importing any of them there fails, so here too.
ABSENT = ["ray", "mlflow", "webdataset", "torch_fidelity", "matplotlib", "torchvision", "optuna", "pandas",
          "scipy", "fsspec", "sqlalchemy", "psycopg2"]

BLOCKER = f"""
import importlib.machinery, sys
class _PathFinderWithout(importlib.machinery.PathFinder):
    # as if those packages were not installed: find_spec says None, import raises ModuleNotFoundError
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {ABSENT!r}:
            return None
        return super().find_spec(name, path, target)
sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
for name in list(sys.modules):
    if name.split(".")[0] in {ABSENT!r}:
        del sys.modules[name]
"""


def test_smoke_run_on_cpu_without_the_stack_packages(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER)  # every process of the run, the per-variant ones too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    check = subprocess.run([sys.executable, "-c", "import matplotlib"], env=env, capture_output=True, text=True)
    assert check.returncode != 0 and "No module named 'matplotlib'" in check.stderr  # the blocker works
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "workflows.bench_gpu", "--device", "cpu", "--size", "tiny",
                           "--repeats", "1", "--out", str(out)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "bench_gpu.json").read_text())
    assert [r["variant"] for r in report["results"]] == ["var", "scale_markov", "mvar"]
    for r in report["results"]:
        assert r["infer_latency_s"] > 0 and r["train_step_s"] > 0
    assert any(line.startswith("var / mvar infer_peak_mb") for line in report["ratios"])
    assert "| variant" in (out / "bench_gpu.md").read_text() and "| variant" in proc.stdout


def test_no_cuda_is_a_clear_error_before_any_work(tmp_path):
    if __import__("torch").cuda.is_available():
        return
    proc = subprocess.run([sys.executable, "-m", "workflows.bench_gpu", "--out", str(tmp_path)], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    assert proc.returncode != 0 and "no CUDA device visible" in proc.stderr


def test_the_gpu_run_measures_mvar_with_natten_flex_and_sdpa_and_the_cpu_smoke_run_with_none():
    import pytest

    from mvar.errors import UserError
    from mvar.models.attention import natten_available
    from workflows.bench_gpu import window_backends
    assert window_backends("auto", "cuda") == (["natten"] if natten_available() else []) + ["flex", "reference"]
    assert window_backends("auto", "cpu") == [] and window_backends("", "cuda") == []
    assert window_backends("flex,banded", "cpu") == ["flex", "banded"]
    with pytest.raises(UserError, match="--window-backends: unknown \\['nope'\\]"):
        window_backends("flex,nope", "cuda")
