"""Measurement probes shared by training, evaluation and the benchmarks: peak memory and attention FLOPs.

Ground floor: imports torch and the attention module only, so the production path (training loop,
evaluation workers) can measure without importing the benchmark harness (`mvar.bench`).

Peak memory of a phase:
- CPU: the process's resident-set high-water mark (VmHWM) is reset through /proc/self/clear_refs
  at the phase's start; the peak is VmHWM minus the resident size then. With MALLOC_ENV in the
  environment glibc serves every allocation over 64 KiB by mmap, so freed tensors leave the
  resident set and one phase cannot hide in another's pages.
- CUDA: torch.cuda.reset_peak_memory_stats, then max_memory_allocated minus the bytes allocated
  at the phase's start.
"""
from __future__ import annotations

import re

import torch

from mvar.models.attention import attended_pairs

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
MB = 1024 * 1024


def status_mb(name: str) -> float:
    """A size field of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{name}:\s+(\d+)", fh.read()).group(1)) / 1024


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a phase above its start, in MiB (see the module doc for the method)."""

    def __init__(self, device: torch.device):
        self.device = device

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "torch.cuda.max_memory_allocated above the allocation at phase start"
        return "VmHWM (reset via /proc/self/clear_refs) above VmRSS at phase start; glibc mmap threshold 64 KiB"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = torch.cuda.memory_allocated(self.device) / MB
        else:
            self.start = status_mb("VmRSS")
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := current VmRSS
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) / MB - self.start
        else:
            self.peak = max(status_mb("VmHWM") - self.start, 0.0)  # RSS may shrink within a phase
        return False


def attention_gflops(model) -> float:
    """Attention-core GFLOPs (QK^T and PV over the attended pairs) of one image's full sequence.

    ``model``: a NextScaleTransformer (read for its spec, patch_nums, width and depth only).
    """
    pairs = attended_pairs(model.spec, tuple(range(len(model.patch_nums))))
    return 4 * pairs * model.C * len(model.blocks) / 1e9  # 2 matmuls x 2 FLOPs x head_dim x heads
