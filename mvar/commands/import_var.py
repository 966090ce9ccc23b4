"""`mvar import-var`: VAR's released weights into this project's checkpoint format."""
from __future__ import annotations

import argparse

from mvar.models.config import PATTERNS


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def register(subparsers) -> None:
    p = subparsers.add_parser("import-var", help="convert VAR's released weights (vae_*.pth + var_d*.pth) into a checkpoint",
                              description="Convert VAR's released tokenizer and generator weights into a checkpoint "
                                          "directory of this project. The same weights serve VAR, scale-Markov and MVAR.")
    p.add_argument("--vae", required=True, help="tokenizer weights, e.g. vae_ch160v4096z32.pth")
    p.add_argument("--var", required=True, help="generator weights, e.g. var_d16.pth")
    p.add_argument("--out", required=True, help="checkpoint directory to create")
    p.add_argument("--attention", default="var", choices=PATTERNS,
                   help="attention pattern recorded in the checkpoint (changeable at sampling time)")
    p.add_argument("--window-size", type=int, default=7, help="k of the k x k window (mvar)")
    p.add_argument("--markov-from-scale", type=int, default=8, help="first 0-based windowed scale (mvar)")
    p.add_argument("--patch-nums", type=_ints, default=None,
                   help="token-map sides, e.g. 1,2,3,4,5,6,8,10,13,16 (default: from the weights' token count)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mvar.checkpoint import read_checkpoint_meta
    from mvar.var_weights import import_var

    out = import_var(args.vae, args.var, args.out, patch_nums=args.patch_nums, overwrite=args.overwrite,
                     attention=args.attention, window_size=args.window_size,
                     markov_from_scale=args.markov_from_scale)
    model = read_checkpoint_meta(out)["model"]
    print(f"wrote {out}: depth {model['depth']}, width {model['embed_dim']}, attention {model['attention']}")
    return 0
