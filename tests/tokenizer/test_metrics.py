"""Tokenizer figures: usage %, perplexity, the low-usage warning and PSNR on cases with known answers."""
from __future__ import annotations

import math

import pytest
import torch

from mvar.tokenizer.metrics import code_counts, low_usage, perplexity, psnr_db, usage_metrics


def test_usage_and_perplexity_per_scale():
    V = 8
    one_code = torch.zeros(4, 1, dtype=torch.long)            # scale 0: 4 tokens, all code 0
    uniform = torch.arange(V).repeat(2).view(2, V)            # scale 1: every code twice
    half = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 3]])         # scale 2: 4 codes equally
    counts = code_counts([one_code, uniform, half], V)
    assert counts.shape == (3, V) and counts.sum(1).tolist() == [4, 16, 8]
    m = usage_metrics(counts)
    assert [m[f"tok/usage_s{k}"] for k in range(3)] == [12.5, 100.0, 50.0]
    assert [m[f"tok/perplexity_s{k}"] for k in range(3)] == pytest.approx([1.0, 8.0, 4.0])
    assert perplexity(torch.tensor([[3.0, 1.0]])).item() == pytest.approx(
        math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))


def test_low_usage_judges_a_scale_against_what_its_tokens_allow():
    V = 64
    counts = torch.zeros(3, V)
    counts[0, :4] = 1        # 4 tokens, 4 codes: as many as possible
    counts[1, 0] = 100       # 100 tokens on one code: collapsed
    counts[2, :40] = 10      # 400 tokens over 40 of 64 codes: fine at 0.1
    lines = low_usage(counts, 0.1)
    assert len(lines) == 1 and lines[0].startswith("scale 1: 1 of 64 codes")


def test_psnr_of_known_errors():
    x = torch.zeros(2, 3, 4, 4)
    assert psnr_db(x + 0.1, x).tolist() == pytest.approx([20 * math.log10(1 / 0.05)] * 2, rel=1e-5)  # 26.02 dB
    assert psnr_db(torch.full_like(x, 5.0), x).tolist() == pytest.approx([20 * math.log10(2)] * 2, rel=1e-5)
    assert psnr_db(x, x).min() >= 99  # identical: capped, not inf
