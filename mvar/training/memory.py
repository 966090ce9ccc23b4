"""Peak memory per logging interval, by the probes of `mvar.measure` (those of `mvar bench`): `perf/peak_cuda_mb`
(CUDA allocated) on a GPU, `perf/peak_rss_mb` (resident high-water mark) on CPU, and either under the deprecated
alias `perf/peak_mem_mb` (kept for one release)."""
from __future__ import annotations

import torch

from mvar.measure import MB, status_mb


PEAK_ALIAS = "perf/peak_mem_mb"  # deprecated: the same number under one name for both kinds of memory


def peak_metric(device: torch.device) -> str:
    """The name of a device's peak: CUDA-allocated memory and a CPU process's resident set are not alike."""
    return "perf/peak_cuda_mb" if device.type == "cuda" else "perf/peak_rss_mb"


class PeakTracker:
    """CUDA: max_memory_allocated; CPU: the process's VmHWM (resident high-water mark). Reset at each read."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset()

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # VmHWM := current VmRSS
        except OSError:
            pass  # not Linux, or not allowed: the peak then covers the whole process life

    def read_and_reset(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / MB
        else:
            peak = status_mb("VmHWM")
        self._reset()
        return peak
