"""The README's main command on embedded defaults: everything local, nothing downloaded.

For now: synthetic image shards, a tiny stand-in checkpoint (random weights, the shape of the
authors' tiny model), token shards of the synthetic set made with its tokenizer, samples under
VAR and MVAR attention, and the memory/speed benchmark of the three variants at the tiny size.
Later steps (training, evaluation, report) join here.
Reruns reuse what is already made.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import torch

from mvar.checkpoint import save_checkpoint
from mvar.cli import main as mvar_main
from mvar.models import NextScaleTransformer, named_model
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def check(rc: int) -> None:
    if rc != 0:
        raise SystemExit(rc)


def make_standin_checkpoint(out: Path) -> Path:
    if (out / "checkpoint.yaml").is_file():
        print(f"reusing {out}")
        return out
    torch.manual_seed(0)
    tok_cfg = TokenizerConfig.tiny()
    tokenizer = MultiScaleVQVAE(tok_cfg)
    model = NextScaleTransformer(named_model("mvar-tiny"), tok_cfg.vocab_size, tok_cfg.z_channels, tok_cfg.patch_nums)
    save_checkpoint(out, model, tokenizer, tok_cfg, extra={"source": {"note": "random stand-in weights"}})
    print(f"wrote {out}")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/quickstart", help="where everything is written")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)

    step("1/5 synthetic image shards (64 px, 10 classes)")
    synth = out / "data" / "synth"
    if (synth / "manifest.json").is_file():
        print(f"reusing {synth}")
    else:
        check(mvar_main(["data", "synth", "--out", str(synth), "--num-images", "400", "--image-size", "64",
                         "--num-classes", "10", "--seed", "0"]))

    step("2/5 tiny stand-in checkpoint")
    ckpt = make_standin_checkpoint(out / "checkpoint")

    step("3/5 token shards of the synthetic set (the latent cache training reads)")
    tokens = out / "data" / "synth-tokens"
    if (tokens / "manifest.json").is_file():
        print(f"reusing {tokens}")
    else:
        check(mvar_main(["data", "tokenize", "--tokenizer", str(ckpt), "--src", str(synth), "--out", str(tokens)]))

    step("4/5 samples under VAR and MVAR attention (same weights)")
    for attention in ("var", "mvar"):
        png = out / f"samples_{attention}.png"
        check(mvar_main(["sample", "--checkpoint", str(ckpt), "--classes", "0,1,2,3,4,5,6,7", "--attention", attention,
                   "--seed", "0", "--out", str(png)]))

    step("5/5 benchmark: var, scale_markov, mvar (tiny, CPU)")
    bench_json = out / "bench.json"
    rc = subprocess.call([sys.executable, "-m", "mvar.cli", "bench", "--size", "tiny", "--resolution", "64",
                          "--batch", "8", "--repeats", "2", "--json", str(bench_json)])
    if rc != 0:
        return rc
    print(f"\ndone: outputs in {out}")
    print("the real-size comparison: mvar bench --size d8 --batch 8 --resolution 256 (see docs/benchmarks.md)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
