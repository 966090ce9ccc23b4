# Two entry points (see README): `make quickstart` and `make test`.
# Each installs into a local virtual environment (.venv) first; the install is
# redone only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

export RAY_USAGE_STATS_ENABLED := 0
export MLFLOW_DISABLE_TELEMETRY := true

.PHONY: install quickstart test test-fast bench-gpu clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision as a matched pair (torch-fidelity imports torchvision).
	$(PY) -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

quickstart: $(STAMP)
	$(PY) -m workflows.quickstart

# Two test processes (pytest-xdist), each file whole in one of them: the slow end-to-end files spend a
# third of their time waiting on Ray's starts, which the other process fills. TEST_PROCS=1: one process.
TEST_PROCS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -rs -n $(TEST_PROCS) --dist loadfile tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -rs -m "not slow" tests

# The GPU benchmark (docs/benchmarks.md): runs from the source tree on a bare GPU machine
# (Python, PyTorch, numpy, pyyaml, tqdm, pillow, psutil): no venv, nothing installed.
bench-gpu:
	PYTHONPATH=. $(PYTHON) -m workflows.bench_gpu --out out/bench_gpu

clean:
	rm -rf $(VENV) runs out
