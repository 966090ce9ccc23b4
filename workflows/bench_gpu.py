"""The GPU benchmark in one go: VAR, scale-Markov and MVAR at d16, batch 32, 256 px (docs/benchmarks.md).

    PYTHONPATH=. python -m workflows.bench_gpu                  # on one H100/H200: under 8 minutes
    PYTHONPATH=. python -m workflows.bench_gpu --device cpu --size tiny   # smoke run (seconds)
    mvar bench gpu ...                                          # the same command

Needs only what a bare GPU machine has: Python, PyTorch, numpy, pyyaml, tqdm, pillow, psutil (no
Ray, MLflow, webdataset, torch-fidelity, matplotlib, torchvision). Each variant runs in its own
process (`python -m mvar.bench`): inference (generating the token maps of all scales with CFG) and
training steps (VAR: full sequences; scale_markov / mvar: the 8:1:1 cycle, and packed), bf16 autocast,
FlexAttention compiled for the windows (NATTEN where installed), peaks by
torch.cuda.max_memory_allocated; then MVAR again with each window backend (`--window-backends`: NATTEN
when installed, compiled Flex, masked SDPA), first call (compiles) and steady state. Writes OUT/bench_gpu.json and OUT/bench_gpu.md and prints the table.
"""
from __future__ import annotations

import json
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from mvar.bench import BenchSpec, run_variant, table
from mvar.commands import benchmarks, run_cli, standalone
from mvar.errors import UserError
from mvar.models.attention import natten_available
from mvar.models.config import BACKENDS

# The paper's d16 figures on one GPU, and the targets for ours: VAR's value / MVAR's.
TARGETS = {"infer_peak_mb": 3.5, "infer_latency_s": 1.3, "train_peak_mb": 1.7}


def configure(p) -> None:
    benchmarks.gpu(p)
    p.set_defaults(func=run)


def check_device(device: str) -> None:
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible to PyTorch (use --device cpu for a smoke run)")


def machine(device: str) -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "host": platform.node()}
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_mem_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1)
    return info


def ratios(results: list[dict]) -> list[str]:
    """VAR's figure over MVAR's for the three quantities the targets name (higher is better for MVAR)."""
    by = {r["variant"]: r for r in results}
    if "var" not in by or "mvar" not in by:
        return []
    lines = []
    for key, target in TARGETS.items():
        v, m = by["var"].get(key), by["mvar"].get(key)
        if v is None or m is None:
            continue
        if m <= 0:
            lines.append(f"var / mvar {key}: n/a (var {v:.3g}, mvar {m:.3g})")
            continue
        ok = "met" if v / m >= target else "NOT met"
        lines.append(f"var / mvar {key}: {v / m:.2f}x (target >= {target}x: {ok})")
    return lines


def window_backends(text: str, device: str) -> list[str]:
    """The backends MVAR is measured with beside the main run: NATTEN, compiled Flex and masked SDPA on CUDA."""
    if text != "auto":
        names = [b.strip() for b in text.split(",") if b.strip()]
        bad = [b for b in names if b not in BACKENDS or b == "auto"]
        if bad:
            raise UserError(f"--window-backends: unknown {bad}; known: {', '.join(b for b in BACKENDS if b != 'auto')}")
        return names
    if not device.startswith("cuda"):
        return []  # CPU Flex has no backward (training steps) and compiles per shape: not a smoke run's business
    return (["natten"] if natten_available() else []) + ["flex", "reference"]


def backend_table(rows: list[dict]) -> str:
    lines = ["| mvar window backend | infer s/batch | infer first s | infer peak MB | train s/pyramid | train peak MB |",
             "| --- | --- | --- | --- | --- | --- |"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for r in rows:
        lines.append(f"| {r['backend']} | {fmt(r['infer_latency_s'])} | {fmt(r.get('infer_first_s'))} | "
                     f"{fmt(r['infer_peak_mb'])} | {fmt(r.get('train_pyramid_s'))} | {fmt(r.get('train_peak_mb'))} |")
    return "\n".join(lines)


def run(args) -> int:
    variants = benchmarks.variant_list("--variants", args.variants)
    extra_backends = window_backends(args.window_backends, args.device)
    check_device(args.device)
    tiny = args.size == "tiny"
    batch = args.batch or (2 if tiny else 32)
    resolution = args.resolution or (64 if tiny else 256)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0, results = time.perf_counter(), []
    for variant in variants:
        spec = BenchSpec(variant=variant, size=args.size, batch=batch, resolution=resolution, device=args.device,
                         repeats=args.repeats, backend=args.backend, top_k=20 if tiny else 900)
        print(f"measuring {variant}-{args.size} (batch {batch}, {resolution} px) ...", file=sys.stderr, flush=True)
        results.append(run_variant(asdict(spec)))
    by_backend = []
    for backend in extra_backends:
        spec = BenchSpec(variant="mvar", size=args.size, batch=batch, resolution=resolution, device=args.device,
                         repeats=args.repeats, backend=backend, top_k=20 if tiny else 900)
        print(f"measuring mvar-{args.size} with window backend {backend} ...", file=sys.stderr, flush=True)
        by_backend.append(run_variant(asdict(spec)))
    md = "\n".join([table(results), "", *ratios(results), "", *([backend_table(by_backend), ""] if by_backend else []),
                    f"{args.size}, batch {batch}, {resolution} px, cfg 1.5, device {args.device} "
                    f"({machine(args.device).get('gpu', 'cpu')}), peak: {results[0]['memory_method']}, "
                    f"wall {time.perf_counter() - t0:.0f} s"])
    report = {"args": benchmarks.report_args(args), "machine": machine(args.device), "wall_s": time.perf_counter() - t0,
              "results": results, "ratios": ratios(results), "window_backends": by_backend}
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2))
    (out / "bench_gpu.md").write_text(md + "\n")
    print(md)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m workflows.bench_gpu", benchmarks.GPU, configure), argv,
                   name="workflows.bench_gpu")


if __name__ == "__main__":
    sys.exit(main())
