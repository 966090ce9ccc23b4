"""`mvar bench`: inference and training memory/speed of each attention variant, one process each."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict

from mvar.errors import UserError

COLUMNS = [  # (header, key, format)
    ("variant", "variant", "{}"),
    ("infer s/batch", "infer_latency_s", "{:.3f}"),
    ("infer peak +MB", "infer_peak_mb", "{:.1f}"),
    ("KV cache MB", "kv_cache_mb", "{:.1f}"),
    ("attn GFLOPs/img", "attn_gflops", "{:.4g}"),
    ("train s/step", "train_step_s", "{:.3f}"),
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
    p.add_argument("--variants", default="var,scale_markov,mvar")
    p.add_argument("--size", default="d8", help="tiny, d4, d8, d16, d20, d24, d30")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance; 0 turns CFG (and the doubled batch) off")
    p.add_argument("--repeats", type=int, default=3, help="measured repetitions per phase (median time, max peak)")
    p.add_argument("--window-size", type=int, default=None)
    p.add_argument("--backend", default="auto", choices=["auto", "reference", "banded", "flex", "natten"])
    p.add_argument("--no-train", action="store_true", help="inference only")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
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


def run(args: argparse.Namespace) -> int:
    from mvar.bench import BenchSpec

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("var", "scale_markov", "mvar")]
    if bad:
        raise UserError(f"--variants: unknown {bad}; known: var, scale_markov, mvar")
    from mvar.models.config import SIZES
    if args.size not in SIZES:
        raise UserError(f"--size: unknown '{args.size}'; known: {', '.join(SIZES)}")
    results = []
    for variant in variants:
        spec = BenchSpec(variant=variant, size=args.size, batch=args.batch, resolution=args.resolution,
                         device=args.device, cfg=args.cfg, repeats=args.repeats, window_size=args.window_size,
                         backend=args.backend, train=not args.no_train, threads=args.threads)
        print(f"measuring {variant}-{args.size} ...", file=sys.stderr, flush=True)
        results.append(run_variant(asdict(spec)))
    print(table(results))
    print(f"\nbatch {args.batch}, {args.resolution} px, cfg {args.cfg}, device {args.device}; "
          f"peak memory: {results[0]['memory_method']}; train s/step and peak for scale_markov/mvar: "
          "8:1:1 cycle (time averaged, peak = max over its steps); attn GFLOPs: QK^T+PV over attended pairs, "
          "one sequence per image (CFG doubles it)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args) | {"func": None}, "results": results}, fh, indent=2)
    return 0
