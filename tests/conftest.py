"""Shared fixtures: the authors' reference outputs and small models built from them."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_DIR = REPO.parent / "shared" / "conformance" / "reference_tiny"


def reference_dir() -> Path:
    """MVAR_REFERENCE_DIR when set, else the tiny reference set beside the repository."""
    return Path(os.environ.get("MVAR_REFERENCE_DIR", DEFAULT_REFERENCE_DIR))


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    path = reference_dir()
    if not (path / "config.json").is_file():
        pytest.fail(f"reference outputs not found in {path}: set MVAR_REFERENCE_DIR")
    return path


@pytest.fixture(scope="session")
def ref_config(ref_dir) -> dict:
    return json.loads((ref_dir / "config.json").read_text())


@pytest.fixture(scope="session")
def ref_expected(ref_dir) -> dict[str, torch.Tensor]:
    out = torch.load(ref_dir / "expected.pt", weights_only=True)
    mvar_file = ref_dir / "expected_mvar.pt"
    if mvar_file.is_file():
        out.update(torch.load(mvar_file, weights_only=True))
    return out


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
