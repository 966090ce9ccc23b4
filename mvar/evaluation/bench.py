"""Sampling throughput (images/s) of each attention variant: what an evaluation's sampling costs.

    mvar eval bench --variants var,mvar --size tiny --batch 16 --num-images 64 --device cpu

Random weights (speed does not depend on them); class-balanced labels, CFG, top-k / top-p as in
an evaluation. After one warm-up batch each, the variants take turns
generating and decoding batches until each made ``num_images`` images; images/s is the batch
size over the median batch time (generation + decoding), generate s/batch the token generation
alone (what `mvar bench` and the paper's timing report).
"""
from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch

from mvar.models.config import named_model, tokenizer_for
from mvar.models.transformer import NextScaleTransformer
from mvar.sampling import generate, make_generator
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig


@dataclass
class ThroughputResult:
    variant: str
    size: str
    resolution: int
    device: str
    batch: int
    num_images: int
    cfg: float
    images_per_s: float          # batch / (median generate + median decode)
    generate_s_per_batch: float  # median over batches
    decode_s_per_batch: float    # median over batches
    threads: int
    load_avg: float = 0.0        # 1-minute load average at the end: other processes share the cores
    torch: str = torch.__version__


def build(variant: str, size: str, device: torch.device) -> tuple[NextScaleTransformer, MultiScaleVQVAE]:
    name = f"{variant}-{size}"
    tok_cfg = TokenizerConfig.named(tokenizer_for(name))
    model = NextScaleTransformer(named_model(name, cond_drop_rate=0.0), tok_cfg.vocab_size, tok_cfg.z_channels,
                                 tuple(tok_cfg.patch_nums))
    return model.to(device).eval(), MultiScaleVQVAE(tok_cfg).to(device).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _one_batch(model, tokenizer, labels_B, cfg: float, seed: int, device: torch.device) -> tuple[float, float]:
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    t0 = time.perf_counter()
    with amp:
        gen = generate(model, tokenizer.quantize, labels_B, cfg=cfg, top_k=900, top_p=0.96,
                       generator=make_generator(seed, device))
    _sync(device)
    t1 = time.perf_counter()
    images = tokenizer.fhat_to_img(gen.f_hat.float()).add(1).mul(127.5).clamp(0, 255).to(torch.uint8).cpu()
    _sync(device)
    del images
    return t1 - t0, time.perf_counter() - t1


def measure(variants: list[str], size: str = "tiny", batch: int = 16, num_images: int = 64, device: str = "cpu",
            cfg: float = 1.5, seed: int = 0) -> list[ThroughputResult]:
    """Variants take turns batch by batch, so a busy machine slows them alike; medians per batch."""
    dev = torch.device(device)
    torch.manual_seed(seed)
    built = {v: build(v, size, dev) for v in variants}
    num_batches = -(-num_images // batch)
    num_classes = next(iter(built.values()))[0].num_classes
    labels = [torch.arange(b * batch, (b + 1) * batch, device=dev) % num_classes for b in range(num_batches)]
    times: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for v, (model, tokenizer) in built.items():
        _one_batch(model, tokenizer, labels[0], cfg, seed, dev)  # warm-up: kernels, masks, allocator
    for b, labels_B in enumerate(labels):
        for v, (model, tokenizer) in built.items():
            times[v].append(_one_batch(model, tokenizer, labels_B, cfg, seed + b, dev))
    out = []
    for v, (_, tokenizer) in built.items():
        gen_s = statistics.median(t[0] for t in times[v])
        dec_s = statistics.median(t[1] for t in times[v])
        out.append(ThroughputResult(v, size, tokenizer.cfg.image_size, str(dev), batch, num_batches * batch, cfg,
                                    batch / (gen_s + dec_s), gen_s, dec_s, torch.get_num_threads(),
                                    os.getloadavg()[0]))
    return out


def markdown(results: list[ThroughputResult]) -> str:
    lines = ["| variant | size | px | device | batch | images | images/s | generate s/batch | decode s/batch | load |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.variant} | {r.size} | {r.resolution} | {r.device} | {r.batch} | {r.num_images} | "
                     f"{r.images_per_s:.2f} | {r.generate_s_per_batch:.3f} | {r.decode_s_per_batch:.3f} | "
                     f"{r.load_avg:.1f} |")
    return "\n".join(lines)
