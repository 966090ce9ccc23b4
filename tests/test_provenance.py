"""Provenance tags: what a run ran on, from this process's devices and the torch build."""
from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import pytest
import torch

from mvar.provenance import UNKNOWN, cpu_model, gpu_name, provenance_tags, scaling_tags

KEYS = {"device_type", "device_model", "device_count", "torch_version", "cuda_version", "nccl_version"}


def test_cpu_tags_name_the_model_count_and_build():
    tags = provenance_tags(torch.device("cpu"), count=3)
    assert set(tags) == {f"mvar.{k}" for k in KEYS}
    assert tags["mvar.device_type"] == "cpu" and tags["mvar.device_count"] == "3"
    assert tags["mvar.device_model"] == cpu_model() != UNKNOWN
    assert torch.__version__.startswith(tags["mvar.torch_version"])
    assert tags["mvar.cuda_version"] == (torch.version.cuda or "none")
    assert all(isinstance(v, str) and v for v in tags.values())
    assert set(provenance_tags("cpu", prefix="mvar.eval_")) == {f"mvar.eval_{k}" for k in KEYS}


@pytest.mark.skipif(not shutil.which("lscpu"), reason="no lscpu to compare with")
def test_the_cpu_model_is_the_one_lscpu_names():
    out = subprocess.run(["lscpu"], capture_output=True, text=True, env={"LC_ALL": "C"}).stdout
    names = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")]
    if not names:
        pytest.skip("lscpu names no model here")
    assert cpu_model() == names[0]


def test_a_driver_without_the_workers_gpus_leaves_the_model_to_the_workers():
    tags = scaling_tags(SimpleNamespace(use_gpu=True, num_workers=8))
    assert tags["mvar.device_type"] == "cuda" and tags["mvar.device_count"] == "8"
    if gpu_name() == UNKNOWN:  # no GPU in this process: rank 0 tags its own
        assert "mvar.device_model" not in tags
    else:
        assert tags["mvar.device_model"] == gpu_name()
    cpu = scaling_tags(SimpleNamespace(use_gpu=False, num_workers=2))
    assert cpu["mvar.device_model"] == cpu_model() and cpu["mvar.device_count"] == "2"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_gpu_is_named_as_nvidia_smi_names_it():
    tags = provenance_tags(torch.device("cuda", 0))
    assert tags["mvar.device_type"] == "cuda" and tags["mvar.cuda_version"] == torch.version.cuda
    assert tags["mvar.nccl_version"] != "none" and tags["mvar.device_model"] == torch.cuda.get_device_name(0)
    if shutil.which("nvidia-smi"):
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True).stdout.splitlines()
        assert tags["mvar.device_model"] in [line.strip() for line in out]
