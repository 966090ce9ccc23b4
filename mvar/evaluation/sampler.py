"""One worker's part of an evaluation: load the checkpoint, make its shards, report timings.

Runs as a Ray task or in the driver's process (eval.num_workers=0); either way it gets a plain
dict (``SampleJob``) and returns one. Each shard is written under a temporary name, its record
(count, sha256, timings) is saved in ``OUT/.mvar-data/``, then it is renamed into place: a
visible shard is always complete and has its record, the layout `ShardSetWriter` resumes from.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from mvar.data.imaging import encode
from mvar.data.tario import ShardWriter, shard_name
from mvar.data.writer import STATE_DIR
from mvar.evaluation.plan import SamplePlan
from mvar.sampling import SamplingConfig, generate, make_generator

MB = 1024 * 1024


@dataclass
class SampleJob:
    checkpoint: str
    overrides: dict
    out: str                     # the shard directory of this setting
    shards: list[int]
    plan: dict                   # asdict(SamplePlan)
    sampling: dict               # asdict(SamplingConfig)
    device: str = "cpu"
    threads: int = 1
    amp: bool = True
    progress: str = ""           # "" none, "tqdm" in this process, "ray" in a Ray task (the driver draws it)


@dataclass
class ShardStats:
    latency_s: list[float] = field(default_factory=list)   # token generation, per batch
    decode_s: list[float] = field(default_factory=list)    # tokenizer decoding + PNG encoding, per batch
    peak_mem_mb: float = 0.0                               # generation, above the batch's start
    kv_cache_mb: float = 0.0
    device: str = ""


def record_path(out: str, shard: int) -> str:
    return os.path.join(out, STATE_DIR, shard_name(shard) + ".json")


def _write_json_atomic(path: str, data: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def to_uint8(img_B3HW: torch.Tensor) -> np.ndarray:
    """Decoder output in [-1, 1] -> uint8 (B, H, W, 3), rounded as torchvision's save_image does."""
    x = img_B3HW.float().add(1).mul(127.5).add_(0.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def _generate_batch(model, tokenizer, labels_B, s: SamplingConfig, seed: int, device, amp: bool, stats: ShardStats):
    from mvar.measure import PeakMemory
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")
    with PeakMemory(device) as mem, autocast:
        t0 = time.perf_counter()
        gen = generate(model, tokenizer.quantize, labels_B, cfg=s.cfg, top_k=s.top_k, top_p=s.top_p,
                       generator=make_generator(seed, device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        stats.latency_s.append(time.perf_counter() - t0)
    stats.peak_mem_mb = max(stats.peak_mem_mb, mem.peak)
    stats.kv_cache_mb = max(stats.kv_cache_mb, gen.kv_cache_bytes / MB)
    return gen


@torch.no_grad()
def write_shard(model, tokenizer, plan: SamplePlan, shard: int, s: SamplingConfig, out: str,
                device: torch.device, amp: bool) -> ShardStats:
    stats = ShardStats(device=str(device))
    writer = ShardWriter(out, shard_name(shard))
    try:
        for batch, lo, hi in plan.batches(shard):
            labels_B = torch.tensor([plan.label(i) for i in range(lo, hi)], device=device)
            gen = _generate_batch(model, tokenizer, labels_B, s, plan.batch_seed(batch), device, amp, stats)
            t0 = time.perf_counter()
            images = to_uint8(tokenizer.fhat_to_img(gen.f_hat.float()))
            for offset, image in enumerate(images):
                label = plan.label(lo + offset)
                writer.add(f"{lo + offset:08d}", {"png": encode(image, "png"), "cls": str(label).encode()})
            stats.decode_s.append(time.perf_counter() - t0)
        info = writer.finish()
    except BaseException:
        writer.abort()
        raise
    _write_json_atomic(record_path(out, shard), {"shard": info.__dict__, "stats": asdict(stats)})
    writer.publish()
    return stats


@torch.no_grad()
def warm_up(model, tokenizer, plan: SamplePlan, shard: int, s: SamplingConfig, device: torch.device, amp: bool) -> None:
    """Generate the shard's first batch once, untimed and discarded, so that first-call costs of the process
    (kernel selection, thread pools, allocator growth) are charged to neither ``infer/peak_mem_mb`` nor
    ``infer/latency_s``: without it, whichever model a fresh Ray worker samples first reads tens of MB more.
    Each batch draws from its own seeded generator, so the samples written afterwards are unchanged."""
    for batch, lo, hi in plan.batches(shard):
        labels_B = torch.tensor([plan.label(i) for i in range(lo, hi)], device=device)
        _generate_batch(model, tokenizer, labels_B, s, plan.batch_seed(batch), device, amp, ShardStats())
        return


def progress_bar(mode: str, total: int, desc: str):
    """The bar of one worker's images: tqdm on this process's stderr, or Ray's tqdm, whose state goes to the
    driver through the task's output (the driver decided that a person watches: mvar.progress.enabled)."""
    if mode == "ray":
        from ray.experimental.tqdm_ray import tqdm
        return tqdm(total=total, desc=desc, unit="img")
    from mvar import progress
    return progress.bar(total, desc, flag=mode == "tqdm")


def sample_shards(job: dict) -> dict:
    """Make the shards of ``job`` (a SampleJob as a dict); returns {'shards', 'seconds', 'images'}."""
    from mvar.checkpoint import load_checkpoint
    spec = SampleJob(**job)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)  # the same on every worker: CPU results may depend on it
    try:
        device = torch.device(spec.device)
        model, tokenizer, _, _ = load_checkpoint(spec.checkpoint, device, spec.overrides)
        plan, sampling = SamplePlan(**{**spec.plan, "classes": tuple(spec.plan["classes"])}), SamplingConfig(**spec.sampling)
        if spec.shards:
            warm_up(model, tokenizer, plan, spec.shards[0], sampling, device, spec.amp)
        t0, images = time.perf_counter(), 0
        total = sum(hi - lo for lo, hi in map(plan.shard_range, spec.shards))
        desc = f"sample {os.path.basename(os.path.dirname(spec.out))} shards {spec.shards[0] if spec.shards else 0}+"
        bar = progress_bar(spec.progress, total, desc)
        try:
            for shard in spec.shards:
                write_shard(model, tokenizer, plan, shard, sampling, spec.out, device, spec.amp)
                lo, hi = plan.shard_range(shard)
                images += hi - lo
                bar.update(hi - lo)
        finally:
            bar.close()
        return {"shards": list(spec.shards), "seconds": time.perf_counter() - t0, "images": images}
    finally:
        torch.set_num_threads(threads_before)
