"""The training tasks' specs (`mvar.training.spec.TaskSpec`): the generator's and the tokenizer's.

    from mvar.training.tasks import task_spec
    spec = task_spec("tokenizer")          # or GENERATOR, TOKENIZER

Each names its task's builder (`loop.build_task`, `tokenizer_loop.build_task`), its checks before any
worker starts, its runs' tags, and what follows the fit: the generator registers its final and best
checkpoints as versions of model ``mvar.model`` (`<variant>-<size>`); the tokenizer writes its final
checkpoint to ``output`` with `save_tokenizer` (the directory `mvar train` (``tokenizer: DIR``) and
`mvar data tokenize --tokenizer DIR` read) and tags its run with it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mvar.data.storage import is_local, local_path
from mvar.errors import UserError
from mvar.models.config import split_name
from mvar.tokenizer import TokenizerConfig
from mvar.training import loop, tokenizer_loop
from mvar.training.config import TrainConfig
from mvar.training.driver import (
    TrainOutcome,
    check_paths_in_job,
    check_shard_sets,
    resolve_epochs,
    storage_location,
)
from mvar.training.checkpoint_eval import CheckpointEvaluator
from mvar.training.spec import TaskSpec
from mvar.training.tokenizer_config import TokenizerTrainConfig

# -- the generator -----------------------------------------------------------------


@dataclass
class Prepared:
    tok_cfg: TokenizerConfig
    tokenizer_sha256: str


def _check_tokenizer(cfg: TrainConfig) -> tuple[TokenizerConfig, str]:
    from mvar.checkpoint import read_tokenizer_config, tokenizer_fingerprint
    tok_cfg = read_tokenizer_config(cfg.tokenizer)
    cfg.check_scales(tuple(tok_cfg.patch_nums))
    return tok_cfg, tokenizer_fingerprint(cfg.tokenizer)


def _check_init_from(cfg: TrainConfig) -> None:
    if not cfg.init_from:
        return
    from mvar.checkpoint import read_model_config
    theirs = read_model_config(cfg.init_from)
    for attr in ("depth", "width", "heads", "num_classes"):
        if getattr(theirs, attr) != getattr(cfg.model, attr):
            raise UserError(f"init_from: '{cfg.init_from}' has {attr} {getattr(theirs, attr)}, "
                            f"this run's model has {getattr(cfg.model, attr)}")


JOB_PATH_KEYS = ("tokenizer", "init_from", "data.shards", "data.eval_shards", "run.storage_path")
CHECKPOINT_EVAL_PATH_KEYS = ("checkpoint_eval.reference", "checkpoint_eval.feature_extractor_weights",
                             "checkpoint_eval.out_dir")


def _in_this_run(key: str, check, *args):
    """``check(*args)``, its UserError (one of `mvar eval`'s checks) naming this run's ``checkpoint_eval.*`` key."""
    import re
    try:
        return check(*args)
    except UserError as err:
        message = re.sub(r"(?<![\w.])eval\.", "checkpoint_eval.", str(err))
        raise UserError(message if "checkpoint_eval." in message else f"checkpoint_eval.{key}: {message}") from None


def _check_checkpoint_eval(cfg: TrainConfig, tok_cfg: TokenizerConfig) -> None:
    """The checkpoints' evaluation (when on): its sample count fits the metrics, its feature extractor and
    reference the model's images and classes (`mvar eval`'s checks), before anything starts."""
    from mvar.evaluation.run import make_plan, prepare_reference
    from mvar.metrics.inception import resolve_weights
    ecfg = cfg.checkpoint_eval
    if not ecfg.every_checkpoint:
        return
    _in_this_run("num_per_class", make_plan, ecfg, cfg.model.num_classes)
    _in_this_run("feature_extractor_weights", resolve_weights, ecfg.feature_extractor_weights, False,
                 ecfg.feature_extractor)
    _in_this_run("reference", prepare_reference, ecfg, tok_cfg.image_size, cfg.model.num_classes)


def prepare(cfg: TrainConfig) -> Prepared:
    """Every check on the generator run's inputs; raises UserError naming the key before anything starts."""
    evaluated = cfg.checkpoint_eval.every_checkpoint
    check_paths_in_job(cfg, JOB_PATH_KEYS + (CHECKPOINT_EVAL_PATH_KEYS if evaluated else ()))
    tok_cfg, sha = _check_tokenizer(cfg)
    samples = check_shard_sets(cfg, cfg.data.kind, tok_cfg.image_size, f"the tokenizer '{cfg.tokenizer}'",
                               image_size=cfg.data.image_size, fingerprint=sha, num_classes=cfg.model.num_classes)
    resolve_epochs(cfg, samples)
    _check_init_from(cfg)
    _check_checkpoint_eval(cfg, tok_cfg)
    return Prepared(tok_cfg=tok_cfg, tokenizer_sha256=sha)


def check_generator(cfg: TrainConfig) -> dict:
    return {"tokenizer_sha256": prepare(cfg).tokenizer_sha256}


def model_tags(cfg: TrainConfig) -> dict[str, str]:
    size = split_name(cfg.model_name)[1] if cfg.model_name else f"d{cfg.model.depth}"
    return {"mvar.variant": cfg.variant, "mvar.model": f"{cfg.variant}-{size}", "mvar.size": size}


def model_name(cfg: TrainConfig) -> str:
    return model_tags(cfg)["mvar.model"]


GENERATOR = TaskSpec(name="generator", config_type=TrainConfig, build_task=loop.build_task, check=check_generator,
                     tags=model_tags, register_as=model_name, evaluator=CheckpointEvaluator.of,
                     best_by=lambda cfg: cfg.checkpoint_eval.best_metric, loadable=True)

# -- the tokenizer -----------------------------------------------------------------

# the tokenizer fields that fix the parameters' shapes: init_from must agree on them
SHAPE_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "share_quant_resi")
TOKENIZER_JOB_PATH_KEYS = ("init_from", "output", "data.shards", "data.eval_shards", "run.storage_path",
                           "losses.perceptual_weights")


def _check_tokenizer_init_from(cfg: TokenizerTrainConfig) -> None:
    from mvar.checkpoint import read_tokenizer_config
    if not cfg.init_from:
        return
    try:
        theirs = read_tokenizer_config(cfg.init_from)
    except UserError as err:
        raise UserError(f"init_from: {err}") from None
    ours = cfg.tokenizer
    for attr in SHAPE_FIELDS:
        a, b = getattr(theirs, attr), getattr(ours, attr)
        if a != b:
            raise UserError(f"init_from: '{cfg.init_from}' has tokenizer.{attr} {a}, this run's tokenizer has {b}")
    if len(theirs.patch_nums) != len(ours.patch_nums):
        raise UserError(f"init_from: '{cfg.init_from}' has {len(theirs.patch_nums)} scales (tokenizer.patch_nums "
                        f"{list(theirs.patch_nums)}), this run's tokenizer has {len(ours.patch_nums)}")


def _check_output(cfg: TokenizerTrainConfig, storage: str) -> None:
    out = cfg.output_dir(storage)
    if not is_local(out):
        raise UserError(f"output: the final tokenizer is written to a local (or shared) path, got '{out}'; "
                        "set output to a directory")
    p = Path(out)
    if p.exists() and not (p / "tokenizer.yaml").is_file() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(f"output: '{out}' exists and is not a tokenizer checkpoint; choose another directory")


def prepare_tokenizer(cfg: TokenizerTrainConfig) -> None:
    """Every check on the tokenizer run's inputs; raises UserError naming the key before anything starts."""
    from mvar.tokenizer.perceptual import load_perceptual
    check_paths_in_job(cfg, TOKENIZER_JOB_PATH_KEYS)
    px = cfg.tokenizer.image_size
    samples = check_shard_sets(cfg, "images", px, "the tokenizer (tokenizer.image_size)",
                               fix=f"; repack with `mvar data pack --image-size {px}` or pick another tokenizer_name")
    resolve_epochs(cfg, samples)
    if cfg.losses.perceptual:
        load_perceptual(cfg.losses.perceptual_weights, cfg.losses.perceptual_layers)  # the file exists and fits
    _check_tokenizer_init_from(cfg)
    _check_output(cfg, storage_location(cfg.run.storage_path))


def check_tokenizer_run(cfg: TokenizerTrainConfig) -> dict:
    prepare_tokenizer(cfg)
    return {}


def tokenizer_tags(cfg: TokenizerTrainConfig) -> dict[str, str]:
    return {"mvar.task": "tokenizer", "mvar.model": f"tokenizer-{cfg.tokenizer_name or 'custom'}"}


@contextlib.contextmanager
def checkpoint_directory(location: str):
    """A local directory holding the checkpoint at ``location`` (a copy, for an object store)."""
    if is_local(location):
        yield Path(local_path(location))
        return
    from pyarrow import fs  # Ray Train's own storage layer: every URI its storage_path takes
    with tempfile.TemporaryDirectory(prefix="mvar-ckpt-") as tmp:
        fs.copy_files(location, tmp)
        yield Path(tmp)


def write_output(cfg: TokenizerTrainConfig, outcome: TrainOutcome, storage: str) -> Path:
    """The final checkpoint's tokenizer -> `output` (replacing an earlier tokenizer there)."""
    from mvar.checkpoint import load_tokenizer, save_tokenizer
    if not outcome.checkpoint:
        raise UserError(f"run '{cfg.run.name}' ended without a checkpoint; nothing to write to output")
    with checkpoint_directory(outcome.checkpoint) as d:
        vae, tok_cfg = load_tokenizer(d)
    out = Path(cfg.output_dir(storage)).resolve()
    return save_tokenizer(out, vae, tok_cfg, overwrite=out.exists())  # the checks refused anything else there


def usage_warning_tag(store, run_id: str) -> dict[str, str]:
    """`mvar.codebook_warning` when the run's last log step had scales below codebook.warn_usage_below
    (the workers printed which); {} when not, or when the run logged no usage."""
    run = store.get(run_id) if run_id else None
    low = int((run.metrics if run else {}).get("tok/low_usage_scales", 0))
    if not low:
        return {}
    print(f"warning: codebook usage is low at {low} scale(s) at the end of the run (tok/usage_s*); "
          "the run is tagged mvar.codebook_warning")
    return {"mvar.codebook_warning": f"{low} scale(s) below codebook.warn_usage_below at the last log step"}


def after_tokenizer_fit(cfg: TokenizerTrainConfig, outcome: TrainOutcome) -> TrainOutcome:
    """The final tokenizer to `output`; the run tagged with it (``mvar.tokenizer``, its sha256)."""
    from mvar import tracking
    from mvar.checkpoint import tokenizer_fingerprint
    out = write_output(cfg, outcome, storage_location(cfg.run.storage_path))
    store = tracking.Store(cfg.tracking.uri)
    tags = {"mvar.tokenizer": str(out), "mvar.tokenizer_sha256": tokenizer_fingerprint(out)}
    store.set_tags(outcome.run_id, {**tags, **usage_warning_tag(store, outcome.run_id)})
    return dataclasses.replace(outcome, output=str(out))


TOKENIZER = TaskSpec(name="tokenizer", config_type=TokenizerTrainConfig, build_task=tokenizer_loop.build_task,
                     check=check_tokenizer_run, tags=tokenizer_tags, after_fit=after_tokenizer_fit,
                     register_as=lambda cfg: tokenizer_tags(cfg)["mvar.model"])  # models:/tokenizer-<name>@final

# -- the registry ------------------------------------------------------------------

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (GENERATOR, TOKENIZER)}


def task_spec(name: str) -> TaskSpec:
    """The spec registered as ``name``; a UserError listing the known ones."""
    if name not in TASKS:
        raise UserError(f"no training task '{name}' (known: {', '.join(sorted(TASKS))})")
    return TASKS[name]

