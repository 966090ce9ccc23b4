"""Where one generate call's time goes: torch.profiler's self CPU time per op, per variant, one process.

    python -m tools.profile_generate --variants var,scale_markov,mvar --resolution 512   # = mvar bench profile

Each variant is built with the benchmark's random weights (`mvar.bench.build`), called once to warm up
(masks, caches), then profiled for one call. Ops are grouped into what they are in this model: the
linear layers (qkv, proj, FFN, AdaLN, head: the same work in every variant), fused attention, VAR's KV
cache concatenation, sampling (top-k and the draw) and the elementwise rest. The groups say what bounds
a variant: with its attention free, a variant cannot be faster than the rest of its call.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from mvar.commands import benchmarks, run_cli, standalone

GROUPS = {  # profiler op name -> group; anything else is "other"
    "aten::addmm": "linear", "aten::mm": "linear", "aten::bmm": "linear",
    "aten::_scaled_dot_product_flash_attention_for_cpu": "attention",
    "aten::_scaled_dot_product_efficient_attention": "attention", "aten::_flash_attention_forward": "attention",
    "aten::cat": "cat (KV cache, embeddings)",
    "aten::topk": "sampling", "aten::exponential_": "sampling", "aten::multinomial": "sampling",
    "aten::copy_": "elementwise", "aten::gelu": "elementwise", "aten::native_layer_norm": "elementwise",
    "aten::mul": "elementwise", "aten::add": "elementwise", "aten::div": "elementwise", "aten::add_": "elementwise",
    "aten::mul_": "elementwise", "aten::linalg_vector_norm": "elementwise", "aten::sub_": "elementwise",
    "aten::_softmax": "elementwise", "aten::clamp_min": "elementwise",
    "aten::mkldnn_convolution": "quantizer (phi convs, resizing)", "aten::upsample_bicubic2d": "quantizer (phi convs, resizing)",
    "aten::_upsample_bilinear2d_aa": "quantizer (phi convs, resizing)", "aten::upsample_bilinear2d": "quantizer (phi convs, resizing)",
    "aten::_upsample_bicubic2d_aa": "quantizer (phi convs, resizing)",
}


def group_of(op: str) -> str:
    if op in GROUPS:
        return GROUPS[op]
    return "attention" if "flex_attention" in op or "scaled_dot_product" in op else "other"


def profile_variant(variant: str, args) -> dict:
    """Wall seconds of a warm call, then the profiled call's self time: per group and the top ops."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mvar.bench import BenchSpec, build
    from mvar.sampling import generate, make_generator

    batch = args.batch or (8 if args.resolution == 256 else 2)
    torch.manual_seed(0)
    model, quant = build(BenchSpec(variant=variant, size=args.size, batch=batch, resolution=args.resolution,
                                   backend=args.backend), torch.device("cpu"))
    model.eval()
    labels = torch.arange(batch) % model.num_classes

    def call():
        return generate(model, quant, labels, cfg=args.cfg, top_k=900, top_p=0.96,
                        generator=make_generator(0, torch.device("cpu")))
    call()  # warm-up
    t0 = time.perf_counter()
    call()
    wall = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        call()
    ops = sorted(((e.key, e.count, e.self_cpu_time_total / 1e6) for e in prof.key_averages()), key=lambda o: -o[2])
    groups: dict[str, float] = {}
    for name, _, seconds in ops:
        groups[group_of(name)] = groups.get(group_of(name), 0.0) + seconds
    return {"variant": variant, "batch": batch, "wall_s": wall, "self_s": sum(g for g in groups.values()),
            "groups": groups, "top": [{"op": n, "calls": c, "self_s": s} for n, c, s in ops[:args.top]]}


def report(result: dict) -> str:
    total = result["self_s"]
    lines = [f"{result['variant']}: warm call {result['wall_s']:.2f} s wall; profiled self time {total:.2f} s",
             "| group | self s | share |", "| --- | --- | --- |"]
    for name, seconds in sorted(result["groups"].items(), key=lambda g: -g[1]):
        lines.append(f"| {name} | {seconds:.3f} | {100 * seconds / total:.1f} % |")
    lines += ["", "| op | calls | self s |", "| --- | --- | --- |"]
    lines += [f"| {o['op']} | {o['calls']} | {o['self_s']:.3f} |" for o in result["top"]]
    return "\n".join(lines)


def bounds(results: list[dict]) -> list[str]:
    """Each variant's self time without its attention (and KV cache), against VAR's whole call."""
    var = next((r for r in results if r["variant"] == "var"), None)
    if var is None:
        return []
    out = []
    for r in results:
        rest = r["self_s"] - r["groups"].get("attention", 0.0) - r["groups"].get("cat (KV cache, embeddings)", 0.0)
        out.append(f"{r['variant']}: self time {r['self_s'] / var['self_s']:.3f}x VAR's; without attention and "
                   f"concatenation {rest / var['self_s']:.3f}x (the bound if attention were free)")
    return out


def configure(p) -> None:
    benchmarks.profile(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import torch
    variants = benchmarks.variant_list("--variants", args.variants)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"load before {os.getloadavg()[0]:.2f}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"{args.size}, {args.resolution} px, CFG {args.cfg}, backend {args.backend}")
    results = []
    for variant in variants:
        results.append(profile_variant(variant, args))
        print("\n" + report(results[-1]), flush=True)
    print("\n" + "\n".join(bounds(results)) + f"\nload after {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": benchmarks.report_args(args), "results": results}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m tools.profile_generate", benchmarks.PROFILE, configure), argv,
                   name="tools.profile_generate")


if __name__ == "__main__":
    sys.exit(main())
