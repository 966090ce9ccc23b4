"""Every check on a study's input, run before any trial starts; errors name the study-file key.

- the base config loads with the study's and the command line's overrides, and its inputs
  (tokenizer, shards, init_from) pass the training pre-flight checks;
- every search-space key is a key of that config, and every value of it loads and validates
  (all combinations when there are at most MAX_COMBINATIONS, else each value alone), including
  the checks that need the tokenizer's scales (a window larger than its scale);
- every objective is logged by the trials' runs: `val/loss` needs data.eval_shards, `eval/*`
  needs the evaluation's metrics, which need a reference and Inception weights that load.
"""
from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass
from typing import Any

from mvar.config import ConfigError, check, flatten, from_dict
from mvar.errors import UserError
from mvar.evaluation.config import EvalConfig, EvaluateConfig
from mvar.training.config import TrainConfig, load_train_config
from sweeps.study import StudyConfig, override

MAX_COMBINATIONS = 512


@dataclass
class Preflight:
    """What the checks resolved, for the trials to use."""

    base: TrainConfig          # the base config with the common overrides
    overrides: list[str]       # the study's overrides, then the command line's: every trial's first overrides
    patch_nums: tuple[int, ...]
    eval_cfg: EvalConfig | None
    weights: object = None     # FeatureWeights of the evaluation's metrics
    reference: object = None   # Reference (a make-ref file) or ImageSet (statistics still to compute)


def common_overrides(study: StudyConfig, cli: list[str]) -> list[str]:
    return [override(k, v) for k, v in study.overrides.items()] + list(cli)


def load_base(study: StudyConfig, overrides: list[str]) -> TrainConfig:
    try:
        return load_train_config(study.base_config, overrides)
    except ConfigError as err:
        raise ConfigError(f"base_config '{study.base_config}' with the study's overrides: {err}") from None


def preflight(study: StudyConfig, cli_overrides: list[str]) -> Preflight:
    """All checks; raises ConfigError or UserError before anything runs."""
    from mvar.training.launch import prepare
    check(not any(item.partition("=")[0].strip() == "run.repeats" for item in cli_overrides), "run.repeats",
          "a study sets it for every trial with its own key: study.repeats=N (training seeds per trial)")
    overrides = common_overrides(study, cli_overrides)
    base = load_base(study, overrides)
    check_space(study, overrides)
    check_objectives(study, base)
    prep = prepare(base)  # the base config's inputs: tokenizer, shards, init_from
    patch_nums = tuple(prep.tok_cfg.patch_nums)
    check_space(study, overrides, patch_nums)
    out = Preflight(base, overrides, patch_nums, None)
    if study.needs_eval:
        out.eval_cfg, out.weights, out.reference = check_eval(study, base, prep.tok_cfg.image_size)
    return out


def points(space: dict[str, Any]) -> list[dict[str, Any]]:
    """Search-space points to try: every combination of the values (a range's ends), or each value alone."""
    values = {k: v if isinstance(v, list) else [v["low"], v["high"]] for k, v in space.items()}
    if math.prod(len(v) for v in values.values()) <= MAX_COMBINATIONS:
        return [dict(zip(values, combo)) for combo in itertools.product(*values.values())]
    return [{k: v} for k, vs in values.items() for v in vs]


def check_space(study: StudyConfig, overrides: list[str], patch_nums: tuple[int, ...] | None = None) -> None:
    """Every key exists in the base config; every point loads, validates (and fits the tokenizer's scales)."""
    known = flatten(load_base(study, overrides))
    for key in study.search_space:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"search_space.{key}: not a key of the training config '{study.base_config}'{hint}")
    for point in points(study.search_space):
        try:
            cfg = load_train_config(study.base_config, overrides + [override(k, v) for k, v in point.items()])
            if patch_nums:
                cfg.check_scales(patch_nums)
        except ConfigError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in point.items())
            raise ConfigError(f"search_space: the trial with {where} would not run: {err}") from None


def check_objectives(study: StudyConfig, base: TrainConfig) -> None:
    if "val/loss" in study.objectives:
        check(bool(base.data.eval_shards), "objectives.val/loss",
              "is logged only when the base config sets data.eval_shards (add it under overrides)")
    if study.pruner.name != "none":
        check(bool(base.data.eval_shards), "pruner.name",
              "prunes on val/loss, which is logged only when the base config sets data.eval_shards")


def eval_config(study: StudyConfig) -> EvalConfig:
    """The trials' EvalConfig; errors name `eval.<key>`."""
    return from_dict(EvaluateConfig, {"checkpoint": "<each trial's final checkpoint>", "track": False,
                                      "eval": study.eval}).eval


def check_eval(study: StudyConfig, base: TrainConfig, image_size: int) -> tuple[EvalConfig, Any, Any]:
    """The evaluation each trial runs: one setting, enough samples, a reference and weights that load."""
    from mvar.evaluation.run import make_plan, prepare_reference
    ecfg = eval_config(study)
    quality = [n for n in study.objectives if n.startswith("eval/")]
    check(ecfg.metrics or not quality, "eval.metrics", f"must stay true for the objectives {quality}")
    check(len(ecfg.settings()) == 1, "eval.cfg",
          "a trial is evaluated at one setting: give one value each of eval.cfg, eval.top_k, eval.top_p")
    make_plan(ecfg, base.model.num_classes)
    if not ecfg.metrics:
        return ecfg, None, None
    try:
        weights, reference = prepare_reference(ecfg, image_size)
    except UserError as err:
        if "eval." in str(err):
            raise
        raise UserError(f"eval.reference / eval.feature_extractor_weights: {err}") from None
    return ecfg, weights, reference
