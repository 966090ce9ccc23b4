"""`mvar sample`: a quick look at a checkpoint; a grid of class-conditional samples as a PNG."""
from __future__ import annotations

import argparse
import math
from pathlib import Path

from mvar.errors import UserError
from mvar.models.config import PATTERNS

SAMPLING_FLAGS = {"cfg": "--cfg", "top_k": "--top-k", "top_p": "--top-p"}  # sampling.* key -> its flag here
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _classes(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--classes takes comma-separated class ids, got '{text}'")


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="sample a grid of images from a checkpoint",
                              description="Sample class-conditional images from a checkpoint and save them as one grid.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint directory (mvar import-var or a training run)")
    which.add_argument("--model", help="a registered model version: models:/NAME@ALIAS (final, best), "
                       "models:/NAME/VERSION or models:/NAME/latest, e.g. models:/mvar-tiny@final")
    p.add_argument("--tracking-uri", default="", help="MLflow store of --model (default: MLFLOW_TRACKING_URI, "
                   "else sqlite under out/mlflow)")
    p.add_argument("--classes", type=_classes, default=None, help="class ids, e.g. 1,2,3 (default: random)")
    p.add_argument("--num", type=int, default=8, help="number of images when --classes is not given")
    p.add_argument("--per-class", type=int, default=1, help="images per class id")
    p.add_argument("--cfg", type=float, default=None,
                   help="classifier-free guidance at the last scale (0: off; default: the checkpoint's, else 1.5)")
    p.add_argument("--top-k", type=int, default=None, help="default: the checkpoint's, else 900")
    p.add_argument("--top-p", type=float, default=None, help="default: the checkpoint's, else 0.96")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling generator (same seed, same grid)")
    p.add_argument("--attention", choices=PATTERNS, default=None,
                   help="override the checkpoint's attention pattern (same parameters)")
    p.add_argument("--window-size", type=int, default=None,
                   help="override the checkpoint's window k of mvar attention (same parameters)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--out", required=True, help="PNG file to write")
    p.set_defaults(func=run)


def check_args(args: argparse.Namespace) -> None:
    """The flags on their own, before anything is loaded: the sampling flags through the checks of the
    `sampling.*` keys they stand for (as `mvar train` checks sampling.top_p), the output's file type."""
    from mvar.config import ConfigError
    from mvar.evaluation.config import SamplingDefaults
    if args.classes == []:
        raise UserError("--classes: no class id given; name them, e.g. --classes 1,2,3, or leave the flag out "
                        "for random classes")
    for flag, value in (("--num", args.num), ("--per-class", args.per_class)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if Path(args.out).suffix.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"--out: '{args.out}' is not an image file name; the grid is written as PNG: "
                        f"name it e.g. grid.png ({', '.join(IMAGE_SUFFIXES)})")
    for key, flag in SAMPLING_FLAGS.items():
        value = getattr(args, key)
        if value is not None:
            try:
                SamplingDefaults(**{key: value}).validate("sampling.")
            except ConfigError as err:
                raise UserError(f"{flag} {value:g}: {err}") from None


def model_overrides(args: argparse.Namespace, checkpoint: str) -> dict:
    """--attention / --window-size, checked against the checkpoint's model and its tokenizer's scales;
    an error names the flags (the checkpoint's own errors name its file)."""
    overrides = {k: v for k, v in (("attention", args.attention), ("window_size", args.window_size)) if v is not None}
    if not overrides:
        return {}
    from mvar.checkpoint import read_checkpoint_meta, read_model_config, read_tokenizer_config
    from mvar.config import ConfigError, from_dict
    from mvar.models.config import ModelConfig
    read_model_config(checkpoint)
    patch_nums = tuple(read_tokenizer_config(checkpoint).patch_nums)
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in overrides.items())
    try:
        from_dict(ModelConfig, {**read_checkpoint_meta(checkpoint)["model"], **overrides}, "model.").check_scales(
            patch_nums)
    except ConfigError as err:
        raise UserError(f"{flags}: {err} (the model of '{checkpoint}')") from None
    return overrides


def run(args: argparse.Namespace) -> int:
    check_args(args)
    import torch
    from torchvision.utils import save_image

    from mvar.checkpoint import load_checkpoint, read_checkpoint_meta
    from mvar.evaluation.config import SamplingDefaults
    from mvar.sampling import check_device, make_generator, sample_images

    device = check_device(args.device)
    if args.model:
        from mvar.tracking import Store
        args.checkpoint = Store(args.tracking_uri).resolve_model(args.model)
        print(f"{args.model}: {args.checkpoint}")
    overrides = model_overrides(args, args.checkpoint)
    model, tokenizer, cfg, _ = load_checkpoint(args.checkpoint, device, overrides)
    if args.classes is not None:
        bad = [c for c in args.classes if not 0 <= c < cfg.num_classes]
        if bad:
            raise UserError(f"--classes: ids {bad} are outside [0, {cfg.num_classes - 1}]")
        labels = torch.tensor(args.classes, device=device).repeat_interleave(args.per_class)
    else:
        labels = None
    own = SamplingDefaults.of_checkpoint(read_checkpoint_meta(args.checkpoint))  # the command line wins
    guidance, top_k, top_p = (own.cfg if args.cfg is None else args.cfg, own.top_k if args.top_k is None
                              else args.top_k, own.top_p if args.top_p is None else args.top_p)
    gen = make_generator(args.seed, device)
    imgs = sample_images(model, tokenizer, labels, batch_size=args.num, cfg=guidance, top_k=top_k,
                         top_p=top_p, generator=gen)
    if args.classes is None:
        nrow = math.ceil(math.sqrt(len(imgs)))
    else:  # one row per class, or the classes side by side (8 a row) with one image each
        nrow = args.per_class if args.per_class > 1 else min(len(imgs), 8)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image(imgs.float().cpu(), args.out, nrow=nrow, padding=2)
    print(f"wrote {args.out}: {len(imgs)} images, attention {cfg.attention}, cfg {guidance:g}, top-k {top_k}, "
          f"top-p {top_p:g}, seed {args.seed}")
    return 0
