"""CPU window attention: reference (one masked SDPA call) against banded, and dense attention for scale.

    python -m tools.bench_window [--sides 13,16,24,32] [--repeats 9] [--threads 2]   # = mvar bench window

The shapes of d8 sampling with CFG (batch 8 at 13 and 16, batch 2 at 24 and 32: 16 or 4 rows, 8 heads,
head dim 64) and of its training step (half the rows, forward + backward). q, k and v are the
permuted views the model hands over. The variants take turns call by call, so other load slows them
alike; each cell is the median over the repeats in ms. Where banded beats reference is the crossover
that `auto` uses (mvar.models.attention.BANDED_MIN_SIDE).
"""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from mvar.commands import benchmarks, run_cli, standalone
from mvar.models.attention import window_attention

ROWS = {13: 16, 16: 16, 24: 4, 32: 4}  # 2B rows of d8 sampling at 256 px (13, 16) and 512 px (24, 32)


def qkv(rows: int, side: int, grad: bool, heads: int = 8, head_dim: int = 64):
    x = torch.randn(rows, side * side, 3, heads, head_dim, requires_grad=grad)
    return x.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, N, d) views, as SelfAttention makes them


def variants(side: int, window: int):
    dense = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, scale=0.125)  # noqa: E731
    return {"reference": lambda q, k, v: window_attention(q, k, v, side, window, 0.125, backend="reference"),
            "banded": lambda q, k, v: window_attention(q, k, v, side, window, 0.125, backend="banded"),
            "dense (scale_markov)": dense}


def measure(side: int, window: int, grad: bool, repeats: int) -> dict[str, float]:
    rows = ROWS.get(side, 4) // (2 if grad else 1)
    q, k, v = qkv(rows, side, grad)
    fns, times = variants(side, window), {}
    for _ in range(repeats + 1):  # the first round warms up
        for name, fn in fns.items():
            t0 = time.perf_counter()
            out = fn(q, k, v)
            if grad:
                out.square().sum().backward()
            times.setdefault(name, []).append(time.perf_counter() - t0)
    return {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}


def configure(p) -> None:
    benchmarks.window(p)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load before {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| map | pass | reference ms | banded ms | dense ms | banded / reference |")
    print("| --- | --- | --- | --- | --- | --- |")
    for side in benchmarks.int_list("--sides", args.sides):
        for grad in (False, True):
            with torch.set_grad_enabled(grad):
                t = measure(side, args.window, grad, args.repeats)
            print(f"| {side}x{side} | {'fwd+bwd' if grad else 'fwd'} | {t['reference']:.1f} | {t['banded']:.1f} | "
                  f"{t['dense (scale_markov)']:.1f} | {t['banded'] / t['reference']:.2f} |", flush=True)
    print(f"load after {os.getloadavg()[0]:.2f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m tools.bench_window", benchmarks.WINDOW, configure), argv,
                   name="tools.bench_window")


if __name__ == "__main__":
    sys.exit(main())
