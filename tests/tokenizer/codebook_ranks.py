"""The per-rank side of test_codebook's two-rank test. A module of its own, imported by name, because
the spawned processes must import it and `tests` resolves to another package there."""
from __future__ import annotations

import torch
import torch.distributed as dist

from mvar.tokenizer import MultiScaleVQVAE
from mvar.tokenizer.codebook import CodeUsage, init_codebook, restart_dead_codes
from mvar.tokenizer.training import CodebookConfig


def rank_main(rank: int, port: int, cfg, images: list[torch.Tensor], out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)  # the same model on both ranks, as DDP starts it
        vae = MultiScaleVQVAE(cfg)
        with torch.no_grad():
            f = vae.img_to_features(images[rank])  # each rank sees its own images
            torch.manual_seed(100 + rank)  # and has its own random state: the picks must still agree
            init_codebook(vae.quantize, f, CodebookConfig())
            after_init = vae.quantize.embedding.weight.detach().clone()
            vae.quantize.embedding.weight.data[:20] = 50.0 + rank  # dead, and different on each rank
            usage = CodeUsage(len(cfg.patch_nums), cfg.vocab_size)
            usage.add(vae.quantize.f_to_idx(f))
            rows = restart_dead_codes(vae.quantize, f, usage.window(), CodebookConfig(), step=5)
        out[rank] = {"init": after_init, "final": vae.quantize.embedding.weight.detach().clone(), "rows": rows}
    finally:
        dist.destroy_process_group()
