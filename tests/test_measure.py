"""The ground-floor probes: peak memory of a phase, attention FLOPs, and who imports them."""
import os
import subprocess
import sys

import torch

from mvar.measure import MALLOC_ENV, PeakMemory, attention_gflops
from mvar.models import NextScaleTransformer, named_model
from mvar.tokenizer import TokenizerConfig


def test_peak_memory_sees_a_freed_allocation_of_the_phase():
    code = ("import torch; from mvar.measure import PeakMemory\n"
            "with PeakMemory(torch.device('cpu')) as m:\n"
            "    x = torch.ones(64 * 2**20 // 4); del x\n"  # 64 MiB, touched, then freed
            "with PeakMemory(torch.device('cpu')) as quiet:\n"
            "    pass\n"
            "print(m.peak, quiet.peak)")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **MALLOC_ENV},
                         capture_output=True, text=True, check=True).stdout.split()
    peak, quiet = map(float, out)
    assert 60 <= peak <= 80 and quiet < 8  # the second phase does not inherit the first one's pages


def test_attention_gflops_counts_attended_pairs():
    tok = TokenizerConfig.tiny()
    flops = {}
    for variant in ("var", "mvar"):
        m = NextScaleTransformer(named_model(f"{variant}-tiny"), tok.vocab_size, tok.z_channels, tok.patch_nums)
        flops[variant] = attention_gflops(m)
    L = sum(p * p for p in tok.patch_nums)
    assert flops["var"] > flops["mvar"] > 0 and flops["var"] <= 4 * L * L * m.C * len(m.blocks) / 1e9


def test_production_code_does_not_import_the_benchmark_harness():
    code = ("import sys, mvar.training.loop, mvar.training.memory, mvar.evaluation.sampler, "
            "mvar.evaluation.workers; print('mvar.bench' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    assert PeakMemory(torch.device("cpu")).method.startswith("VmHWM")
