"""`mvar bench`: inference and training memory/speed of each attention variant, one process each."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict

from mvar.errors import UserError
from mvar.models.config import BACKENDS, PATTERNS, SIZES

COLUMNS = [  # (header, key, format)
    ("variant", "variant", "{}"),
    ("px", "resolution", "{}"),
    ("batch", "batch", "{}"),
    ("infer s/batch", "infer_latency_s", "{:.3f}"),
    ("infer peak +MB", "infer_peak_mb", "{:.1f}"),
    ("KV cache MB", "kv_cache_mb", "{:.1f}"),
    ("attn GFLOPs/img", "attn_gflops", "{:.4g}"),
    ("train s/pyramid", "train_pyramid_s", "{:.3f}"),
    ("train tokens/s", "train_tokens_per_s", "{:.0f}"),
    ("train s/step (raw)", "train_step_s", "{:.3f}"),
    ("train peak +MB", "train_peak_mb", "{:.1f}"),
    ("packed s/step", "packed_s", "{:.3f}"),
    ("packed peak +MB", "packed_mb", "{:.1f}"),
]


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


def run_variant(spec: dict) -> dict:
    from mvar.measure import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-m", "mvar.bench", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"benchmark of variant '{spec['variant']}' failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    rows = []
    for r in results:
        packed = r.get("train_steps", {}).get("packed", {})
        r = {**r, "packed_s": packed.get("step_s"), "packed_mb": packed.get("peak_mb")}
        rows.append([fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in COLUMNS])
    headers = [h for h, _, _ in COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def int_list(flag: str, text: str) -> list[int]:
    try:
        values = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag}: expected integers separated by commas, got '{text}'") from None
    if not values or min(values) <= 0:
        raise UserError(f"{flag}: expected positive integers, got '{text}'")
    return values


def variant_list(text: str) -> list[str]:
    """--variants: attention patterns separated by commas, at least one, each known."""
    variants = [v.strip() for v in str(text).split(",") if v.strip()]
    bad = [v for v in variants if v not in PATTERNS]
    if bad or not variants:
        raise UserError(f"--variants: {f'unknown {bad}' if bad else 'none given'}; known: {', '.join(PATTERNS)}")
    return variants


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
    resolutions, batches = int_list("--resolution", args.resolution), int_list("--batch", args.batch)
    if len(batches) == 1:
        batches = batches * len(resolutions)
    if len(batches) != len(resolutions):
        raise UserError(f"--batch: {len(batches)} values for {len(resolutions)} resolutions; give one or one each")
    return list(zip(resolutions, batches))


def run(args: argparse.Namespace) -> int:
    from mvar.bench import BenchSpec
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
            json.dump({"args": vars(args) | {"func": None}, "results": results}, fh, indent=2)
    if args.plot:
        plot_scaling(results, args.plot)
    return 0


def tokens_per_batch(result: dict) -> int:
    from mvar.bench import BenchSpec, tokenizer_config

    tok = tokenizer_config(BenchSpec(variant=result["variant"], size=result["size"], resolution=result["resolution"]))
    return result["batch"] * sum(p * p for p in tok.patch_nums)


def plot_scaling(results: list[dict], path: str) -> None:
    """Four panels (inference time, inference peak, training step, training peak) against tokens per batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("infer_latency_s", "generate a batch, s"), ("infer_peak_mb", "inference peak above baseline, MB"),
              ("train_step_s", "training step, s (MVAR: cycle mean)"), ("train_peak_mb", "training peak, MB")]
    panels = [(key, title) for key, title in panels if any(r.get(key) is not None for r in results)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.5 * len(panels), 3.4), squeeze=False)
    axes = axes[0]
    for ax, (key, title) in zip(axes, panels):
        for variant in dict.fromkeys(r["variant"] for r in results):
            rows = sorted((tokens_per_batch(r), r[key], r["resolution"]) for r in results
                          if r["variant"] == variant and r.get(key) is not None)
            if rows:
                ax.plot([x for x, _, _ in rows], [y for _, y, _ in rows], marker="o", label=variant)
                for x, y, px in rows:
                    ax.annotate(f"{px}px", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("tokens per batch (batch x L)", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    r0 = results[0]
    fig.suptitle(f"{r0['size']} on {r0['device']}, cfg 1.5, top-k 900, top-p 0.96", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
