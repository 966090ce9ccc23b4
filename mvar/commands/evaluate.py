"""`mvar eval`: sample a checkpoint on Ray workers and compute FID / IS / precision / recall.

    mvar eval --run-id RUN | --checkpoint DIR --reference REF [--num-per-class 50] [--cfg 1.5,2.0] ...
    mvar eval make-ref --shards DIR --out REF.npz [--feature-extractor classifier] [--feature-extractor-weights FILE]
    mvar eval standin-weights --out FILE [--seed 0]        # random Inception weights for offline tests
    mvar eval train-classifier --shards DIR --out FILE.pt [--eval-shards DIR]   # a feature extractor for labelled sets
    mvar eval bench --variants var,mvar --size tiny        # sampling throughput (images/s)

Flags set `eval.*` keys (see mvar/evaluation/config.py); `--config FILE.yaml` and
`--set key=value` reach every key. The same command resumes an interrupted evaluation.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

# flag -> config key; values are parsed by the config loader (lists as a,b,c)
FLAG_KEYS = {
    "num_per_class": "eval.num_per_class", "classes": "eval.classes", "cfg": "eval.cfg", "top_k": "eval.top_k",
    "top_p": "eval.top_p", "seed": "eval.seed", "batch_size": "eval.batch_size", "attention": "eval.attention",
    "window_size": "eval.window_size", "reference": "eval.reference",
    "feature_extractor_weights": "eval.feature_extractor_weights", "feature_extractor": "eval.feature_extractor",
    "num_workers": "eval.num_workers",
    "cpus_per_worker": "eval.cpus_per_worker", "out": "eval.out_dir", "device": "eval.device",
    "checkpoint": "checkpoint", "run_id": "run_id", "tracking_uri": "tracking.uri", "experiment": "tracking.experiment",
}
LIST_FLAGS = ("classes", "cfg", "top_k", "top_p")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="sample a checkpoint and compute FID / IS / precision / recall",
                              description=__doc__.split("\n\n")[0])
    add_eval_arguments(p)
    p.set_defaults(func=run)
    commands = p.add_subparsers(dest="eval_command", metavar="EVAL_COMMAND")
    _add_make_ref(commands)
    _add_standin_weights(commands)
    _add_train_classifier(commands)
    _add_bench(commands)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="model checkpoint directory (default: the run's mvar.checkpoint tag)")
    p.add_argument("--run-id", help="MLflow training run: resolves the checkpoint and receives the results")
    p.add_argument("--reference", help="reference images (shard set or ADM .npz) or a `mvar eval make-ref` file")
    p.add_argument("--num-per-class", type=int, help="samples per class (default 50)")
    p.add_argument("--classes", help="class ids, e.g. 0,1,2 (default: all)")
    p.add_argument("--cfg", help="guidance, one value or several: 1.5,2.0 (one setting each)")
    p.add_argument("--top-k", help="top-k, one value or several")
    p.add_argument("--top-p", help="top-p, one value or several")
    p.add_argument("--seed", type=int)
    p.add_argument("--batch-size", type=int, help="images per generation batch (default 32)")
    p.add_argument("--attention", choices=["var", "scale_markov", "mvar"], help="override the checkpoint's pattern")
    p.add_argument("--window-size", type=int)
    p.add_argument("--feature-extractor-weights", help="local Inception weights file, or the classifier's .pt "
                   "(no download)")
    p.add_argument("--feature-extractor", choices=["inception", "classifier"],
                   help="inception (default) or a classifier from `mvar eval train-classifier`")
    p.add_argument("--num-workers", type=int, help="Ray workers (0: in this process)")
    p.add_argument("--cpus-per-worker", type=float)
    p.add_argument("--use-gpu", action="store_true", default=None, help="one GPU per worker")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=None, help="sample only")
    p.add_argument("--out", help="output directory (default out/eval/<checkpoint>-<hash>)")
    p.add_argument("--device", help="metrics / in-process sampling device: auto, cpu, cuda")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default MLFLOW_TRACKING_URI, else out/mlflow)")
    p.add_argument("--experiment", help="MLflow experiment of a new evaluation run (default mvar)")
    p.add_argument("--no-tracking", dest="track", action="store_false", default=None, help="no MLflow")
    p.add_argument("--config", help="YAML file with an EvaluateConfig (eval:, tracking:, checkpoint:, run_id:)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. "
                   "eval.samples_per_shard=256 (repeatable)")


def config_from_args(args: argparse.Namespace):
    """Defaults, then --config, then the flags, then --set: resolved and validated once."""
    from mvar.config import from_dict, merge, parse_overrides, read_yaml
    from mvar.evaluation.config import EvaluateConfig
    data = read_yaml(args.config) if args.config else {}
    flags: dict = {}
    for flag, key in FLAG_KEYS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag in LIST_FLAGS:
            value = [v.strip() for v in str(value).split(",") if v.strip()]
            value = [float(v) if flag in ("cfg", "top_p") else int(v) for v in value] if _numeric(value) else value
        _put(flags, key, value)
    for flag, key in (("use_gpu", "eval.use_gpu"), ("metrics", "eval.metrics"), ("track", "track")):
        if getattr(args, flag, None) is not None:
            _put(flags, key, getattr(args, flag))
    return from_dict(EvaluateConfig, merge(merge(data, flags), parse_overrides(args.set)))


def _numeric(values: list[str]) -> bool:
    try:
        [float(v) for v in values]
        return True
    except ValueError:
        return False


def _put(tree: dict, key: str, value) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
    tree[leaf] = value


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from mvar.evaluation.run import evaluate
    _setup_logging()
    results = evaluate(config_from_args(args))
    print(json.dumps([{"setting": r.out.name, "run_id": r.run_id, "out": str(r.out), **r.metrics} for r in results],
                     indent=1))
    return 0


def _add_make_ref(commands) -> None:
    p = commands.add_parser("make-ref", help="reference statistics (FID mu/sigma + features) of an image set",
                            description="Compute the Inception statistics of a reference image set once: FID's "
                                        "mu and sigma and the features precision/recall needs, with the image "
                                        "size and the weights' sha256 (a mismatch is refused later).")
    p.add_argument("--shards", required=True, help="image shard set (dir or URL), or an ADM-layout .npz (arr_0)")
    p.add_argument("--out", required=True, help=".npz file to write")
    p.add_argument("--feature-extractor-weights", default="", help="local Inception weights (default: official), "
                   "or the classifier's .pt")
    p.add_argument("--feature-extractor", default="inception", choices=["inception", "classifier"])
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=32, help="feature extractor batch")
    p.set_defaults(func=run_make_ref)


def run_make_ref(args: argparse.Namespace) -> int:
    import torch

    from mvar.errors import UserError
    from mvar.metrics.fidelity import compute_reference, save_reference
    from mvar.metrics.inception import resolve_weights
    if not args.out.endswith(".npz"):
        raise UserError(f"--out must name a .npz file, got '{args.out}'")
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    weights = resolve_weights(args.feature_extractor_weights, extractor=args.feature_extractor)
    ref = compute_reference(args.shards, weights, device, args.batch_size)
    save_reference(args.out, ref)
    kind = ("official" if weights.official else "NOT the official weights") if args.feature_extractor == "inception" \
        else "a classifier: comparable only with numbers made with this file"
    print(f"wrote {args.out}: {ref.num_images} images of {ref.image_size} px, {weights.extractor} weights sha256 "
          f"{weights.sha256[:16]}... ({kind})")
    return 0


def _add_standin_weights(commands) -> None:
    p = commands.add_parser("standin-weights", help="seeded random Inception weights (tests, offline demos)",
                            description="Write a seeded random state dict for torch-fidelity's Inception. Metrics "
                                        "made with it are tagged as not comparable with published numbers.")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_standin_weights)


def run_standin_weights(args: argparse.Namespace) -> int:
    from mvar.metrics.inception import write_standin_inception_weights
    sha = write_standin_inception_weights(args.out, args.seed)
    print(f"wrote {args.out} (sha256 {sha})")
    return 0


def _add_train_classifier(commands) -> None:
    p = commands.add_parser("train-classifier", help="a small classifier of a labelled image set, as the metrics' "
                            "feature extractor", description="Train a small CNN on the labelled image shards (a "
                            "minute on CPU for the synthetic set) and save it as FILE.pt + FILE.yaml; then "
                            "`mvar eval --feature-extractor classifier --feature-extractor-weights FILE.pt`.")
    p.add_argument("--shards", required=True, help="labelled image shard set (the training split)")
    p.add_argument("--out", required=True, help=".pt file to write (its .yaml goes beside it)")
    p.add_argument("--eval-shards", default="", help="held-out image shards: report the accuracy on them")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    p.set_defaults(func=run_train_classifier)


def run_train_classifier(args: argparse.Namespace) -> int:
    import torch

    from mvar.errors import UserError
    from mvar.metrics.classifier import train_classifier
    if not args.out.endswith(".pt"):
        raise UserError(f"--out must name a .pt file, got '{args.out}'")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train_classifier(args.shards, args.out, args.eval_shards, args.steps, args.batch_size, args.lr, args.seed)
    held = f", held-out accuracy {result.heldout_acc:.3f}" if result.heldout_acc is not None else ""
    print(f"wrote {result.path} (+ {result.path.with_suffix('.yaml').name}): {result.meta.num_classes} classes, "
          f"{result.meta.image_size} px, training accuracy {result.train_acc:.3f}{held}, "
          f"{result.meta.training['seconds']:.0f} s")
    return 0


def _add_bench(commands) -> None:
    p = commands.add_parser("bench", help="sampling throughput (images/s) per attention variant",
                            description="Generate and decode batches with random weights; report images/s.")
    p.add_argument("--variants", default="var,mvar")
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--num-images", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch

    from mvar.evaluation.bench import markdown, measure
    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    results = measure(variants, args.size, args.batch, args.num_images, args.device, args.cfg)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=1)
    return 0
