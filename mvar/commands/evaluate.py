"""`mvar eval`: sample a checkpoint on Ray workers and compute FID / IS / precision / recall.

    mvar eval --run-id RUN | --checkpoint DIR | --model models:/NAME@ALIAS --reference REF [--num-per-class 50] [--cfg 1.5,2.0] [key.sub=value ...]
    mvar eval make-ref --shards DIR --out REF.npz [--feature-extractor classifier] [--feature-extractor-weights FILE]
    mvar eval standin-weights --out FILE [--seed 0]        # random Inception weights for offline tests
    mvar eval train-classifier --shards DIR --out FILE.pt [--eval-shards DIR]   # a feature extractor for labelled sets
    mvar eval bench --variants var,mvar --size tiny        # sampling throughput (images/s)

Flags are shorthands of `eval.*` keys (see mvar/evaluation/config.py); `--config FILE.yaml` and
`key.sub=value` overrides (e.g. eval.samples_per_shard=256) reach every key. The same command
resumes an interrupted evaluation. `python -m workflows.evaluate` is the same command.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from mvar.commands import SubcommandsOrOverrides, add_config_arguments, standalone
from mvar.models.config import PATTERNS

DESCRIPTION = "Sample a checkpoint on Ray workers and compute FID / IS / precision / recall."
# flag -> config key; values are parsed by the config loader (lists as a,b,c)
FLAG_KEYS = {
    "num_per_class": "eval.num_per_class", "classes": "eval.classes", "cfg": "eval.cfg", "top_k": "eval.top_k",
    "top_p": "eval.top_p", "seed": "eval.seed", "batch_size": "eval.batch_size", "attention": "eval.attention",
    "window_size": "eval.window_size", "reference": "eval.reference",
    "feature_extractor_weights": "eval.feature_extractor_weights", "feature_extractor": "eval.feature_extractor",
    "num_workers": "eval.num_workers",
    "cpus_per_worker": "eval.cpus_per_worker", "out": "eval.out_dir", "device": "eval.device",
    "checkpoint": "checkpoint", "model": "model", "run_id": "run_id", "tracking_uri": "tracking.uri", "experiment": "tracking.experiment",
}
SWITCH_KEYS = {"use_gpu": "eval.use_gpu", "metrics": "eval.metrics", "track": "track"}
LIST_FLAGS = ("classes", "cfg", "top_k", "top_p")


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="sample a checkpoint and compute FID / IS / precision / recall",
                              description=DESCRIPTION)
    add_eval_arguments(p, overrides=False)
    p.set_defaults(func=run, overrides=[])
    own = standalone("mvar eval", DESCRIPTION, configure)  # parses the line from eval's first override on
    commands = p.add_subparsers(dest="eval_command", action=SubcommandsOrOverrides, own=own,
                                metavar="{make-ref,standin-weights,train-classifier,bench} | key.sub=value",
                                help="a helper command, or config overrides of the evaluation, e.g. eval.seed=1 "
                                     "(every key: docs/config.md)")
    _add_make_ref(commands)
    _add_standin_weights(commands)
    _add_train_classifier(commands)
    _add_bench(commands)


def configure(p: argparse.ArgumentParser) -> None:
    """The evaluation's own parser (`python -m workflows.evaluate`): its flags and overrides, no helpers."""
    add_eval_arguments(p)
    p.set_defaults(func=run)


def _key(flag: str) -> str:
    return f"shorthand of {FLAG_KEYS.get(flag) or SWITCH_KEYS[flag]}"


def add_eval_arguments(p: argparse.ArgumentParser, overrides: bool = True) -> None:
    """The evaluation's flags: each a shorthand of one config key, named in its help."""
    p.add_argument("--checkpoint", help=f"model checkpoint directory ({_key('checkpoint')}; default: the run's "
                   "mvar.checkpoint tag)")
    p.add_argument("--model", help=f"a registered model version: models:/NAME@ALIAS (final: the last "
                   f"checkpoint, best: the lowest val/loss), models:/NAME/VERSION or models:/NAME/latest, e.g. "
                   f"models:/mvar-tiny@final ({_key('model')}); results go into an eval-<checkpoint> run")
    p.add_argument("--run-id", help=f"MLflow training run: resolves the checkpoint and receives the results "
                   f"({_key('run_id')})")
    p.add_argument("--reference", help="reference images (shard set or ADM .npz) or a `mvar eval make-ref` file "
                   f"({_key('reference')})")
    p.add_argument("--num-per-class", type=int, help=f"samples per class ({_key('num_per_class')}; default 50)")
    p.add_argument("--classes", help=f"class ids, e.g. 0,1,2 ({_key('classes')}; default: all)")
    p.add_argument("--cfg", help=f"guidance, one value or several: 1.5,2.0, one setting each ({_key('cfg')}; "
                   "default: the checkpoint's)")
    p.add_argument("--top-k", help=f"top-k, one value or several ({_key('top_k')}; default: the checkpoint's)")
    p.add_argument("--top-p", help=f"top-p, one value or several ({_key('top_p')}; default: the checkpoint's)")
    p.add_argument("--seed", type=int, help=f"seed of the batches' generators ({_key('seed')}; default 0)")
    p.add_argument("--batch-size", type=int, help=f"images per generation batch ({_key('batch_size')}; default 32)")
    p.add_argument("--attention", choices=PATTERNS, help=f"override the checkpoint's pattern ({_key('attention')})")
    p.add_argument("--window-size", type=int, help=f"override the checkpoint's window k (mvar; "
                   f"{_key('window_size')})")
    p.add_argument("--feature-extractor-weights", help="local Inception weights file or the classifier's .pt, "
                   f"nothing is downloaded ({_key('feature_extractor_weights')}; default: the official file)")
    p.add_argument("--feature-extractor", choices=["inception", "classifier"],
                   help=f"inception (default) or a classifier from `mvar eval train-classifier` "
                   f"({_key('feature_extractor')})")
    p.add_argument("--num-workers", type=int, help=f"Ray workers, 0: in this process ({_key('num_workers')}; "
                   "default 1)")
    p.add_argument("--cpus-per-worker", type=float, help=f"CPUs per Ray worker ({_key('cpus_per_worker')}; "
                   "default 1)")
    p.add_argument("--use-gpu", action="store_true", default=None, help=f"one GPU per worker ({_key('use_gpu')})")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", default=None,
                   help=f"sample only ({_key('metrics')}=false)")
    p.add_argument("--out", help=f"output directory ({_key('out')}; default out/eval/<checkpoint>-<hash>)")
    p.add_argument("--device", help=f"metrics / in-process sampling device: auto, cpu, cuda ({_key('device')}; "
                   "default auto)")
    p.add_argument("--tracking-uri", help=f"MLflow tracking URI ({_key('tracking_uri')}; default "
                   "MLFLOW_TRACKING_URI, else out/mlflow)")
    p.add_argument("--experiment", help=f"MLflow experiment of a new evaluation run ({_key('experiment')}; "
                   "default mvar)")
    p.add_argument("--no-tracking", dest="track", action="store_false", default=None,
                   help=f"no MLflow ({_key('track')}=false)")
    p.add_argument("--summary", action="store_true", help="print one line per setting (FID, class accuracy, "
                   "the run) instead of the results' JSON")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="deprecated spelling of a key.sub=value override (repeatable)")
    add_config_arguments(p, "YAML file with an EvaluateConfig (eval:, tracking:, checkpoint:, run_id:)",
                         overrides=overrides)


def config_from_args(args: argparse.Namespace):
    """Defaults, then --config, then the flags, then the key.sub=value overrides: resolved and validated once."""
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
    for flag, key in SWITCH_KEYS.items():
        if getattr(args, flag, None) is not None:
            _put(flags, key, getattr(args, flag))
    return from_dict(EvaluateConfig, merge(merge(data, flags), parse_overrides(args.overrides + args.set)))


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
    from mvar.evaluation.run import evaluate, prepare
    _setup_logging()
    cfg = config_from_args(args)
    if args.print_config:
        from mvar.config import dump_yaml
        print(dump_yaml(cfg), end="")
        return 0
    if args.check:
        prep = prepare(cfg)
        if cfg.track:
            from mvar.tracking import Store
            Store(cfg.tracking.uri).check(cfg.tracking.experiment)
        print(f"OK: checkpoint {prep.checkpoint}, {prep.plan.num_samples} samples per setting, "
              f"{len(cfg.eval.settings(prep.sampling))} setting(s): config, checkpoint, reference and the MLflow "
              "store checked")
        return 0
    results = evaluate(cfg)
    if args.summary:
        for r in results:
            shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in sorted(r.metrics.items())
                              if k.removeprefix("eval/") in ("fid", "kid", "class_acc", "precision", "recall"))
            print(f"{r.out.name}: {shown or 'no metrics'} (MLflow run {r.run_id})")
        return 0
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
    p.add_argument("--feature-extractor", default="inception", choices=["inception", "classifier"],
                   help="inception, or a classifier from `mvar eval train-classifier`")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:1 ...")
    p.add_argument("--batch-size", type=int, default=32, help="feature extractor batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (drawn only on a terminal anyway)")
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
    ref = compute_reference(args.shards, weights, device, args.batch_size, progress=not args.no_progress)
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
    p.add_argument("--out", required=True, help="weights file to write")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
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
    p.add_argument("--steps", type=int, default=400, help="optimizer steps (default 400)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate, cosine to 0 (default 3e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and the batches (default 0)")
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
    p.add_argument("--variants", default="var,mvar", help=f"comma-separated attention patterns ({', '.join(PATTERNS)})")
    p.add_argument("--size", default="tiny", help="model size of the registry (tiny, d4, d8, d16 ...)")
    p.add_argument("--batch", type=int, default=16, help="images per generation batch")
    p.add_argument("--num-images", type=int, default=64, help="images generated per variant")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    p.add_argument("--cfg", type=float, default=1.5, help="guidance at the last scale (0: no CFG)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the results as JSON to this file")
    p.set_defaults(func=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    import torch

    from mvar.commands.bench import variant_list
    from mvar.errors import UserError
    from mvar.evaluation.bench import markdown, measure
    from mvar.models.config import SIZES
    from mvar.sampling import check_device
    variants = variant_list(args.variants)  # the checks of `mvar bench`'s flags
    if args.size not in SIZES:
        raise UserError(f"--size: unknown '{args.size}'; known: {', '.join(SIZES)}")
    for flag, value in (("--batch", args.batch), ("--num-images", args.num_images)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = measure(variants, args.size, args.batch, args.num_images, args.device, args.cfg)
    print(markdown(results))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([asdict(r) for r in results], fh, indent=1)
    return 0
