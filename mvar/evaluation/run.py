"""Evaluate a checkpoint: check every input, sample on the workers, compute the metrics, log them.

    prep = prepare(cfg)            # all bad input fails here, before any sampling
    results = evaluate(cfg)        # per setting: OUT/<setting>/{samples/, samples.npz, grid.png, metrics.json}

Everything a setting writes is reused by a rerun of the same command: finished sample shards
(never partial ones), the `.npz`, and reference statistics computed from an image set.
"""
from __future__ import annotations

import hashlib
import json
import logging
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from mvar import cluster, progress
from mvar.checkpoint import read_checkpoint_meta, tokenizer_dir
from mvar.checkpoint import read_tokenizer_config as checkpoint_tokenizer_config
from mvar.config import ConfigError, from_dict
from mvar.data.manifest import Manifest, write_manifest
from mvar.data.writer import ShardSetWriter
from mvar.errors import UserError
from mvar.evaluation import runs
from mvar.evaluation.config import EvalConfig, EvaluateConfig, SamplingDefaults
from mvar.evaluation.plan import SamplePlan, setting_name, split_contiguous
from mvar.evaluation.sampler import SampleJob
from mvar.evaluation.workers import Workers
from mvar.files import file_sha256
from mvar.metrics.images import (
    ImageSet,
    is_npz,
    iter_images,
    iter_shard_images,
    open_image_set,
    write_images_npz,
)
from mvar.models.config import ModelConfig
from mvar.sampling import SamplingConfig
from mvar.tokenizer import TokenizerConfig

log = logging.getLogger(__name__)
DEFAULT_OUT = "out/eval"


@dataclass
class Prepared:
    """The checked inputs of an evaluation."""

    cfg: EvaluateConfig
    checkpoint: str
    overrides: dict
    model_cfg: ModelConfig
    image_size: int
    plan: SamplePlan
    out_root: Path
    step: int
    model_sha256: str
    sampling: SamplingDefaults = field(default_factory=SamplingDefaults)  # the checkpoint's, for empty eval.cfg ...
    weights: object = None        # FeatureWeights when metrics are on
    reference: object = None      # Reference (a make-ref file) or ImageSet (computed when first needed)
    provenance: dict = field(default_factory=dict)   # the sampling device's tags (`provenance`), once workers run


@dataclass
class SettingResult:
    setting: SamplingConfig
    out: Path
    metrics: dict[str, float]
    run_id: str = ""
    reused_shards: int = 0
    params: dict = field(default_factory=dict)


# -- checks, all before sampling ---------------------------------------------------------

def read_tokenizer_config(checkpoint: str) -> TokenizerConfig:
    try:
        tdir = tokenizer_dir(checkpoint)
    except UserError as err:
        raise UserError(f"checkpoint '{checkpoint}' has no tokenizer: {err}") from None
    return checkpoint_tokenizer_config(tdir)


def model_config(meta: dict, overrides: dict, tok_cfg: TokenizerConfig, checkpoint: str) -> ModelConfig:
    try:
        cfg = from_dict(ModelConfig, {**meta["model"], **overrides})
    except ConfigError as err:
        raise UserError(f"checkpoint '{checkpoint}' with eval overrides {overrides}: {err}") from err
    cfg.check_scales(tuple(tok_cfg.patch_nums), prefix="eval.")
    return cfg


def make_plan(ecfg: EvalConfig, num_classes: int) -> SamplePlan:
    classes = tuple(ecfg.classes) or tuple(range(num_classes))
    unknown = [c for c in classes if not 0 <= c < num_classes]
    if unknown:
        raise UserError(f"eval.classes: ids {unknown} are outside [0, {num_classes - 1}] (the model has "
                        f"{num_classes} classes)")
    plan = SamplePlan(classes, ecfg.num_per_class, ecfg.batch_size, ecfg.shard_size, ecfg.seed)
    if ecfg.metrics and (plan.num_samples <= ecfg.prc_neighborhood or plan.num_samples < ecfg.isc_splits):
        raise UserError(f"eval.num_per_class: {plan.num_samples} samples ({ecfg.num_per_class} x {len(classes)} "
                        f"classes) are too few: precision/recall needs more than eval.prc_neighborhood="
                        f"{ecfg.prc_neighborhood}, the Inception Score at least eval.isc_splits={ecfg.isc_splits}")
    return plan


def check_classifier(weights, image_size: int, num_classes: int | None) -> None:
    """The classifier must know the model's classes (class accuracy compares labels) and its image size."""
    from mvar.metrics.classifier import read_meta
    meta = read_meta(weights.path)
    if meta.image_size != image_size:
        raise UserError(f"eval.feature_extractor_weights: the classifier '{weights.path}' was trained on "
                        f"{meta.image_size} px images, the model makes {image_size} px images")
    if num_classes is not None and meta.num_classes != num_classes:
        raise UserError(f"eval.feature_extractor_weights: the classifier '{weights.path}' knows {meta.num_classes} "
                        f"classes, the model has {num_classes}; train it on the model's data set")


def prepare_reference(ecfg: EvalConfig, image_size: int, num_classes: int | None = None):
    """(weights, reference) checked against the model's image size (and classes) and the precision/recall k."""
    from mvar.metrics.fidelity import check_reference, is_reference_file, load_reference
    from mvar.metrics.inception import resolve_weights
    weights = resolve_weights(ecfg.feature_extractor_weights, extractor=ecfg.feature_extractor)
    if ecfg.feature_extractor == "classifier":
        check_classifier(weights, image_size, num_classes)
    where = ecfg.reference
    if is_npz(where) and is_reference_file(where):
        ref = load_reference(where)
        check_reference(ref, where, image_size, weights, ecfg.prc_neighborhood)
        return weights, ref
    images = open_image_set(where)
    if images.image_size != image_size:
        raise UserError(f"eval.reference '{where}' holds {images.image_size} px images but the model makes "
                        f"{image_size} px images; use a reference set of {image_size} px")
    if images.num_images <= ecfg.prc_neighborhood:
        raise UserError(f"eval.reference '{where}' has {images.num_images} images; precision/recall with "
                        f"eval.prc_neighborhood={ecfg.prc_neighborhood} needs more")
    return weights, images


def default_out(checkpoint: str) -> Path:
    tag = hashlib.sha256(checkpoint.encode()).hexdigest()[:8]
    return Path(DEFAULT_OUT).resolve() / f"{Path(checkpoint).name}-{tag}"


def job_paths(cfg: EvaluateConfig) -> dict[str, str]:
    """The locations every node of a Ray job must see (``mvar.cluster.check_job_paths``)."""
    ecfg = cfg.eval
    return {"checkpoint": cfg.checkpoint, "eval.out_dir": ecfg.out_dir or DEFAULT_OUT,
            "eval.reference": ecfg.reference, "eval.feature_extractor_weights": ecfg.feature_extractor_weights}


def prepare(cfg: EvaluateConfig) -> Prepared:
    ecfg = cfg.eval
    cluster.check_job_paths(job_paths(cfg), cfg.tracking.uri if cfg.track else None)
    checkpoint = cfg.checkpoint or (runs.checkpoint_of_model(cfg.model, cfg.tracking.uri) if cfg.model
                                    else runs.checkpoint_of_run(cfg.run_id, cfg.tracking.uri))
    checkpoint = str(Path(checkpoint).resolve())
    meta = read_checkpoint_meta(checkpoint)
    tok_cfg = read_tokenizer_config(checkpoint)
    overrides = {k: v for k, v in (("attention", ecfg.attention), ("window_size", ecfg.window_size)) if v}
    model_cfg = model_config(meta, overrides, tok_cfg, checkpoint)
    plan = make_plan(ecfg, model_cfg.num_classes)
    out_root = Path(ecfg.out_dir).resolve() if ecfg.out_dir else default_out(checkpoint)
    prep = Prepared(cfg, checkpoint, overrides, model_cfg, tok_cfg.image_size, plan, out_root,
                    step=int((meta.get("train") or {}).get("step", 0)),
                    model_sha256=file_sha256(Path(checkpoint) / "model.pt"),
                    sampling=SamplingDefaults.of_checkpoint(meta))
    if ecfg.metrics:
        prep.weights, prep.reference = prepare_reference(ecfg, tok_cfg.image_size, model_cfg.num_classes)
    return prep


# -- sampling ----------------------------------------------------------------------------

def sampling_device(ecfg: EvalConfig) -> str:
    if ecfg.num_workers > 0:
        return "cuda" if ecfg.use_gpu else "cpu"
    return metrics_device(ecfg).type


def metrics_device(ecfg: EvalConfig) -> torch.device:
    if ecfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(ecfg.device)


def job_plan(prep: Prepared, s: SamplingConfig) -> dict:
    """What the samples depend on: a rerun with anything else is refused, not mixed in."""
    return {"command": "eval", "checkpoint": prep.checkpoint, "model_sha256": prep.model_sha256,
            "overrides": prep.overrides, "plan": {**asdict(prep.plan), "classes": list(prep.plan.classes)},
            "sampling": asdict(s), "amp": prep.cfg.eval.amp, "format": "png"}


def sample_setting(prep: Prepared, s: SamplingConfig, shards_dir: Path, workers: Workers) -> tuple[list, int]:
    """Make the missing shards of one setting; returns (records of all shards, shards reused)."""
    ecfg, plan = prep.cfg.eval, prep.plan
    shards_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = job_plan(prep, s)
    with ShardSetWriter(str(shards_dir), spec) as job:
        pending = [i for i in range(plan.num_shards) if not job.is_done(i)]
        reused = plan.num_shards - len(pending)
        print(f"{setting_name(s)}: {plan.num_samples} samples in {plan.num_shards} shards, {reused} reused, "
              f"{len(pending)} to sample", flush=True)
        bars = ("ray" if ecfg.num_workers > 0 else "tqdm") if progress.enabled() else ""
        jobs = [SampleJob(prep.checkpoint, prep.overrides, str(shards_dir), run, spec["plan"], asdict(s),
                          sampling_device(ecfg), ecfg.threads, ecfg.amp, bars)
                for run in split_contiguous(pending, max(1, ecfg.num_workers))]
        workers.run(jobs)
        records = job.records(plan.num_shards)
        if pending or not (shards_dir / "manifest.json").is_file():
            manifest = Manifest(kind="images", num_samples=plan.num_samples,
                                class_names=[str(c) for c in range(prep.model_cfg.num_classes)],
                                image_size=prep.image_size, sample_format="png",
                                shards=[info for info, _ in records], source=spec)
            write_manifest(str(shards_dir), manifest)
    return records, reused


def infer_metrics(records: list, num_samples: int) -> dict[str, float]:
    """Per batch: median generation seconds; peak memory and KV cache at their largest; images/s per worker."""
    stats = [st for _, st in records]
    latency = [x for st in stats for x in st["latency_s"]]
    busy = sum(latency) + sum(x for st in stats for x in st["decode_s"])
    return {"infer/latency_s": statistics.median(latency),
            "infer/peak_mem_mb": max(st["peak_mem_mb"] for st in stats),
            "infer/kv_cache_mb": max(st["kv_cache_mb"] for st in stats),
            "infer/images_per_s": num_samples / busy if busy > 0 else float("nan")}


# -- outputs -----------------------------------------------------------------------------

def write_grid(shards_dir: Path, plan: SamplePlan, ecfg: EvalConfig, path: Path) -> Path:
    """Columns = the first grid_classes classes, rows = their first grid_per_class samples."""
    from torchvision.utils import save_image
    wanted = plan.grid_indices(ecfg.grid_classes, ecfg.grid_per_class)
    last, picked = max(wanted), {}
    for index, (image, _) in enumerate(iter_shard_images(str(shards_dir))):
        if index in wanted:
            picked[index] = image
        if index >= last:
            break
    x = torch.from_numpy(np.stack([picked[i] for i in wanted])).permute(0, 3, 1, 2).float() / 255
    save_image(x, str(path), nrow=min(ecfg.grid_classes, len(plan.classes)), padding=2)
    return path


def reference_for(ecfg: EvalConfig, weights, reference, out_root: Path):
    """The Reference: the checked `make-ref` file, or computed from the image set once (cached in out_root)."""
    from mvar.metrics.fidelity import (
        Reference,
        cache_name,
        compute_reference,
        load_reference,
        save_reference,
    )
    if isinstance(reference, Reference):
        return reference
    images: ImageSet = reference
    path = out_root / cache_name(images.location, weights.sha256)
    if path.is_file():
        return load_reference(path)
    print(f"reference statistics of {images.num_images} images of {images.location} -> {path}", flush=True)
    ref = compute_reference(images.location, weights, metrics_device(ecfg), ecfg.feature_batch_size)
    save_reference(path, ref)
    return ref


def quality_metrics(ecfg: EvalConfig, image_size: int, out_root: Path, shards_dir: Path,
                    checked: tuple | None = None) -> dict[str, float]:
    """FID / KID / IS / precision / recall of one setting's samples, and the class accuracy with the classifier.
    ``checked``: (weights, reference) from `prepare`; without it (on a GPU worker) they are checked again
    where this runs."""
    from mvar.metrics.fidelity import (
        LABELS,
        bootstrap_metrics,
        class_accuracy,
        fidelity_metrics,
        image_features,
    )
    from mvar.metrics.inception import ISC_LAYER
    weights, reference = checked if checked else prepare_reference(ecfg, image_size)
    ref = reference_for(ecfg, weights, reference, out_root)
    features = image_features(str(shards_dir), weights, metrics_device(ecfg), ecfg.feature_batch_size,
                              f"features of {shards_dir.parent.name}")
    m = fidelity_metrics(features, ref, ecfg.prc_neighborhood, ecfg.isc_splits)
    classifier = ecfg.feature_extractor == "classifier"
    if classifier:
        m.update(class_accuracy(features[ISC_LAYER], features[LABELS]))
    if ecfg.bootstrap:
        m.update(bootstrap_metrics(features, ref, ecfg.bootstrap, ecfg.seed, class_acc=classifier))
    return {f"eval/{k}": v for k, v in m.items()}


def evaluate_setting(prep: Prepared, s: SamplingConfig, workers: Workers) -> SettingResult:
    out = prep.out_root / setting_name(s)
    shards_dir = out / "samples"
    records, reused = sample_setting(prep, s, shards_dir, workers)
    metrics = infer_metrics(records, prep.plan.num_samples)
    npz = out / "samples.npz"
    if prep.cfg.eval.write_npz and not npz.is_file():
        write_images_npz(str(npz), iter_images(str(shards_dir)), prep.plan.num_samples, prep.image_size)
    write_grid(shards_dir, prep.plan, prep.cfg.eval, out / "grid.png")
    ecfg = prep.cfg.eval
    if ecfg.metrics and ecfg.use_gpu and ecfg.num_workers > 0:  # Inception on a GPU worker: the driver may have none
        metrics.update(workers.call(quality_metrics, ecfg, prep.image_size, prep.out_root, shards_dir))
    elif ecfg.metrics:
        metrics.update(quality_metrics(ecfg, prep.image_size, prep.out_root, shards_dir, (prep.weights, prep.reference)))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, sort_keys=True) + "\n")
    return SettingResult(s, out, metrics, reused_shards=reused)


# -- tracking ------------------------------------------------------------------------------

def setting_params(prep: Prepared, s: SamplingConfig) -> dict:
    """The `eval.*` params of one setting: everything its numbers depend on."""
    ecfg, plan = prep.cfg.eval, prep.plan
    params = {"eval.checkpoint": prep.checkpoint, "eval.cfg": s.cfg, "eval.top_k": s.top_k, "eval.top_p": s.top_p,
              "eval.seed": s.seed, "eval.num_per_class": plan.num_per_class, "eval.num_samples": plan.num_samples,
              "eval.classes": "all" if not ecfg.classes else ",".join(map(str, plan.classes)),
              "eval.batch_size": plan.batch_size, "eval.attention": prep.model_cfg.attention,
              "eval.window_size": prep.model_cfg.window_size}
    if ecfg.metrics:
        params.update({"eval.reference": prep.reference.source if hasattr(prep.reference, "source")
                       else prep.reference.location,
                       "eval.feature_extractor": prep.weights.extractor,
                       "eval.feature_extractor_sha256": prep.weights.sha256[:16],
                       "eval.prc_neighborhood": ecfg.prc_neighborhood, "eval.isc_splits": ecfg.isc_splits})
    return params


def provenance(ecfg: EvalConfig, workers: Workers) -> dict[str, str]:
    """`mvar.eval_device_type|_model|_count`, `mvar.eval_torch_version` ...: what sampled, told by a sampling
    worker itself (the driver of a Ray job may have no GPU). Prefixed: an evaluation may log into its
    training run, whose `mvar.device_*` tags are the training's."""
    from mvar.provenance import provenance_tags
    args = (sampling_device(ecfg), max(1, ecfg.num_workers), "mvar.eval_")
    return workers.call(provenance_tags, *args) if ecfg.num_workers > 0 else provenance_tags(*args)


def setting_tags(prep: Prepared, out: Path) -> dict[str, str]:
    tags = {"mvar.eval_samples": str(out), **prep.provenance}
    if prep.cfg.eval.metrics:
        tags["mvar.metrics_comparable"] = "true" if prep.weights.official else "false"
        tags["mvar.feature_extractor_sha256"] = prep.weights.sha256
        # what made the numbers: Inception's (official or stand-in weights) and a classifier's never mix
        tags["mvar.feature_extractor"] = prep.weights.extractor
    return tags


def resolve_runs(prep: Prepared, params: list[dict], names: list[str]) -> tuple[list[str], list[str]]:
    """(run id per setting, the runs this evaluation owns: made by it now or by an earlier attempt)."""
    cfg = prep.cfg
    tags = {"mvar.variant": prep.model_cfg.attention, runs.CHECKPOINT_TAG: prep.checkpoint,
            **({"mvar.model_uri": cfg.model} if cfg.model else {})}
    base, created = runs.base_run(cfg.tracking, cfg.run_id, prep.checkpoint, tags)
    ids = runs.setting_runs(cfg.tracking, base, params, names, tags)
    print(f"MLflow: logging to run(s) {', '.join(ids)} in {cfg.tracking.uri}", flush=True)
    if cfg.eval.metrics:
        runs.log_reference(cfg.tracking, ids, cfg.eval.reference)
    owned = sorted({i for i in ids + ([base] if created else []) if i != cfg.run_id})
    return ids, owned


def log_result(prep: Prepared, result: SettingResult) -> None:
    artifacts = [(result.out / "grid.png", f"eval/{setting_name(result.setting)}"),
                 (result.out / "metrics.json", f"eval/{setting_name(result.setting)}")]
    runs.log_setting(prep.cfg.tracking, result.run_id, result.params, setting_tags(prep, result.out),
                     result.metrics, prep.step, artifacts, finish=result.run_id != prep.cfg.run_id)


def evaluate(cfg: EvaluateConfig) -> list[SettingResult]:
    """Check, then sample and measure every setting; log each to its MLflow run."""
    from mvar import tracking
    prep = prepare(cfg)
    if cfg.track:
        cfg.tracking.uri = tracking.resolve_uri(cfg.tracking.uri)
    settings = cfg.eval.settings(prep.sampling)
    params = [setting_params(prep, s) for s in settings]
    run_ids, owned = resolve_runs(prep, params, [setting_name(s) for s in settings]) if cfg.track \
        else ([""] * len(settings), [])
    results = []
    try:
        with Workers(cfg.eval) as workers:
            if cfg.track:
                prep.provenance = provenance(cfg.eval, workers)
            for s, p, run_id in zip(settings, params, run_ids):
                result = evaluate_setting(prep, s, workers)
                result.params, result.run_id = p, run_id
                if run_id:
                    log_result(prep, result)
                print(f"{setting_name(s)}: " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(result.metrics.items()))
                      + f" -> {result.out}", flush=True)
                results.append(result)
    except BaseException:
        runs.terminate(cfg.tracking, owned, "FAILED")  # a rerun of the command picks them up again
        raise
    runs.terminate(cfg.tracking, owned, "FINISHED")
    return results


# -- one checkpoint of a training run ------------------------------------------------------

def reference_statistics(ecfg: EvalConfig, checkpoint: str, cache: Path) -> str:
    """A `make-ref` file of ``ecfg.reference`` for the checkpoint's image size and classes: the reference itself
    when it is one, else its statistics computed once into ``cache`` (each checkpoint of a run loads them)."""
    from mvar.metrics.fidelity import Reference, cache_name
    tok_cfg = read_tokenizer_config(checkpoint)
    model_cfg = model_config(read_checkpoint_meta(checkpoint), {}, tok_cfg, checkpoint)
    weights, reference = prepare_reference(ecfg, tok_cfg.image_size, model_cfg.num_classes)
    if isinstance(reference, Reference):
        return ecfg.reference
    reference_for(ecfg, weights, reference, cache)  # computed unless cached already
    return str(cache / cache_name(reference.location, weights.sha256))


def evaluate_checkpoint(ecfg: EvalConfig, checkpoint: str) -> SettingResult:
    """One setting of ``checkpoint`` sampled and measured in this process, untracked, under ``ecfg.out_dir`` (a
    training run's evaluation of its checkpoints: `mvar.training.checkpoint_eval`); its sample shards are
    removed once measured (the grid and metrics.json stay)."""
    import shutil
    prep = prepare(EvaluateConfig(checkpoint=checkpoint, track=False, eval=ecfg))
    [setting] = ecfg.settings(prep.sampling)
    with Workers(ecfg) as workers:
        result = evaluate_setting(prep, setting, workers)
    shutil.rmtree(result.out / "samples", ignore_errors=True)
    return result
