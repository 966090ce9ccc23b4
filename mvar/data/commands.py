"""`mvar data ...`: make, pack, check and tokenize shard sets.

Imports of the heavy parts happen inside the handlers so `mvar --help` stays fast.
"""
from __future__ import annotations

import argparse
import logging
import sys

from mvar.errors import UserError


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="make, pack, verify and tokenize WebDataset shards",
                                 description="Make, pack, verify and tokenize WebDataset shard sets.")
    commands = data.add_subparsers(dest="data_command", metavar="DATA_COMMAND", help="what to do with shards")
    commands.required = True
    _add_synth(commands)
    _add_pack(commands)
    _add_verify(commands)
    _add_tokenize(commands)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _add_synth(commands) -> None:
    p = commands.add_parser("synth", help="a deterministic class-conditional synthetic image set",
                            description="Write a synthetic class-conditional image set (shapes x colours "
                                        "x textures) as shards + manifest, for local runs and tests.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--num-images", type=int, default=5000, help="images in the set")
    p.add_argument("--image-size", type=int, default=64, help="side of the square images in px")
    p.add_argument("--num-classes", type=int, default=10, help="classes (images are spread evenly)")
    p.add_argument("--seed", type=int, default=0, help="seed of the set (same seed, same bytes)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding in the shards")
    p.set_defaults(func=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    from mvar.data.synth import write_synth
    for flag, value, low in (("--num-images", args.num_images, 1), ("--image-size", args.image_size, 8),
                             ("--num-classes", args.num_classes, 1), ("--shard-size", args.shard_size, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    manifest = write_synth(args.out, args.num_images, args.image_size, args.num_classes,
                           args.seed, args.shard_size, args.format)
    print(f"wrote {manifest.num_samples} images of {manifest.num_classes} classes in "
          f"{len(manifest.shards)} shards to {args.out}")
    return 0


def _add_pack(commands) -> None:
    p = commands.add_parser("pack", help="an ImageFolder tree (one folder per class) -> image shards",
                            description="Centre-crop and resize (ADM preprocessing) every image of an "
                                        "ImageFolder tree into shards. Resumable: rerun the same command "
                                        "after an interruption to finish the job.")
    p.add_argument("--src", required=True, help="tree with one folder of images per class (ImageNet train/)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--image-size", type=int, default=256, help="side in px after the centre crop and resize")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    p.add_argument("--workers", type=int, default=0, help="decode/resize processes (0 = one per core)")
    p.add_argument("--format", choices=("png", "jpg"), default="png", help="png is lossless (default)")
    p.add_argument("--order-seed", type=int, default=0, help="seed of the class-mixing file order")
    p.add_argument("--no-shuffle", action="store_true", help="keep sorted order (class by class)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(func=run_pack)


def run_pack(args: argparse.Namespace) -> int:
    from mvar.data.pack import PackOptions, pack
    _setup_logging()
    opts = PackOptions(image_size=args.image_size, shard_size=args.shard_size, fmt=args.format,
                       workers=args.workers, seed=args.order_seed, shuffle=not args.no_shuffle,
                       progress=not args.no_progress)
    manifest = pack(args.src, args.out, opts)
    skipped = manifest.skipped
    print(f"packed {manifest.num_samples} images of {manifest.num_classes} classes in "
          f"{len(manifest.shards)} shards to {args.out} (skipped: {len(skipped['empty_class_folders'])} "
          f"empty class folders, {skipped['non_image_files']} non-image files, "
          f"{skipped['undecodable_images']} unreadable images)")
    return 0


def _add_verify(commands) -> None:
    p = commands.add_parser("verify", help="recount, re-hash and decode every shard of a set",
                            description="Check every shard against the manifest: sample counts, sha256, "
                                        "and that every sample decodes. Exits 1 naming each bad shard.")
    p.add_argument("location", help="shard directory or URL")
    p.add_argument("--workers", type=int, default=1, help="shards checked in parallel")
    p.add_argument("--shard-opener", default="", help="e.g. 'pipe:aws s3 cp {url} -'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(func=run_verify)


def run_verify(args: argparse.Namespace) -> int:
    from mvar.data.verify import stray_files, verify
    manifest, reports = verify(args.location, args.workers, args.shard_opener, progress=not args.no_progress)
    bad = [r for r in reports if r.problems]
    for report in bad:
        print(f"BAD {report.name}: " + "; ".join(report.problems), file=sys.stderr)
    for name in stray_files(args.location, manifest):
        print(f"note: {name} is not listed in the manifest (leftover?)", file=sys.stderr)
    counted = sum(r.num_samples for r in reports)
    if bad:
        print(f"{len(bad)} of {len(reports)} shards bad in {args.location}", file=sys.stderr)
        return 1
    print(f"ok: {len(reports)} shards, {counted} samples ({manifest.kind}), {manifest.num_classes} classes")
    return 0


def _add_tokenize(commands) -> None:
    p = commands.add_parser("tokenize", help="image shards -> token shards (the multi-scale code indices)",
                            description="Encode every image with a multi-scale VQ tokenizer and store the "
                                        "code indices of all scales (the latent cache). Resumable.")
    p.add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory, or a registered tokenizer "
                   "version: models:/NAME@ALIAS (final, best) or models:/NAME/VERSION, "
                   "e.g. models:/tokenizer-vae-tiny@final")
    p.add_argument("--tracking-uri", default="", help="MLflow store of a models:/ --tokenizer (default: "
                   "MLFLOW_TRACKING_URI, else sqlite under out/mlflow)")
    p.add_argument("--src", required=True, help="image shard directory or URL")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--flip", action="store_true", help="also store the tokens of the mirrored image")
    p.add_argument("--batch-size", type=int, default=64, help="images per tokenizer batch")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto = cuda when present)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
    p.set_defaults(func=run_tokenize)


def run_tokenize(args: argparse.Namespace) -> int:
    from mvar.data.tokens import token_usage, tokenize, usage_report
    _setup_logging()
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.device != "auto":
        from mvar.sampling import check_device
        check_device(args.device)
    if args.tokenizer.startswith("models:/"):
        from mvar.tracking import Store
        model_uri, args.tokenizer = args.tokenizer, Store(args.tracking_uri).resolve_model(args.tokenizer)
        print(f"{model_uri}: {args.tokenizer}")
    manifest = tokenize(args.tokenizer, args.src, args.out, flip=args.flip, batch_size=args.batch_size,
                        device=args.device, progress=not args.no_progress)
    print(f"wrote tokens of {manifest.num_samples} images in {len(manifest.shards)} shards to {args.out} "
          f"(tokenizer sha256 {manifest.tokens['tokenizer_sha256'][:12]}...)")
    print(usage_report(token_usage(args.out, manifest), manifest.tokens["patch_nums"]))
    return 0
