"""The flags of the benchmark entry points, torch-free: `mvar bench SUBCOMMAND` (mvar/commands/bench.py)
and the module entry points (`python -m tools.bench_window` ...) build their parsers from these
functions, so both take the same flags. Each harness module adds its own ``func`` (and hidden flags).
"""
from __future__ import annotations

import argparse

from mvar.errors import UserError
from mvar.models.config import BACKENDS, PATTERNS

WINDOW = "CPU window attention: reference, banded and compiled flex, and dense attention for scale."
COMPARE_AUTHORS = "Our VAR / scale-Markov / MVAR beside the authors' own code, measured in one run on one machine."
GPU = "The GPU benchmark in one go: VAR, scale-Markov and MVAR at d16, batch 32, 256 px (docs/benchmarks.md)."
TRAIN = "Training throughput of the tiny models with 1 and 2 Ray Train CPU workers (docs/benchmarks.md)."
PROFILE = ("Where one generate call's time goes: torch.profiler's self time per op, grouped (linear layers, "
           "attention, KV cache, elementwise, sampling), per variant, in one process.")
DATA = "Data throughput benchmark: packing (images/s per core) and loading (decoded images/s per worker)."


def window(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sides", default="13,16,24,32", help="map sides to time, comma-separated")
    p.add_argument("--window", default="3,5,7,9", help="k of the k x k window, comma-separated")
    p.add_argument("--repeats", type=int, default=9, help="timed calls per case (the first is dropped)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def compare_authors(p: argparse.ArgumentParser) -> None:
    p.add_argument("--var-dir", help="a checkout of FoundationVision/VAR")
    p.add_argument("--mvar-dir", help="a checkout of CVL-UESTC/MVAR")
    p.add_argument("--resolution", default="256,512", help="image sizes in px, comma-separated")
    p.add_argument("--size", default="d8", help="model size of the registry")
    p.add_argument("--batch", type=int, default=None, help="default: 8 at 256 px, 2 at 512 px")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance at the last scale")
    p.add_argument("--top-k", type=int, default=900, help="top-k of the sampling")
    p.add_argument("--top-p", type=float, default=0.96, help="top-p of the sampling")
    p.add_argument("--repeats", type=int, default=2, help="measured calls per phase after a warm-up")
    p.add_argument("--rounds", type=int, default=1, help="every process again, in turn (interleaved A/B)")
    p.add_argument("--ab-rounds", type=int, default=3,
                   help="then every implementation's generate call in turn in one process, this many rounds (0: off)")
    p.add_argument("--train-rounds", type=int, default=3,
                   help="then every implementation's training, a full pyramid each in turn in one process, this many "
                        "rounds (0: off; --no-train: off)")
    p.add_argument("--in-turn-only", action="store_true",
                   help="only the in-turn times, generate and training (no peaks, no own-process runs)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="our attention backend")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--json", default=None, help="also write the report as JSON to this file")
    p.add_argument("--plot", default=None, help="PNG: our variants' time and peak memory against tokens per batch")


def gpu(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=",".join(PATTERNS), help="comma-separated attention patterns")
    p.add_argument("--size", default="d16", help="model size of the registry (tiny for a smoke run)")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: 32 (d16), 2 (tiny))")
    p.add_argument("--resolution", type=int, default=None, help="image size in px (default: 256, 64 for tiny)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:1 ..., or cpu for a smoke run")
    p.add_argument("--repeats", type=int, default=5, help="measured repetitions per phase")
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="window attention: auto (NATTEN, else compiled Flex), flex ...")
    p.add_argument("--window-backends", default="auto",
                   help="MVAR again with each of these window backends, comma-separated (auto: natten when installed, "
                        "flex and reference on CUDA, none on CPU; '': none)")
    p.add_argument("--out", default="out/bench_gpu", help="folder of bench_gpu.json and bench_gpu.md")


def train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/bench-train", help="inputs, runs, MLflow store and bench_train.json")
    p.add_argument("--steps", type=int, default=200, help="training steps per run")
    p.add_argument("--batch", type=int, default=16, help="batch per worker")


def profile(p: argparse.ArgumentParser) -> None:
    p.add_argument("--variants", default=",".join(PATTERNS), help="comma-separated attention patterns")
    p.add_argument("--size", default="d8", help="model size of the registry")
    p.add_argument("--resolution", type=int, default=512, help="image size in px")
    p.add_argument("--batch", type=int, default=None, help="images per batch (default: 8 at 256 px, 2 otherwise)")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance at the last scale")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="attention backend of the windowed scales")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--top", type=int, default=12, help="ops listed per variant")
    p.add_argument("--json", default=None, help="also write the grouped self times as JSON to this file")


def data(p: argparse.ArgumentParser) -> None:
    p.add_argument("--work", default="/tmp/mvar-data-bench", help="scratch directory (kept for reruns)")
    p.add_argument("--num-images", type=int, default=600, help="images of the synthetic source tree")
    p.add_argument("--image-size", type=int, default=256, help="side of the packed images in px")
    p.add_argument("--formats", nargs="+", default=["png", "jpg"], choices=["png", "jpg"],
                   help="shard image encodings to compare")
    p.add_argument("--pack-workers", type=int, nargs="+", default=[1, 2], help="`mvar data pack` process counts")
    p.add_argument("--loader-workers", type=int, nargs="+", default=[1, 2], help="DataLoader worker counts")
    p.add_argument("--batch-size", type=int, default=32, help="images per loader batch")
    p.add_argument("--steps", type=int, default=30, help="timed batches per loader run")


def int_list(flag: str, text: str) -> list[int]:
    """A comma-separated flag of positive integers (`--resolution 256,512`), or a one-line error naming it."""
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected integers separated by commas, got '{text}'") from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag}: expected positive integers, got '{text}'")
    return values


def variant_list(flag: str, text: str) -> list[str]:
    """A comma-separated list of attention patterns, or a one-line error naming the flag."""
    variants = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in variants if v not in PATTERNS]
    if bad or not variants:
        raise UserError(f"{flag}: {f'unknown {bad}' if bad else 'none given'}; known: {', '.join(PATTERNS)}")
    return variants


def report_args(args: argparse.Namespace) -> dict:
    """The parsed flags as a result file records them (without the command's function)."""
    return {k: v for k, v in vars(args).items() if not callable(v)}
