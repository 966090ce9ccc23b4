"""Codebook upkeep: data-dependent initialisation keeps the codes in use where N(0, 1) codes collapse,
dead codes are re-seeded, and two ranks (gloo) end with the same codebook."""
from __future__ import annotations

import socket
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from mvar.data.synth import synth_images
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.tokenizer.codebook import (
    CodeUsage,
    codes_per_scale,
    dead_codes,
    init_codebook,
    kmeans_pp,
    reset_rows,
    restart_dead_codes,
)
from mvar.tokenizer.metrics import code_counts, usage_percent
from mvar.tokenizer.training import CodebookConfig

SMALL = TokenizerConfig(image_size=32, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2, 2),
                        num_res_blocks=1, patch_nums=(1, 2, 3, 4))


def synth_batch(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    images = np.stack([img for _, _, img in synth_images(seed, 0, n, 10, size)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def used_codes(vae: MultiScaleVQVAE, x: torch.Tensor) -> list[int]:
    counts = code_counts(vae.img_to_idx(x), vae.vocab_size)
    return counts.gt(0).sum(1).tolist()


def train_steps(vae: MultiScaleVQVAE, x: torch.Tensor, steps: int) -> None:
    opt = torch.optim.Adam(vae.parameters(), lr=2e-3)
    for _ in range(steps):
        loss = vae.losses(x).total
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_a_batch_that_collapses_with_the_default_codes_keeps_its_codes_with_kmeans_init():
    x = synth_batch(32)
    torch.manual_seed(0)
    default = MultiScaleVQVAE(SMALL)
    torch.manual_seed(0)
    seeded = MultiScaleVQVAE(SMALL)
    with torch.no_grad():
        assert init_codebook(seeded.quantize, seeded.img_to_features(x), CodebookConfig(init="kmeans++"))
    before_default, before_seeded = used_codes(default, x), used_codes(seeded, x)
    # N(0, 1) codes dwarf a fresh encoder's features: a few codes serve every residual
    assert all(s > d for s, d in zip(before_seeded[1:], before_default[1:])), (before_seeded, before_default)
    assert before_seeded[-1] == SMALL.vocab_size  # 512 last-scale vectors: k-means++ finds a use for every code
    train_steps(default, x, 10)
    train_steps(seeded, x, 10)
    after_default, after_seeded = used_codes(default, x), used_codes(seeded, x)
    # measured [1, 2, 2, 5] and [2, 13, 15, 37] of 64 codes
    assert after_default[0] == 1 and max(after_default) <= 6, after_default
    assert after_seeded[-1] >= 0.45 * SMALL.vocab_size and min(after_seeded) >= 2, after_seeded
    assert all(s >= 2 * d for s, d in zip(after_seeded[1:], after_default[1:])), (after_seeded, after_default)


def test_codes_per_scale_follow_the_tokens_and_sum_to_the_vocabulary():
    assert sum(codes_per_scale((1, 2, 3, 4, 5, 6, 8), 256, [10 ** 6] * 7)) == 256
    n = codes_per_scale((1, 2, 3, 4), 64, [4, 16, 36, 64])  # 4 images: scale 0 has only 4 vectors
    assert sum(n) == 64 and n[0] <= 4 and n == sorted(n)


def test_kmeans_pp_picks_every_cluster_before_a_second_point_of_any():
    gen = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    x = (centres[:, None] + 0.01 * torch.randn(4, 50, 2, generator=gen)).reshape(-1, 2)
    picked = kmeans_pp(x, 4, gen)
    assert torch.cdist(picked, centres).argmin(1).sort().values.tolist() == [0, 1, 2, 3]
    # with three clusters taken already, the fourth pick comes from the one left
    extra = kmeans_pp(x, 1, gen, centres_MC=centres[:3])
    assert torch.cdist(extra, centres).argmin(1).item() == 3


def test_dead_codes_are_judged_per_scale_against_its_own_tokens():
    hits = torch.zeros(2, 8)
    hits[0, 0] = 4            # scale 0: 4 tokens, one code: alive although 4 is tiny next to scale 1's counts
    hits[1, 1:5] = 250        # scale 1: 1000 tokens over four codes
    hits[1, 5] = 1            # under 3 % of scale 1's uniform share (125): dead
    assert dead_codes(hits, 0.03).nonzero().flatten().tolist() == [5, 6, 7]


def test_restart_reseeds_dead_codes_from_residuals_and_resets_their_optimizer_state():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(SMALL)
    x = synth_batch(16)
    with torch.no_grad():
        f = vae.img_to_features(x)
    init_codebook(vae.quantize, f, CodebookConfig())
    q = vae.quantize
    q.embedding.weight.data[:32] = 50.0  # half the codebook far from any residual: never chosen
    usage = CodeUsage(len(SMALL.patch_nums), SMALL.vocab_size)
    usage.add(q.f_to_idx(f))
    hits = usage.window()
    assert usage.hits_SV.sum() == 0  # the window starts again
    opt = torch.optim.Adam(vae.parameters())
    vae.losses(x).total.backward()
    opt.step()
    rows = restart_dead_codes(q, f, hits, CodebookConfig(), step=10)
    assert set(range(32)) <= set(rows.tolist())
    assert q.embedding.weight.data[:32].abs().max() < 50  # replaced by residual vectors
    reset_rows(opt, q.embedding.weight, rows)
    assert opt.state[q.embedding.weight]["exp_avg"][rows].abs().sum() == 0
    counts = code_counts(q.f_to_idx(f), SMALL.vocab_size)
    assert usage_percent(counts)[-1] > usage_percent(hits)[-1]


def test_cosine_lookup_ignores_the_length_of_the_codes():
    q = MultiScaleVQVAE(TokenizerConfig(**{**vars(SMALL), "znorm": True})).quantize
    q.embedding.weight.data[:2] = torch.tensor([[1.0] + [0.0] * 7, [0.0, 100.0] + [0.0] * 6])
    q.embedding.weight.data[2:] = -1.0
    z = torch.tensor([[0.0, 0.5] + [0.0] * 6])  # L2 nearest: code 0; same direction: code 1
    assert q.nearest_code(z).item() == 1
    q.znorm = False
    assert q.nearest_code(z).item() == 0


# -- two ranks on gloo --------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_end_with_identical_codebooks_after_init_and_restart():
    images = [synth_batch(8, seed=0), synth_batch(8, seed=1)]
    sys.path.insert(0, str(Path(__file__).parent))  # spawned processes copy sys.path: they find the helper
    try:
        from codebook_ranks import rank_main
        with mp.Manager() as manager:
            out = manager.dict()
            mp.spawn(rank_main, args=(_free_port(), SMALL, images, out), nprocs=2, join=True)
            r0, r1 = dict(out[0]), dict(out[1])
    finally:
        sys.path.remove(str(Path(__file__).parent))
    assert torch.equal(r0["init"], r1["init"])
    assert torch.equal(r0["final"], r1["final"])
    assert torch.equal(r0["rows"], r1["rows"]) and r0["rows"].numel() >= 20
    assert r0["final"][:20].abs().max() < 50


def test_codebook_config_names_the_bad_key():
    from mvar.config import ConfigError
    with pytest.raises(ConfigError, match="codebook.restart_below"):
        CodebookConfig(restart_below=0).validate("codebook.")
    cfg = CodebookConfig(restart_every=50, restart_until=200)
    assert [d for d in range(1, 301) if cfg.restart_due(d)] == [50, 100, 150]
