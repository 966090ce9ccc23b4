"""What a run ran on, as run tags: device type, device model, device count, and the torch build.

    provenance_tags(torch.device("cuda", 0), count=8)
    -> {"mvar.device_type": "cuda", "mvar.device_model": "NVIDIA H100 80GB HBM3", "mvar.device_count": "8",
        "mvar.torch_version": "2.14.1", "mvar.cuda_version": "12.8", "mvar.nccl_version": "2.27.3"}

The device model is that of the process that calls it: a training run's rank 0 and an evaluation's
sampling worker tag their own device (a Ray head without GPUs cannot see the workers' GPUs). GPU
names come from NVML (nvidia-ml-py) when it is importable, else from torch; CPU models from
/proc/cpuinfo, else `platform`. `cuda_version` / `nccl_version` are those torch was built with
(`none` for a build without them). No MLflow here: callers set the tags.
"""
from __future__ import annotations

import os
import platform

import torch

UNKNOWN = "unknown"


def provenance_tags(device: torch.device | str, count: int = 1, prefix: str = "mvar.") -> dict[str, str]:
    """The tags of ``count`` devices like ``device`` (this process's); keys ``<prefix>device_type`` ..."""
    device = torch.device(device)
    model = gpu_name(device.index) if device.type == "cuda" else cpu_model()
    return {f"{prefix}{k}": v for k, v in {"device_type": device.type, "device_model": model,
                                             "device_count": str(int(count)), **build_versions()}.items()}


def scaling_tags(scaling, prefix: str = "mvar.") -> dict[str, str]:
    """A training driver's tags from its ``scaling.*`` keys: the workers' device type and count, the build;
    the device model only where this process has that kind of device (rank 0 tags it again, from its own)."""
    device = "cuda" if scaling.use_gpu else "cpu"
    tags = provenance_tags(device, scaling.num_workers, prefix)
    if device == "cuda" and tags[f"{prefix}device_model"] == UNKNOWN:
        del tags[f"{prefix}device_model"]
    return tags


def build_versions() -> dict[str, str]:
    """torch's version and the CUDA and NCCL versions it was built with."""
    return {"torch_version": torch.__version__.split("+")[0], "cuda_version": torch.version.cuda or "none",
            "nccl_version": nccl_version()}


def nccl_version() -> str:
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - a build without NCCL (CPU-only, macOS)
        return "none"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def gpu_name(index: int | None = None) -> str:
    """The name of visible CUDA device ``index`` (default: the current one), or 'unknown' without one.
    NVML first: it creates no CUDA context (a Ray Train driver would hold one on GPU 0 for the whole run)."""
    i = index if index is not None else (torch.cuda.current_device() if torch.cuda.is_initialized() else 0)
    name = _nvml_name(i)
    if name:
        return name
    try:
        return torch.cuda.get_device_name(i) if torch.cuda.is_available() else UNKNOWN
    except Exception:  # noqa: BLE001
        return UNKNOWN


def _nvml_name(index: int) -> str:
    """NVML's name of visible device ``index``: NVML counts physical GPUs, so CUDA_VISIBLE_DEVICES (Ray
    sets it per worker) is mapped first; '' when NVML is missing or has no answer."""
    try:
        import pynvml
    except ImportError:
        return ""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    visible = None if env is None else [v.strip() for v in env.split(",") if v.strip()]
    if visible is not None and index >= len(visible):
        return ""  # this process sees no such device, whatever the machine has
    try:
        pynvml.nvmlInit()
        try:
            if visible is None:
                handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            elif visible[index].isdigit():
                handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible[index]))
            else:
                handle = pynvml.nvmlDeviceGetHandleByUUID(visible[index])  # GPU-... / MIG-...
            name = pynvml.nvmlDeviceGetName(handle)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - no driver, or an index NVML does not know
        return ""
    return name.decode() if isinstance(name, bytes) else str(name)


def cpu_model() -> str:
    """The CPU's model name ('model name' of /proc/cpuinfo, else `platform`), 'unknown' when nothing says."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                    return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN
