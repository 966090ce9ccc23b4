"""CPU window attention: every backend that runs here (reference, banded, compiled flex) and dense attention.

    python -m tools.bench_window [--sides 13,16,24,32] [--window 3,5,7,9] [--repeats 9] [--threads 2]   # = mvar bench window

The shapes of d8 sampling with CFG (batch 8 at 13 and 16, batch 2 at 24 and 32: 16 or 4 rows, 8 heads,
head dim 64) and of its training step (half the rows, forward + backward; compiled flex has no backward
on CPU, so it is timed forward only). q, k and v are the permuted views the model hands over. The
variants take turns call by call, so other load slows them alike; each cell is the median over the
repeats in ms, and `first` is each backend's first call (compiled flex: its compile included, in a fresh
inductor cache) in ms. Where each wins is the rule of `auto` (mvar.models.attention.CPU_AUTO).
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from mvar.commands import benchmarks, run_cli, standalone
from mvar.models.attention import flex_has_backward, window_attention

ROWS = {13: 16, 16: 16, 24: 4, 32: 4}  # 2B rows of d8 sampling at 256 px (13, 16) and 512 px (24, 32)
BACKENDS = ("reference", "banded", "flex")


def qkv(rows: int, side: int, grad: bool, heads: int = 8, head_dim: int = 64):
    x = torch.randn(rows, side * side, 3, heads, head_dim, requires_grad=grad)
    return x.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views, as SelfAttention makes them


def variants(side: int, window: int, grad: bool):
    fns = {name: (lambda q, k, v, name=name: window_attention(q, k, v, side, window, 0.125, backend=name))
           for name in BACKENDS if not (grad and name == "flex" and not flex_has_backward(torch.device("cpu")))}
    fns["dense"] = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.125)
    return fns


def measure(side: int, window: int, grad: bool, repeats: int) -> dict[str, tuple[float, float]]:
    """{variant: (first call ms, median ms of the repeats after it)}."""
    rows = ROWS.get(side, 4) // (2 if grad else 1)
    q, k, v = qkv(rows, side, grad)
    fns, times = variants(side, window, grad), {}
    for _ in range(repeats + 1):  # the first round: first calls (compiles, caches)
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn(q, k, v)
            if grad:
                out.square().sum().backward()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    return {name: (t[0] * 1e3, statistics.median(t[1:]) * 1e3) for name, t in times.items()}


def row(side: int, window: int, grad: bool, t: dict[str, tuple[float, float]]) -> str:
    cell = lambda name: f"{t[name][1]:.1f}" if name in t else "-"  # noqa: E731
    fastest = min((n for n in t if n != "dense"), key=lambda n: t[n][1])
    first = f"{t['flex'][0]:.0f}" if "flex" in t else "-"
    return (f"| {side}x{side} | {window} | {'fwd+bwd' if grad else 'fwd'} | " + " | ".join(cell(n) for n in BACKENDS)
            + f" | {cell('dense')} | {first} | **{fastest}** |")


def configure(p) -> None:
    benchmarks.window(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    sides, windows = benchmarks.int_list("--sides", args.sides), benchmarks.int_list("--window", args.window)
    # a fresh inductor cache, so each first flex call includes its whole compile (a warm cache would hide it)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="bench_window_inductor_"))
    print(f"load before {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| map | k | pass | " + " | ".join(f"{n} ms" for n in BACKENDS) + " | dense ms | flex first call ms | fastest |")
    print("| --- " * (len(BACKENDS) + 6) + "|")
    for side in sides:
        for window in (w for w in windows if w < side):
            for grad in (False, True):
                with torch.set_grad_enabled(grad):
                    print(row(side, window, grad, measure(side, window, grad, args.repeats)), flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m tools.bench_window", benchmarks.WINDOW, configure), argv,
                   name="tools.bench_window")


if __name__ == "__main__":
    sys.exit(main())
