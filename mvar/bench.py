"""Memory and speed of VAR, scale-Markov and MVAR: one variant per process.

Run one variant:  python -m mvar.bench '{"variant": "mvar", "size": "d8", ...}'  (prints one JSON line)
Run a comparison: mvar bench --variants var,scale_markov,mvar --size d8 ...  (spawns the above)

Peak memory, stated in every result, by the probes of `mvar.measure` (VmHWM
above the phase's start on CPU, max_memory_allocated on CUDA).
Inference is the token generation of all scales with CFG (decoding to pixels
excluded: it is the same for every variant). Training is forward, backward and
an AdamW step; weights and optimizer state are resident before the phase.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

from mvar.errors import UserError
from mvar.measure import MALLOC_ENV, MB, PeakMemory, attention_gflops, status_mb  # noqa: F401 (re-exported)
from mvar.measure import sync as _sync
from mvar.models.attention import resolve_backend
from mvar.models.config import named_model, tokenizer_for
from mvar.models.schedule import markov_cycle, next_scale_loss
from mvar.models.transformer import NextScaleTransformer
from mvar.sampling import generate, make_generator
from mvar.tokenizer import TokenizerConfig
from mvar.tokenizer.quantizer import MultiScaleQuantizer


@dataclass
class BenchSpec:
    variant: str = "mvar"
    size: str = "d8"
    batch: int = 8
    resolution: int = 256
    device: str = "cpu"
    cfg: float = 1.5
    top_k: int = 900
    top_p: float = 0.96
    repeats: int = 3
    window_size: int | None = None
    backend: str = "auto"
    train: bool = True
    threads: int | None = None
    seed: int = 0


@dataclass
class BenchResult:
    variant: str
    size: str
    batch: int
    resolution: int
    device: str
    params_m: float
    attn_gflops: float            # attention-core FLOPs of one image's sequence (QK^T and PV, counted pairs)
    infer_latency_s: float
    infer_peak_mb: float
    kv_cache_mb: float
    train_step_s: float | None = None
    train_peak_mb: float | None = None
    train_steps: dict = field(default_factory=dict)  # per kind of step: seconds and peak MB
    train_pyramid_s: float | None = None   # every scale trained once (VAR: a step; cycle: small + each windowed)
    train_tokens_per_s: float | None = None  # tokens trained per second over the training's own cycle
    memory_method: str = ""
    backend: str = ""
    infer_first_s: float | None = None   # the first generate call: kernels, masks and compiles (flex) included
    torch: str = torch.__version__


# -- one variant -----------------------------------------------------------------

def tokenizer_config(spec: BenchSpec) -> TokenizerConfig:
    """The tokenizer of the spec's size at its resolution (the 256 px tokenizers also come at 512 px)."""
    tok = TokenizerConfig.named(tokenizer_for(f"{spec.variant}-{spec.size}"))
    if spec.resolution != tok.image_size:
        if tok.image_size == 256 and spec.resolution == 512:
            return TokenizerConfig.named("vae-ch160-512")
        raise ValueError(f"size {spec.size} goes with {tok.image_size} px images, not {spec.resolution}")
    return tok


def build(spec: BenchSpec, device: torch.device) -> tuple[NextScaleTransformer, MultiScaleQuantizer]:
    name = f"{spec.variant}-{spec.size}"
    tok = tokenizer_config(spec)
    overrides = {"attention_backend": spec.backend, "cond_drop_rate": 0.0}
    if spec.window_size is not None:
        overrides["window_size"] = spec.window_size
    cfg = named_model(name, **overrides)
    model = NextScaleTransformer(cfg, tok.vocab_size, tok.z_channels, tuple(tok.patch_nums)).to(device)
    quant = MultiScaleQuantizer(tok.vocab_size, tok.z_channels, tuple(tok.patch_nums), tok.share_quant_resi).to(device)
    return model, quant


def measure_inference(model, quant, spec: BenchSpec, device: torch.device) -> tuple[float, float, float, float]:
    """(median latency s, peak MiB, KV cache MiB, first call s) of generating a batch with CFG."""
    model.eval()
    labels = torch.arange(spec.batch, device=device) % model.num_classes
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    run = lambda: generate(model, quant, labels, cfg=spec.cfg, top_k=spec.top_k, top_p=spec.top_p,
                           generator=make_generator(spec.seed, device))
    with amp:
        t0 = time.perf_counter()
        gen = run()  # warm-up: kernels, caches, masks, compiles
        _sync(device)
        first = time.perf_counter() - t0
        times, peaks = [], []
        for _ in range(spec.repeats):
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                gen = run()
                _sync(device)
                times.append(time.perf_counter() - t0)
            peaks.append(mem.peak)
            del gen
    return statistics.median(times), max(peaks), _kv_mb(model, quant, labels, spec, device), first


def _kv_mb(model, quant, labels, spec, device) -> float:
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
        return generate(model, quant, labels, cfg=spec.cfg, top_k=spec.top_k, top_p=spec.top_p).kv_cache_bytes / MB


def train_kinds(model: NextScaleTransformer) -> dict[str, tuple[tuple[int, ...], int]]:
    """Kinds of training step and how many of each make one cycle: {name: (scales, count)}."""
    K = len(model.patch_nums)
    if "cycle" not in model.spec.info.schedules:
        return {"full": (tuple(range(K)), 1)}
    cycle = markov_cycle(K, model.cfg.markov_from_scale)  # the training's own cycle (8:1:1 at 256 px)
    kinds = {"cycle_small": (cycle[0], cycle.count(cycle[0]))}
    for scales in cycle[cycle.count(cycle[0]):]:
        kinds[f"cycle_s{scales[0]}"] = (scales, 1)
    return {**kinds, "packed": (tuple(range(K)), 0)}


def training_step(model, batch: int, seed: int, device: torch.device):
    """``step(scales)``: one training step of ``model`` on ``scales`` as training takes it (the loss, backward,
    clipping, AdamW), on a fixed random batch of ``batch`` images drawn from ``seed``."""
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05)
    L = model.L
    gen = torch.Generator(device="cpu").manual_seed(seed)
    teacher = torch.randn(batch, L - model.first_l, model.Cvae, generator=gen).to(device)
    idx = torch.randint(model.V, (batch, L), generator=gen).to(device)
    labels = torch.randint(model.num_classes, (batch,), generator=gen).to(device)

    def step(scales):
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = next_scale_loss(model, labels, idx, teacher, scales).loss  # the loss training uses
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure_training(model, spec: BenchSpec, device: torch.device) -> dict[str, dict]:
    step = training_step(model, spec.batch, spec.seed, device)
    out = {}
    for name, (scales, count) in train_kinds(model).items():
        step(scales)  # warm-up; the first one also allocates the optimizer state
        times, peaks = [], []
        for _ in range(spec.repeats):
            with PeakMemory(device) as mem:
                t0 = time.perf_counter()
                step(scales)
                _sync(device)
                times.append(time.perf_counter() - t0)
            peaks.append(mem.peak)
        out[name] = {"scales": list(scales), "per_cycle": count, "step_s": statistics.median(times),
                     "peak_mb": max(peaks)}
    return out


def summarize_training(kinds: dict[str, dict]) -> tuple[float, float]:
    """(step seconds averaged over the cycle, peak MiB over its steps); VAR: its one kind of step."""
    in_cycle = {k: v for k, v in kinds.items() if v["per_cycle"] > 0}
    n = sum(v["per_cycle"] for v in in_cycle.values())
    step_s = sum(v["step_s"] * v["per_cycle"] for v in in_cycle.values()) / n
    return step_s, max(v["peak_mb"] for v in in_cycle.values())


def pyramid_cost(kinds: dict[str, dict], batch: int, patch_nums) -> tuple[float, float]:
    """(seconds to train every scale once, tokens per second over the cycle) of ``measure_training``'s kinds:
    VAR's full step; in the cycle one step on the small scales plus one on each windowed scale, the
    like-for-like figure beside VAR's (the per-step mean flatters the cycle: most of its steps are small)."""
    in_cycle = {k: v for k, v in kinds.items() if v["per_cycle"] > 0}
    pyramid = sum(v["step_s"] for v in in_cycle.values())
    tokens = sum(v["per_cycle"] * batch * sum(patch_nums[s] ** 2 for s in v["scales"]) for v in in_cycle.values())
    return pyramid, tokens / sum(v["per_cycle"] * v["step_s"] for v in in_cycle.values())


def run_one(spec: BenchSpec) -> BenchResult:
    device = torch.device(spec.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # what is left in float32 under bf16 autocast
    if spec.threads:
        torch.set_num_threads(spec.threads)
    torch.manual_seed(spec.seed)
    model, quant = build(spec, device)
    latency, infer_peak, kv_mb, first = measure_inference(model, quant, spec, device)
    result = BenchResult(variant=spec.variant, size=spec.size, batch=spec.batch, resolution=spec.resolution,
                         device=str(device), params_m=model.num_params() / 1e6, attn_gflops=attention_gflops(model),
                         infer_latency_s=latency, infer_peak_mb=infer_peak, kv_cache_mb=kv_mb,
                         memory_method=PeakMemory(device).method, infer_first_s=first,
                         backend=resolve_backend(spec.backend, device))
    if spec.train:
        result.train_steps = measure_training(model, spec, device)
        result.train_step_s, result.train_peak_mb = summarize_training(result.train_steps)
        result.train_pyramid_s, result.train_tokens_per_s = pyramid_cost(result.train_steps, spec.batch,
                                                                         model.patch_nums)
    return result


# -------------------------------------------------------------------------- the comparison (mvar bench)

TABLE_COLUMNS = [  # (header, key, format) of the printed comparison
    ("variant", "variant", "{}"),
    ("px", "resolution", "{}"),
    ("batch", "batch", "{}"),
    ("infer s/batch", "infer_latency_s", "{:.3f}"),
    ("infer first s", "infer_first_s", "{:.3f}"),
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


def run_variant(spec: dict) -> dict:
    """One variant measured in a process of its own (`python -m mvar.bench SPEC`): its result."""
    env = {**os.environ, **MALLOC_ENV}
    proc = subprocess.run([sys.executable, "-m", "mvar.bench", json.dumps(spec)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise UserError(f"benchmark of variant '{spec['variant']}' failed:\n{proc.stderr.strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    """The results as a Markdown table (TABLE_COLUMNS)."""
    rows = []
    for r in results:
        packed = r.get("train_steps", {}).get("packed", {})
        r = {**r, "packed_s": packed.get("step_s"), "packed_mb": packed.get("peak_mb")}
        rows.append([fmt.format(r[key]) if r.get(key) is not None else "-" for _, key, fmt in TABLE_COLUMNS])
    headers = [h for h, _, _ in TABLE_COLUMNS]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in rows])


def tokens_per_batch(result: dict) -> int:
    tok = tokenizer_config(BenchSpec(variant=result["variant"], size=result["size"], resolution=result["resolution"]))
    return result["batch"] * sum(p * p for p in tok.patch_nums)


def plot_scaling(results: list[dict], path: str) -> None:
    """Four panels (inference time, inference peak, training per full pyramid, training peak) against tokens per
    batch. Training is per full pyramid (every scale once), not per step: the cycle's mean step flatters it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("infer_latency_s", "generate a batch, s"), ("infer_peak_mb", "inference peak above baseline, MB"),
              ("train_pyramid_s", "training, s per full pyramid"), ("train_peak_mb", "training peak, MB")]
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


def main(argv: list[str]) -> int:
    spec = BenchSpec(**json.loads(argv[0]))
    print(json.dumps(asdict(run_one(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
