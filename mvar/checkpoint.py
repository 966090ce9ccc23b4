"""This project's checkpoint format (VAR's released weights come in through ``mvar.var_weights``).

A model checkpoint is a directory:
    checkpoint.yaml   format version, model config, model name, tokenizer fingerprint, provenance
    model.pt          generator state dict (VAR's key names)
    tokenizer/        a tokenizer checkpoint: tokenizer.yaml (config, sha256 of the weights) + tokenizer.pt
Directories are written under a temporary name beside the final one (``.NAME.partial-XXXX``),
fsynced and renamed when complete (``staged_dir``), so a half-written checkpoint is never found
under the final name; a full disk is a ``DiskFull`` naming the directory, with nothing left of it.
A training checkpoint adds ``train_state.pt``; ``check_train_checkpoint`` tells whether one is
complete enough to resume from, without loading its tensors.

This module holds the one reader of each of these files (``read_checkpoint_meta``,
``read_tokenizer_meta``, ``load_state_dict``, ``load_train_state``): a truncated, garbage or
hand-edited file is a UserError naming it, and the tokenizer's weights must match the sha256 its
tokenizer.yaml records (checked on every load and fingerprint).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml

from mvar.config import ConfigError, from_dict, to_dict
from mvar.errors import DiskFull, UserError
from mvar.files import (check_torch_file, disk_full, file_sha256, free_bytes, fsync_path, fsync_tree, human_bytes,
                        load_torch, read_mapping, save_torch)
from mvar.models.config import ModelConfig
from mvar.models.transformer import NextScaleTransformer, check_state_dict
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

FORMAT = "mvar-checkpoint/1"
TOKENIZER_FORMAT = "mvar-tokenizer/1"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a file, tensors only (never unpickles code)."""
    path = Path(path)
    obj = load_torch(path, "weights file")
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]  # a training checkpoint that wraps the state dict
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"weights file '{path}' does not hold a state dict of tensors")
    return obj


def load_into(module: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """load_state_dict with a message that names the file, the first mismatching key and the shapes."""
    try:
        check_state_dict(module, state_dict)
    except ValueError as err:
        raise UserError(f"'{path}' does not fit this {type(module).__name__}: {err}") from err
    module.load_state_dict(state_dict)


PARTIAL_MARK = ".partial-"  # in the name of a directory being written: `.NAME.partial-XXXXXXXX`


def is_partial(name: str) -> bool:
    """A directory that ``staged_dir`` had not finished (its writer was killed)."""
    return name.startswith(".") and PARTIAL_MARK in name


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yields a path beside ``out`` (not created) for the block to write a directory at; when the
    block ends, its files are fsynced and the directory renamed to ``out``. On an error it is removed
    (a full disk becomes a DiskFull naming ``out``); a killed writer leaves it under its partial name,
    which no reader takes for a checkpoint."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"output directory '{out}' exists already; choose another --out or remove it")
    tmp = out.parent / f".{out.name}{PARTIAL_MARK}{uuid.uuid4().hex[:8]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        fsync_path(out.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, DiskFull) or disk_full(err):
            raise DiskFull(f"no space left on the device of '{out.parent}' while writing '{out.name}' "
                           f"({human_bytes(free_bytes(out.parent))} free); nothing of it was kept") from None
        raise


def _write_dir_atomically(out: Path, write, overwrite: bool = False) -> Path:
    with staged_dir(out, overwrite) as tmp:
        tmp.mkdir()
        write(tmp)
    return Path(out)


# -- tokenizer ----------------------------------------------------------------

def _write_tokenizer(dest: Path, model: MultiScaleVQVAE, cfg: TokenizerConfig) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    save_torch(model.state_dict(), dest / "tokenizer.pt")
    meta = {"format": TOKENIZER_FORMAT, "config": to_dict(cfg), "sha256": file_sha256(dest / "tokenizer.pt")}
    (dest / "tokenizer.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))


def save_tokenizer(out: str | Path, model: MultiScaleVQVAE, cfg: TokenizerConfig, overwrite: bool = False) -> Path:
    return _write_dir_atomically(Path(out), lambda tmp: _write_tokenizer(tmp, model, cfg), overwrite)


def tokenizer_dir(path: str | Path) -> Path:
    """The tokenizer directory of a tokenizer checkpoint or of a model checkpoint."""
    path = Path(path)
    for cand in (path, path / "tokenizer"):
        if (cand / "tokenizer.yaml").is_file():
            return cand
    raise UserError(f"'{path}' is not a tokenizer checkpoint (no tokenizer.yaml in it or in {path / 'tokenizer'}); "
                    "make one with `mvar import-var` or the tokenizer training workflow")


def read_tokenizer_meta(path: str | Path) -> tuple[Path, dict]:
    """(tokenizer dir, content of its tokenizer.yaml), checked: format, a config mapping, a sha256."""
    tdir = tokenizer_dir(path)
    meta_file = tdir / "tokenizer.yaml"
    meta = read_mapping(meta_file, "tokenizer file")
    if meta.get("format") != TOKENIZER_FORMAT:
        raise UserError(f"'{meta_file}' has format {meta.get('format')!r}, expected {TOKENIZER_FORMAT!r}")
    if not isinstance(meta.get("config"), dict):
        raise UserError(f"'{meta_file}' has no tokenizer config (a 'config' mapping)")
    if not isinstance(meta.get("sha256"), str):
        raise UserError(f"'{meta_file}' has no sha256 of tokenizer.pt")
    return tdir, meta


def read_tokenizer_config(path: str | Path) -> TokenizerConfig:
    """The TokenizerConfig of a tokenizer or model checkpoint (its tokenizer.yaml)."""
    tdir, meta = read_tokenizer_meta(path)
    return _config_of(TokenizerConfig, meta["config"], tdir / "tokenizer.yaml", "config")


def _config_of(cls, data: dict, meta_file: Path, key: str):
    """The config under ``key`` of a checkpoint record; an error names the file and the key's path in it."""
    try:
        return from_dict(cls, data, f"{key}.")
    except ConfigError as err:
        raise UserError(f"'{meta_file}': {err}") from None


def tokenizer_fingerprint(path: str | Path) -> str:
    """sha256 of the tokenizer weights (token shards and models record it), checked against tokenizer.yaml."""
    tdir, meta = read_tokenizer_meta(path)
    return _verified_sha256(tdir, meta)


def _verified_sha256(tdir: Path, meta: dict) -> str:
    weights = tdir / "tokenizer.pt"
    if not weights.is_file():
        raise UserError(f"tokenizer weights '{weights}' do not exist")
    digest = file_sha256(weights)
    if digest != meta["sha256"]:
        raise UserError(f"'{tdir / 'tokenizer.yaml'}' records sha256 {meta['sha256']} but '{weights}' has "
                        f"sha256 {digest}: the weights or the record were changed after the checkpoint was written")
    return digest


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu") -> tuple[MultiScaleVQVAE, TokenizerConfig]:
    model, cfg, _ = _load_tokenizer(path, device)
    return model, cfg


def _load_tokenizer(path: str | Path, device) -> tuple[MultiScaleVQVAE, TokenizerConfig, str]:
    tdir, meta = read_tokenizer_meta(path)
    cfg = _config_of(TokenizerConfig, meta["config"], tdir / "tokenizer.yaml", "config")
    digest = _verified_sha256(tdir, meta)
    model = MultiScaleVQVAE(cfg)
    load_into(model, load_state_dict(tdir / "tokenizer.pt"), tdir / "tokenizer.pt")
    return model.to(device).eval(), cfg, digest


# -- model checkpoints ----------------------------------------------------------

def save_checkpoint(out: str | Path, model: NextScaleTransformer, tokenizer: MultiScaleVQVAE,
                    tokenizer_cfg: TokenizerConfig, extra: dict | None = None, overwrite: bool = False) -> Path:
    def write(tmp: Path) -> None:
        save_torch(model.state_dict(), tmp / "model.pt")
        _write_tokenizer(tmp / "tokenizer", tokenizer, tokenizer_cfg)
        meta = {"format": FORMAT, "model": to_dict(model.cfg),
                "tokenizer_sha256": file_sha256(tmp / "tokenizer" / "tokenizer.pt"), **(extra or {})}
        (tmp / "checkpoint.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
    return _write_dir_atomically(Path(out), write, overwrite)


def read_checkpoint_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / "checkpoint.yaml"
    if not meta_file.is_file():
        raise UserError(f"'{path}' is not a model checkpoint (no checkpoint.yaml); "
                        "make one with `mvar import-var` or a training run")
    meta = read_mapping(meta_file, "checkpoint file")
    if meta.get("format") != FORMAT:
        raise UserError(f"'{meta_file}' has format {meta.get('format')!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("model"), dict):
        raise UserError(f"'{meta_file}' has no model config (a 'model' mapping)")
    return meta


def read_model_config(path: str | Path, overrides: dict | None = None) -> ModelConfig:
    """The generator config of a model checkpoint (its checkpoint.yaml), with ``overrides`` applied."""
    meta = read_checkpoint_meta(path)
    return _config_of(ModelConfig, {**meta["model"], **(overrides or {})}, Path(path) / "checkpoint.yaml", "model")


TRAIN_STATE = "train_state.pt"  # optimizer, schedule, loss scaler, step and the task's own state


def load_train_state(path: str | Path, mmap: bool = False) -> dict:
    """The optimizer / scheduler / step file (train_state.pt) of a training checkpoint; ``mmap``:
    its tensors mapped, not read (a check)."""
    state = load_torch(path, "train state file", mmap=mmap)
    missing = [k for k in ("optimizer", "scheduler", "step") if not isinstance(state, dict) or k not in state]
    if missing:
        raise UserError(f"train state file '{path}' lacks {', '.join(missing)}: not written by a training run")
    return state


def check_train_checkpoint(ckpt_dir: str | Path) -> int:
    """The step of a training checkpoint that a run can resume from; a UserError naming the first
    missing, truncated or garbage file otherwise. Reads the YAML records and the train state's
    pickle; of the other torch files only their zip directory (their tensors are not loaded)."""
    ckpt_dir = Path(ckpt_dir)
    state = load_train_state(ckpt_dir / TRAIN_STATE, mmap=True)
    for path in sorted(ckpt_dir.rglob("*")):
        if path.suffix == ".pt" and path.name != TRAIN_STATE:
            check_torch_file(path, "weights file")
        elif path.suffix == ".yaml":
            read_mapping(path, "checkpoint file")
    return int(state["step"])


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", overrides: dict | None = None):
    """(generator, tokenizer, model config, tokenizer config); ``overrides`` changes model fields
    that leave the parameters alone (``attention``, ``window_size``, ``attention_backend`` ...)."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    tokenizer, tok_cfg, digest = _load_tokenizer(path, device)
    if meta.get("tokenizer_sha256") and meta["tokenizer_sha256"] != digest:
        raise UserError(f"'{path / 'checkpoint.yaml'}' records tokenizer_sha256 {meta['tokenizer_sha256']} but "
                        f"its tokenizer weights have sha256 {digest}")
    cfg = _config_of(ModelConfig, {**meta["model"], **(overrides or {})}, path / "checkpoint.yaml", "model")
    model = NextScaleTransformer(cfg, tok_cfg.vocab_size, tok_cfg.z_channels, tuple(tok_cfg.patch_nums))
    load_into(model, load_state_dict(path / "model.pt"), path / "model.pt")
    return model.to(device).eval(), tokenizer, cfg, tok_cfg
