"""Our VAR / scale-Markov / MVAR beside the authors' own code, measured in one run on one machine.

    python -m tools.compare_authors --var-dir /path/to/FoundationVision-VAR --mvar-dir /path/to/CVL-UESTC-MVAR \
        --resolution 256,512 --json out/compare_authors.json          # = mvar bench compare-authors ...

Each measured thing runs in its own process (as `mvar bench` does), so peaks do not mix, and the
processes take turns round by round, so load from other jobs slows them alike. The authors' modules
are imported from the given checkouts at run time; nothing of theirs is copied here. Their models get
our weights (our parameter names are VAR's) and our quantizer's weights, and run as their code does,
with two substitutions, both at run time in the measuring process:
- their MVAR calls NATTEN's na2d, which has no CPU kernel: its neighbourhood-attention function is
  replaced by our masked-SDPA window (mvar.models.attention, backend 'reference');
- their VAR sampler decodes the image at the end: the decoder is skipped (ours is timed without it).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import types
from dataclasses import asdict
from pathlib import Path

from mvar.commands import benchmarks, run_cli, standalone
from mvar.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_BATCH = {256: 8, 512: 2}


# -- the authors' side, inside its own process --------------------------------------------------------

def import_authors(directory: str, variant: str):
    """Their `models` package from ``directory``; stand-ins for the imports that cannot run here."""
    import torch

    from mvar.models.attention import window_attention

    sys.path.insert(0, directory)
    for name in ("huggingface_hub", "einops", "natten"):
        try:
            __import__(name)
        except ImportError:  # only names are needed at import time; the functions are replaced below
            stub = types.ModuleType(name)
            stub.PyTorchModelHubMixin = type("PyTorchModelHubMixin", (), {})
            stub.rearrange = stub.repeat = stub.na2d = _not_available
            sys.modules[name] = stub
    import models  # noqa: F401 (the authors' package)
    if variant == "mvar":
        import models.basic_mvar as basic

        def masked_sdpa_window(q, k, v, scale, attn_mask=None, kernel_size=7):
            B, H, L, d = q.shape
            side = int(round(L ** 0.5))
            out = window_attention(q, k, v, side, kernel_size, scale, backend="reference")
            return out.transpose(1, 2).reshape(B, L, H * d)

        basic.neighborhood_attn = masked_sdpa_window
    torch.set_grad_enabled(True)
    return sys.modules["models"]


def _not_available(*args, **kwargs):
    raise RuntimeError("replaced by compare_authors: this function should not be called")


def build_authors(spec: dict, ours, our_quant):
    """The authors' VQVAE + VAR (or MVAR) with our model's configuration and weights."""
    import importlib

    cfg, tok = ours.cfg, spec["tokenizer"]
    vqvae = importlib.import_module("models.vqvae")
    vae = vqvae.VQVAE(vocab_size=ours.V, z_channels=ours.Cvae, ch=tok["ch"], test_mode=True,
                      share_quant_resi=tok["share_quant_resi"], v_patch_nums=ours.patch_nums)
    vae.quantize.load_state_dict(our_quant.state_dict())
    common = dict(vae_local=vae, num_classes=cfg.num_classes, depth=cfg.depth, embed_dim=cfg.width,
                  num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, drop_rate=0.0, attn_drop_rate=0.0,
                  drop_path_rate=cfg.drop_path, norm_eps=cfg.norm_eps, shared_aln=False, cond_drop_rate=0.0,
                  attn_l2_norm=cfg.attn_l2_norm, patch_nums=ours.patch_nums,
                  flash_if_available=False, fused_if_available=False)
    if spec["variant"] == "var":
        model = importlib.import_module("models.var").VAR(**common)
    else:
        model = importlib.import_module("models.mvar").MVAR(**common, kernel_size=cfg.window_size,
                                                             refine_step=cfg.markov_from_scale)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    derived = {"lvl_1L", "attn_bias_for_masking"}
    if set(missing) - derived or unexpected:
        raise RuntimeError(f"weights do not fit the authors' model: missing {missing}, unexpected {unexpected}")
    return model, vae


def authors_infer_fn(model, vae, spec: dict):
    import torch

    labels = torch.arange(spec["batch"]) % model.num_classes
    if spec["variant"] == "var":
        vae.fhat_to_img = lambda f_hat: f_hat  # their sampler decodes at the end; ours is timed without it
        return lambda: model.autoregressive_infer_cfg(B=spec["batch"], label_B=labels, g_seed=spec["seed"],
                                                      cfg=spec["cfg"], top_k=spec["top_k"], top_p=spec["top_p"])
    return lambda: model.autoregressive_infer(B=spec["batch"], label_B=labels, g_seed=spec["seed"],
                                              cfg=spec["cfg"], top_k=spec["top_k"], top_p=spec["top_p"])


def authors_train_fn(model, ours, spec: dict, scales: tuple[int, ...]):
    """One training step of the authors' model on ``scales`` (contiguous): forward, loss, backward, clip, AdamW."""
    import torch
    import torch.nn.functional as F

    B, L, first_l = spec["batch"], ours.L, ours.first_l
    gen = torch.Generator().manual_seed(spec["seed"])
    teacher = torch.randn(B, L - first_l, ours.Cvae, generator=gen)
    idx = torch.randint(ours.V, (B, L), generator=gen)
    labels = torch.randint(model.num_classes, (B,), generator=gen)
    bg, ed = ours.begin[scales[0]], ours.begin[scales[-1]] + ours.patch_nums[scales[-1]] ** 2
    opt = spec["_opt"]

    def step():
        if spec["variant"] == "var":
            logits = model(labels, teacher)
        else:
            logits = model(label_B=labels, x_BlCv_wo_first_l=teacher[:, max(0, bg - first_l):ed - first_l],
                           L_bg=bg, L_ed=ed, using_nattn=scales[0] >= ours.cfg.markov_from_scale)
        loss = F.cross_entropy(logits.float().reshape(-1, ours.V), idx[:, bg:ed].reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(fn, repeats: int, device) -> tuple[float, float]:
    """(median seconds, max peak MiB) of ``fn`` after one warm-up call."""
    from mvar.measure import PeakMemory, sync

    fn()
    times, peaks = [], []
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
        peaks.append(mem.peak)
    return statistics.median(times), max(peaks)


def authors_worker(spec: dict) -> dict:
    import gc

    import torch

    from mvar.bench import BenchSpec, build, pyramid_cost, summarize_training, train_kinds

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    import_authors(spec["dir"], spec["variant"])
    torch.manual_seed(spec["seed"])
    keys = {k: spec[k] for k in ("variant", "size", "batch", "resolution", "seed")}
    ours, our_quant = build(BenchSpec(**keys, device="cpu"), torch.device("cpu"))
    model, vae = build_authors(spec, ours, our_quant)
    del our_quant
    gc.collect()
    device = torch.device("cpu")
    model.eval()
    with torch.no_grad():
        latency, infer_peak = timed(authors_infer_fn(model, vae, spec), spec["repeats"], device)
    out = {"impl": "authors", "variant": spec["variant"], "resolution": spec["resolution"],
           "batch": spec["batch"], "infer_latency_s": latency, "infer_peak_mb": infer_peak}
    if spec["train"]:
        model.train()
        spec["_opt"] = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
        kinds = {}
        for name, (scales, count) in train_kinds(ours).items():
            if name == "packed":
                continue  # the authors' MVAR trains the cycle only
            s, peak = timed(authors_train_fn(model, ours, spec, scales), spec["repeats"], device)
            kinds[name] = {"scales": list(scales), "per_cycle": count, "step_s": s, "peak_mb": peak}
        out["train_steps"] = kinds
        out["train_step_s"], out["train_peak_mb"] = summarize_training(kinds)
        out["train_pyramid_s"], out["train_tokens_per_s"] = pyramid_cost(kinds, spec["batch"], ours.patch_nums)
    return out


def forget_authors() -> None:
    """Drop the last checkout's modules (both repositories name theirs `models`, `dist`, `utils`):
    models already built keep working, a second checkout can then be imported."""
    for name in list(sys.modules):
        if name.split(".")[0] in ("models", "dist", "utils"):
            del sys.modules[name]
    sys.path[:] = [p for p in sys.path if p not in _AUTHORS_DIRS]


_AUTHORS_DIRS: list[str] = []


def build_ours(variant: str, spec: dict):
    """(our model, our quantizer) of ``variant`` with the seed's weights, on the CPU."""
    import torch

    from mvar.bench import BenchSpec, build

    torch.manual_seed(spec["seed"])
    keys = {k: spec[k] for k in ("size", "batch", "resolution", "seed")}
    return build(BenchSpec(variant=variant, **keys, device="cpu"), torch.device("cpu"))


def authors_model(variant: str, spec: dict, ours, quant):
    """(the authors' model, their VAE) of ``variant`` from its checkout, holding our weights (the last
    checkout's modules forgotten first: both repositories name theirs alike)."""
    forget_authors()
    directory = spec["var_dir"] if variant == "var" else spec["mvar_dir"]
    _AUTHORS_DIRS.append(directory)
    import_authors(directory, variant)
    return build_authors({**spec, "variant": variant}, ours, quant)


def contender(impl: str, variant: str, spec: dict):
    """A no-argument generate call of one implementation and variant, built with the seed's weights."""
    import torch

    from mvar.sampling import generate, make_generator

    ours, quant = build_ours(variant, spec)
    ours.eval()
    if impl == "ours":
        labels = torch.arange(spec["batch"]) % ours.num_classes
        return lambda: generate(ours, quant, labels, cfg=spec["cfg"], top_k=spec["top_k"], top_p=spec["top_p"],
                                generator=make_generator(spec["seed"], torch.device("cpu")))
    model, vae = authors_model(variant, spec, ours, quant)
    model.eval()
    return authors_infer_fn(model, vae, {**spec, "variant": variant})


def ab_worker(spec: dict) -> dict:
    """Generate times of several implementations in ONE process, call by call in turn: robust to load
    that changes over minutes (peaks are not measured here: they need a process each). Also the
    process's CPU seconds per call: at one thread (--threads 1) they count the work done, not the
    time other processes held the cores, so they compare implementations on a shared machine."""
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    fns = {f"{impl} {variant}": contender(impl, variant, spec) for impl, variant in spec["contenders"]}
    times: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(spec["ab_rounds"]):
            for name, fn in fns.items():
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                times[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    return {"times": times, "cpu_times": cpu, "load": os.getloadavg()}


def train_contender(impl: str, variant: str, spec: dict) -> tuple[dict, list[int]]:
    """({kind: (one training step of that kind, its scales, steps of it per cycle)}, patch sides) of one
    implementation and variant, built with the seed's weights: the kinds of a full pyramid (VAR: the full
    step; the cycle: its small-scale step and each windowed scale's; the packed schedule, which the authors
    lack, left out)."""
    import torch

    from mvar.bench import train_kinds, training_step

    ours, quant = build_ours(variant, spec)
    kinds = {k: v for k, v in train_kinds(ours).items() if v[1] > 0}
    if impl == "ours":
        step = training_step(ours, spec["batch"], spec["seed"], torch.device("cpu"))
        return ({k: (lambda s=scales: step(s), scales, n) for k, (scales, n) in kinds.items()},
                list(ours.patch_nums))
    model, _ = authors_model(variant, spec, ours, quant)
    model.train()
    own = {**spec, "variant": variant,
           "_opt": torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)}
    return ({k: (authors_train_fn(model, ours, own, scales), scales, n) for k, (scales, n) in kinds.items()},
            list(ours.patch_nums))


def train_ab_worker(spec: dict) -> dict:
    """Training per full pyramid of several implementations in ONE process, in turn: each round, each
    implementation trains every kind of step of its pyramid once (VAR: one full step; the cycle: one
    of each kind), one implementation after the other, so slow drifts of the machine hit them alike.
    Per implementation and round: the pyramid's wall seconds (the sum of its kinds' steps), its CPU
    seconds, and each kind's seconds; tokens per second over the cycle from the kinds' medians."""
    import torch

    from mvar.bench import pyramid_cost

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    contenders = {f"{impl} {variant}": train_contender(impl, variant, spec)
                  for impl, variant in spec["train_contenders"]}
    for kinds, _ in contenders.values():
        for fn, _, _ in kinds.values():
            fn()  # warm-up; the first step also allocates the optimizer state
    pyramid = {name: [] for name in contenders}
    cpu = {name: [] for name in contenders}
    kind_s = {name: {k: [] for k in kinds} for name, (kinds, _) in contenders.items()}
    for _ in range(spec["train_rounds"]):
        for name, (kinds, _) in contenders.items():
            c0, wall = time.process_time(), 0.0
            for kind, (fn, _, _) in kinds.items():
                t0 = time.perf_counter()
                fn()
                kind_s[name][kind].append(time.perf_counter() - t0)
                wall += kind_s[name][kind][-1]
            pyramid[name].append(wall)
            cpu[name].append(time.process_time() - c0)
    tokens = {}
    for name, (kinds, patch_nums) in contenders.items():
        summary = {k: {"scales": list(scales), "per_cycle": n, "step_s": statistics.median(kind_s[name][k])}
                   for k, (_, scales, n) in kinds.items()}
        tokens[name] = pyramid_cost(summary, spec["batch"], patch_nums)[1]
    return {"pyramid_s": pyramid, "pyramid_cpu_s": cpu, "kind_s": kind_s, "tokens_per_s": tokens,
            "load": os.getloadavg()}


# -- the driver ---------------------------------------------------------------------------------------

COLUMNS = [("authors", "var"), ("ours", "var"), ("ours", "scale_markov"), ("authors", "mvar"), ("ours", "mvar")]
TRAIN_IN_TURN_ROWS = [("training, s per full pyramid (in turn, one process: median)", "pyramid_s", "{:.2f}"),
                      ("training, CPU s per full pyramid (in turn: median)", "pyramid_cpu_s", "{:.2f}"),
                      ("training tokens/s (in turn: over the cycle, from each step kind's median)", "tokens_per_s",
                       "{:.0f}")]
OWN_PROCESS_TWINS = ("infer_latency_s", "train_pyramid_s", "train_tokens_per_s")  # rows an in-turn row repeats
ROWS = [("generate a batch, s", "infer_latency_s", "{:.2f}"),
        ("inference peak above baseline, MB", "infer_peak_mb", "{:.0f}"),
        ("training, s per full pyramid (every scale once; MVAR: one step of each kind)", "train_pyramid_s", "{:.2f}"),
        ("training tokens/s (over the cycle)", "train_tokens_per_s", "{:.0f}"),
        ("training step, s (raw; MVAR: 8:1:1 cycle mean)", "train_step_s", "{:.2f}"),
        ("training peak above baseline, MB", "train_peak_mb", "{:.0f}")]


def tokenizer_keys(size: str, resolution: int) -> dict:
    from mvar.bench import BenchSpec, tokenizer_config

    tok = tokenizer_config(BenchSpec(size=size, resolution=resolution))
    return {"ch": tok.ch, "share_quant_resi": tok.share_quant_resi}


def measure(impl: str, variant: str, args, resolution: int, batch: int) -> dict:
    from mvar.bench import BenchSpec, run_variant
    from mvar.measure import MALLOC_ENV

    common = dict(variant=variant, size=args.size, batch=batch, resolution=resolution, cfg=args.cfg,
                  top_k=args.top_k, top_p=args.top_p,
                  repeats=args.repeats, train=not args.no_train, threads=args.threads, seed=0)
    if impl == "ours":
        return run_variant(asdict(BenchSpec(**common, device="cpu", backend=args.backend)))
    spec = {**common, "dir": args.var_dir if variant == "var" else args.mvar_dir,
            "tokenizer": tokenizer_keys(args.size, resolution)}
    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tools.compare_authors", "--worker", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the authors' {variant} at {resolution} px failed:\n{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def in_turn_worker(spec: dict, what: str) -> dict:
    """Run ``spec`` in a measuring process of this tool (ab_worker or train_ab_worker); its JSON answer."""
    from mvar.measure import MALLOC_ENV

    env = {**os.environ, **MALLOC_ENV, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "tools.compare_authors", "--worker", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the in-turn {what} failed:\n{proc.stderr.strip()[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _in_turn_spec(args, resolution: int, batch: int) -> dict:
    return {"size": args.size, "batch": batch, "resolution": resolution, "cfg": args.cfg, "top_k": args.top_k,
            "top_p": args.top_p, "seed": 0, "threads": args.threads, "var_dir": args.var_dir,
            "mvar_dir": args.mvar_dir, "tokenizer": tokenizer_keys(args.size, resolution)}


def _by_column(named: dict) -> dict:
    return {tuple(name.split(" ", 1)): v for name, v in named.items()}


def measure_in_turn(wanted: list[tuple[str, str]], args, resolution: int, batch: int) -> tuple[dict, dict]:
    """Generate times of every column from one process, the implementations taking turns call by call:
    (wall seconds, CPU seconds), each {(impl, variant): [per call]}."""
    spec = {**_in_turn_spec(args, resolution, batch), "contenders": wanted, "ab_rounds": args.ab_rounds}
    out = in_turn_worker(spec, f"timing at {resolution} px")
    return _by_column(out["times"]), _by_column(out["cpu_times"])


def measure_train_in_turn(wanted: list[tuple[str, str]], args, resolution: int, batch: int) -> dict:
    """Training per full pyramid of every column from one process, in turn pyramid by pyramid:
    {"pyramid_s", "pyramid_cpu_s": {(impl, variant): [per round]}, "kind_s": {(impl, variant): {kind: [...]}},
    "tokens_per_s": {(impl, variant): float}}."""
    spec = {**_in_turn_spec(args, resolution, batch), "train_contenders": wanted, "train_rounds": args.train_rounds}
    out = in_turn_worker(spec, f"training at {resolution} px")
    return {key: _by_column(out[key]) for key in ("pyramid_s", "pyramid_cpu_s", "kind_s", "tokens_per_s")}


def cell(results: list[dict], key: str, fmt: str) -> str:
    values = [r[key] for r in results if r.get(key) is not None]
    return ", ".join(fmt.format(v) for v in values) if values else "-"


def markdown_table(resolution: int, batch: int, measured: dict, in_turn: dict | None = None,
                   in_turn_cpu: dict | None = None, train_in_turn: dict | None = None) -> str:
    cols = [c for c in COLUMNS if measured.get(c) or (in_turn and c in in_turn)
            or (train_in_turn and c in train_in_turn["pyramid_s"])]
    head = [f"{resolution} px, batch {batch}"] + [f"{impl} {'MVAR' if v == 'mvar' else v.replace('var', 'VAR')}"
                                                  for impl, v in cols]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    if in_turn:
        lines.append("| " + " | ".join(["generate a batch, s (in turn, one process: median)"]
                                       + [f"{statistics.median(in_turn[c]):.2f}" if c in in_turn else "-"
                                          for c in cols]) + " |")
    if in_turn_cpu:
        lines.append("| " + " | ".join(["generate a batch, CPU s (in turn: median)"]
                                       + [f"{statistics.median(in_turn_cpu[c]):.2f}" if c in in_turn_cpu else "-"
                                          for c in cols]) + " |")
    if train_in_turn:
        for label, key, fmt in TRAIN_IN_TURN_ROWS:
            values = {c: (v if isinstance(v, float) else statistics.median(v)) for c, v in train_in_turn[key].items()}
            lines.append("| " + " | ".join([label] + [fmt.format(values[c]) if c in values else "-" for c in cols])
                         + " |")
    for label, key, fmt in ROWS:
        label = label + " (own process)" if key in OWN_PROCESS_TWINS else label
        lines.append("| " + " | ".join([label] + [cell(measured[c], key, fmt) for c in cols]) + " |")
    return "\n".join(lines)


def median_of(measured: dict, col: tuple[str, str], key: str) -> float | None:
    values = [r[key] for r in measured.get(col, []) if r.get(key) is not None]
    return statistics.median(values) if values else None


def ratios(resolution: int, measured: dict, in_turn: dict | None = None, in_turn_cpu: dict | None = None,
           train_in_turn: dict | None = None) -> list[str]:
    """The issue's targets, as measured: ours against the authors', and MVAR against our VAR. Generate
    times come from the in-turn run when there is one (load that changes over minutes cancels out);
    the same ratios in CPU seconds follow when they were measured."""
    def m(impl, v, key):
        if key == "infer_latency_s" and in_turn and (impl, v) in in_turn:
            return statistics.median(in_turn[(impl, v)])
        return median_of(measured, (impl, v), key)
    out = []
    for v in ("var", "mvar"):
        a, o = m("authors", v, "infer_latency_s"), m("ours", v, "infer_latency_s")
        if a and o:
            out.append(f"{v}: ours / authors generate time = {o / a:.3f} (target <= 1)")
    var = {k: m("ours", "var", k) for _, k, _ in ROWS}
    for v in ("scale_markov", "mvar"):
        for _, key, _ in ROWS:
            x = m("ours", v, key)
            if x is not None and var.get(key):
                out.append(f"ours {v} / ours var {key} = {x / var[key]:.3f}")
    sm, mv = m("ours", "scale_markov", "infer_latency_s"), m("ours", "mvar", "infer_latency_s")
    if sm and mv:
        out.append(f"ours mvar / ours scale_markov generate time = {mv / sm:.3f}")
    if in_turn_cpu:
        cpu = {c: statistics.median(v) for c, v in in_turn_cpu.items()}
        for v in ("var", "mvar"):
            if ("authors", v) in cpu and ("ours", v) in cpu:
                out.append(f"{v}: ours / authors generate CPU s = {cpu[('ours', v)] / cpu[('authors', v)]:.3f} "
                           "(target <= 1)")
        for v in ("scale_markov", "mvar"):
            if ("ours", v) in cpu and ("ours", "var") in cpu:
                out.append(f"ours {v} / ours var generate CPU s = {cpu[('ours', v)] / cpu[('ours', 'var')]:.3f}")
        if ("ours", "mvar") in cpu and ("ours", "scale_markov") in cpu:
            out.append(f"ours mvar / ours scale_markov generate CPU s = "
                       f"{cpu[('ours', 'mvar')] / cpu[('ours', 'scale_markov')]:.3f}")
    if train_in_turn:
        pyr = {c: statistics.median(v) for c, v in train_in_turn["pyramid_s"].items()}
        for v in ("var", "mvar"):
            if ("authors", v) in pyr and ("ours", v) in pyr:
                out.append(f"{v}: ours / authors training s per full pyramid (in turn) = "
                           f"{pyr[('ours', v)] / pyr[('authors', v)]:.3f}")
        for v in ("scale_markov", "mvar"):
            if ("ours", v) in pyr and ("ours", "var") in pyr:
                out.append(f"ours {v} / ours var training s per full pyramid (in turn) = "
                           f"{pyr[('ours', v)] / pyr[('ours', 'var')]:.3f}")
    return [f"{resolution} px: {line}" for line in out]


def bench_table(results: list[dict]) -> str:
    from mvar.bench import table

    return table(results) if results else "(not measured)"


def run(args) -> int:
    resolutions = benchmarks.int_list("--resolution", args.resolution)
    for d, flag in ((args.var_dir, "--var-dir"), (args.mvar_dir, "--mvar-dir")):
        if d and not (Path(d) / "models").is_dir():
            raise UserError(f"{flag} {d}: no models/ package there (a checkout of the authors' repository?)")
    wanted = [c for c in COLUMNS if c[0] == "ours" or (args.var_dir if c[1] == "var" else args.mvar_dir)]
    report = {"args": benchmarks.report_args(args), "load_before": os.getloadavg(), "tables": {}}
    for resolution in resolutions:
        batch = args.batch or DEFAULT_BATCH.get(resolution, 2)
        measured = {c: [] for c in wanted}
        for _ in range(0 if args.in_turn_only else args.rounds):
            for impl, variant in wanted:
                print(f"measuring {impl} {variant} at {resolution} px ...", file=sys.stderr, flush=True)
                measured[(impl, variant)].append(measure(impl, variant, args, resolution, batch))
        in_turn = in_turn_cpu = None
        if args.ab_rounds > 0:
            print(f"timing all in turn at {resolution} px ...", file=sys.stderr, flush=True)
            in_turn, in_turn_cpu = measure_in_turn(wanted, args, resolution, batch)
        train_in_turn = None
        if args.train_rounds > 0 and not args.no_train:
            print(f"training all in turn at {resolution} px ...", file=sys.stderr, flush=True)
            train_in_turn = measure_train_in_turn(wanted, args, resolution, batch)
        table = markdown_table(resolution, batch, measured, in_turn, in_turn_cpu, train_in_turn)
        lines = ratios(resolution, measured, in_turn, in_turn_cpu, train_in_turn)
        ours = bench_table([runs[0] for (impl, _), runs in measured.items() if impl == "ours" and runs])
        print(table + "\n\n" + "\n".join(lines) + "\n\nours, as `mvar bench` prints it (first round):\n" + ours
              + "\n", flush=True)
        report["tables"][str(resolution)] = {"markdown": table, "ratios": lines, "batch": batch, "ours": ours,
                                             "in_turn_s": {f"{i} {v}": t for (i, v), t in (in_turn or {}).items()},
                                             "in_turn_cpu_s": {f"{i} {v}": t for (i, v), t in
                                                               (in_turn_cpu or {}).items()},
                                             "train_in_turn": {key: {f"{i} {v}": t for (i, v), t in d.items()}
                                                               for key, d in (train_in_turn or {}).items()},
                                             "results": {f"{i} {v}": r for (i, v), r in measured.items()}}
    report["load_after"] = os.getloadavg()
    if args.plot and not args.in_turn_only:  # ours, every resolution: how each variant's cost grows with the work
        from mvar.bench import plot_scaling

        ours = [r for t in report["tables"].values() for name, runs in t["results"].items()
                if name.startswith("ours") for r in runs[:1]]
        plot_scaling(ours, args.plot)
    print(f"load average before {report['load_before']}, after {report['load_after']}; size {args.size}, "
          f"cfg {args.cfg}, top-k {args.top_k}, top-p {args.top_p}, float32, CPU")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def configure(p) -> None:
    benchmarks.compare_authors(p)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # a measuring process of this tool
    p.set_defaults(func=run_or_work)


def run_or_work(args) -> int:
    if args.worker:
        spec = json.loads(args.worker)
        worker = (ab_worker if "contenders" in spec else train_ab_worker if "train_contenders" in spec
                  else authors_worker)
        print(json.dumps(worker(spec)))
        return 0
    return run(args)


def main(argv: list[str] | None = None) -> int:
    return run_cli(standalone("python -m tools.compare_authors", benchmarks.COMPARE_AUTHORS, configure), argv,
                   name="tools.compare_authors")


if __name__ == "__main__":
    sys.exit(main())
