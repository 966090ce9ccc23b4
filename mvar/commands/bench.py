"""`mvar bench`: inference and training memory/speed of each attention variant, one process each; and the
project's other benchmarks as sub-commands.

    mvar bench --variants var,scale_markov,mvar --size d8 ...   # the variants' table (python -m mvar.bench each)
    mvar bench window ...            # = python -m tools.bench_window      (CPU window attention backends)
    mvar bench compare-authors ...   # = python -m tools.compare_authors   (ours beside the authors' code)
    mvar bench gpu ...               # = python -m workflows.bench_gpu     (the d16 GPU benchmark)
    mvar bench train ...             # = python -m workflows.bench_train   (Ray Train throughput, tiny models)
    mvar bench data ...              # = python -m mvar.data.bench         (packing and loading throughput)
    mvar bench profile ...           # = python -m tools.profile_generate  (where a generate call's time goes)

The module entry points stay (aliases with the same flags: mvar/commands/benchmarks.py); tools/ is not
installed with the package, so its two run from a checkout of the project.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from mvar.commands import benchmarks
from mvar.errors import UserError
from mvar.models.config import BACKENDS, PATTERNS, SIZES


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="memory and speed of var / scale_markov / mvar",
                              description="Measure inference latency and peak memory, KV-cache size, attention "
                                          "FLOPs, training step time and peak memory for each variant, each in "
                                          "its own process. VAR trains on full sequences; scale_markov and mvar on "
                                          "the 8:1:1 scale cycle (averaged) and packed.")
    p.add_argument("--variants", default=",".join(PATTERNS), help=f"comma-separated attention patterns ({', '.join(PATTERNS)})")
    p.add_argument("--size", default="d8", help="tiny, d4, d8, d16, d20, d24, d30")
    p.add_argument("--batch", default="8", help="images per batch; a list (8,2) gives one per resolution")
    p.add_argument("--resolution", default="256", help="256, 512, or a list: 256,512 (the scaling table)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance; 0 turns CFG (and the doubled batch) off")
    p.add_argument("--repeats", type=int, default=3, help="measured repetitions per phase (median time, max peak)")
    p.add_argument("--window-size", type=int, default=None, help="k of mvar's window (default: the size's)")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="attention backend of the windowed scales")
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.add_argument("--plot", default=None, help="a PNG of time and peak memory against tokens per batch, per variant")
    p.set_defaults(func=run)
    add_benchmarks(p)


def add_benchmarks(p: argparse.ArgumentParser) -> None:
    """The sub-commands: each benchmark entry point's flags, run in this process."""
    subs = p.add_subparsers(dest="benchmark", metavar="BENCHMARK",
                            help="another benchmark instead of the variants' table: " + ", ".join(
                                name for name, *_ in BENCHMARKS))
    for name, help_text, description, configure, func in BENCHMARKS:
        sub = subs.add_parser(name, help=help_text, description=description)
        configure(sub)
        sub.set_defaults(func=func)


def outside_checkout(err: ModuleNotFoundError) -> Exception:
    """tools/ is not installed with the package: only a checkout of the project has its benchmarks."""
    if err.name != "tools" and not (err.name or "").startswith("tools."):
        return err
    return UserError("this is a developer benchmark of the project's checkout (tools/ is not installed with the "
                     "package); run it from the repository's root")


def run_window(args: argparse.Namespace) -> int:
    try:
        from tools import bench_window
    except ModuleNotFoundError as err:
        raise outside_checkout(err) from None
    return bench_window.run(args)


def run_compare_authors(args: argparse.Namespace) -> int:
    try:
        from tools import compare_authors
    except ModuleNotFoundError as err:
        raise outside_checkout(err) from None
    return compare_authors.run(args)


def run_profile(args: argparse.Namespace) -> int:
    try:
        from tools import profile_generate
    except ModuleNotFoundError as err:
        raise outside_checkout(err) from None
    return profile_generate.run(args)


def run_gpu(args: argparse.Namespace) -> int:
    from workflows import bench_gpu
    return bench_gpu.run(args)


def run_train(args: argparse.Namespace) -> int:
    from workflows import bench_train
    return bench_train.run(args)


def run_data(args: argparse.Namespace) -> int:
    from mvar.data import bench as data_bench
    return data_bench.run(args)


# (sub-command, help, description, flags, function)
BENCHMARKS = [
    ("window", "CPU window attention: reference vs banded vs dense", benchmarks.WINDOW, benchmarks.window,
     run_window),
    ("compare-authors", "ours beside the authors' VAR and MVAR code, one machine", benchmarks.COMPARE_AUTHORS,
     benchmarks.compare_authors, run_compare_authors),
    ("gpu", "the GPU benchmark: var / scale_markov / mvar at d16, batch 32", benchmarks.GPU, benchmarks.gpu, run_gpu),
    ("train", "training throughput of the tiny models on 1 and 2 Ray Train workers", benchmarks.TRAIN,
     benchmarks.train, run_train),
    ("data", "packing and loading throughput of image shards", benchmarks.DATA, benchmarks.data, run_data),
    ("profile", "where one generate call's time goes, per variant", benchmarks.PROFILE, benchmarks.profile,
     run_profile),
]


def variant_list(text: str) -> list[str]:
    """--variants: attention patterns separated by commas, at least one, each known."""
    return benchmarks.variant_list("--variants", text)


def check_specs(args: argparse.Namespace, variants: list[str], resolutions: list[int]) -> None:
    """Each resolution (and --window-size) against the size's tokenizer here, before any child process."""
    from mvar.bench import BenchSpec, tokenizer_config
    from mvar.config import ConfigError
    from mvar.models.config import named_model
    for resolution in resolutions:
        for variant in variants:
            try:
                tok = tokenizer_config(BenchSpec(variant=variant, size=args.size, resolution=resolution))
            except ValueError as err:
                raise UserError(f"--resolution {resolution}: {err}") from None
            if args.window_size is not None:
                try:
                    named_model(f"{variant}-{args.size}", window_size=args.window_size).check_scales(tok.patch_nums)
                except ConfigError as err:
                    raise UserError(f"--window-size {args.window_size}: {err}") from None


def settings(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(resolution, batch) pairs: one batch for all, or one per resolution."""
    resolutions = benchmarks.int_list("--resolution", args.resolution)
    batches = benchmarks.int_list("--batch", args.batch)
    if len(batches) == 1:
        batches = batches * len(resolutions)
    if len(batches) != len(resolutions):
        raise UserError(f"--batch: {len(batches)} values for {len(resolutions)} resolutions; give one or one each")
    return list(zip(resolutions, batches))


def run(args: argparse.Namespace) -> int:
    from mvar.bench import BenchSpec, plot_scaling, run_variant, table
    from mvar.sampling import check_device

    variants = variant_list(args.variants)
    if args.size not in SIZES:
        raise UserError(f"--size: unknown '{args.size}'; known: {', '.join(SIZES)}")
    pairs = settings(args)
    check_specs(args, variants, [resolution for resolution, _ in pairs])
    check_device(args.device)
    results = []
    for resolution, batch in pairs:
        for variant in variants:
            spec = BenchSpec(variant=variant, size=args.size, batch=batch, resolution=resolution,
                             device=args.device, cfg=args.cfg, repeats=args.repeats, window_size=args.window_size,
                             backend=args.backend, train=not args.no_train, threads=args.threads)
            print(f"measuring {variant}-{args.size} at {resolution} px ...", file=sys.stderr, flush=True)
            results.append(run_variant(asdict(spec)))
    print(table(results))
    print(f"\ncfg {args.cfg}, device {args.device}; "
          f"peak memory: {results[0]['memory_method']}; train s/pyramid: every scale trained once (VAR: one "
          "step; scale_markov/mvar: one small-scales step plus one step per windowed scale), the like-for-like "
          "figure; train s/step (raw) and peak for scale_markov/mvar: the 8:1:1 cycle (time averaged, "
          "peak = max over its steps); attn GFLOPs: QK^T+PV over attended pairs, "
          "one sequence per image (CFG doubles it)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": benchmarks.report_args(args), "results": results}, fh, indent=2)
    if args.plot:
        plot_scaling(results, args.plot)
    return 0


