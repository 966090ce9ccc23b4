"""Training the multi-scale tokenizer: its task for the trainer core, and the driver around it.

``TokenizerTask`` plugs into `mvar.training.trainer` (the same loop, optimizer step,
checkpoints and resume as the generator's; `mvar.training.ray_worker` runs it on Ray
Train, with the objective wrapped in DDP). The objective is L1 + L2
reconstruction, the multi-scale VQ loss, and a VGG16 perceptual term when
`losses.perceptual_weight` > 0 (weights from a local file only). Encoder and
decoder run under bf16 autocast on GPU; the quantizer always runs in float32
so that code choice does not depend on the precision.

Collectives besides the core's: DDP's gradient all-reduce, the code histograms at
log steps and the validation sums at checkpoints.

The driver (`train_tokenizer`) checks every input before Ray starts, runs
`mvar.training.launch.launch`, then writes the final tokenizer checkpoint to
`output` with `save_tokenizer`: the directory `train` (`tokenizer: DIR`) and
`mvar data tokenize --tokenizer DIR` read.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from mvar.checkpoint import (
    load_into,
    load_state_dict,
    load_tokenizer,
    read_tokenizer_config,
    save_tokenizer,
    tokenizer_dir,
)
from mvar.data import build_eval_loader
from mvar.data.storage import is_local
from mvar.errors import UserError
from mvar.tokenizer import MultiScaleVQVAE
from mvar.tokenizer.perceptual import VGGPerceptual, load_perceptual
from mvar.training.launch import (
    TrainOutcome,
    check_paths_in_job,
    launch,
    resolve_epochs,
    storage_location,
)
from mvar.training.optim import param_groups
from mvar.training.tokenizer_config import TokenizerLossConfig, TokenizerTrainConfig
from mvar.training.trainer import TrainTask, maybe_ddp, resolve_precision

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "recon_l1", "recon_l2", "vq_loss", "perceptual")
# the tokenizer fields that fix the parameters' shapes: init_from must agree on them
SHAPE_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "share_quant_resi")


class TokenizerObjective(nn.Module):
    """What DDP wraps: the tokenizer (trained) and the frozen perceptual net; forward -> loss terms."""

    def __init__(self, vae: MultiScaleVQVAE, weights: TokenizerLossConfig, perceptual: VGGPerceptual | None,
                 bf16: bool = False):
        super().__init__()
        self.vae, self.weights, self.perceptual, self.bf16 = vae, weights, perceptual, bf16

    def _autocast(self, device_type: str):
        return torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16)

    def forward(self, img_B3HW: torch.Tensor) -> dict:
        """{'loss', 'recon_l1', 'recon_l2', 'vq_loss', 'perceptual' (scalars), 'indices' (per scale (B, pn*pn))}."""
        vae, w, dev = self.vae, self.weights, img_B3HW.device.type
        with self._autocast(dev):
            f_BChw = vae.img_to_features(img_B3HW)
        f_hat, vq, indices = vae.quantize(f_BChw.float())  # float32: code choice must not depend on precision
        with self._autocast(dev):
            recon = vae.decoder(vae.post_quant_conv(f_hat)).float()
        l1, l2 = F.l1_loss(recon, img_B3HW), F.mse_loss(recon, img_B3HW)
        total = w.l1_weight * l1 + w.l2_weight * l2 + w.vq_weight * vq
        perceptual = total.new_zeros(())
        if self.perceptual is not None and w.perceptual_weight > 0:
            with self._autocast(dev):
                perceptual = self.perceptual(recon, img_B3HW)
            total = total + w.perceptual_weight * perceptual
        return {"loss": total, "recon_l1": l1, "recon_l2": l2, "vq_loss": vq, "perceptual": perceptual,
                "indices": indices}


def code_hits(indices: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """(2, V) code counts: all scales, last scale."""
    every = torch.cat([i.flatten() for i in indices])
    return torch.stack([torch.bincount(every, minlength=vocab_size),
                        torch.bincount(indices[-1].flatten(), minlength=vocab_size)]).float()


def usage(hits_2V: torch.Tensor, prefix: str) -> dict[str, float]:
    """Fraction of the codebook used, summed over ranks (one all-reduce of 2 x V counts)."""
    if dist.is_initialized():
        dist.all_reduce(hits_2V)
    used = hits_2V.gt(0).float().mean(1).tolist()
    return {f"{prefix}/codebook_usage": used[0], f"{prefix}/codebook_usage_last": used[1]}


def build_objective(cfg: TokenizerTrainConfig, device: torch.device) -> TokenizerObjective:
    torch.manual_seed(cfg.run.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    vae = MultiScaleVQVAE(cfg.tokenizer)
    if cfg.init_from:
        path = tokenizer_dir(cfg.init_from) / "tokenizer.pt"
        load_into(vae, load_state_dict(path), path)
    perceptual = None
    if cfg.losses.perceptual:
        perceptual = load_perceptual(cfg.losses.perceptual_weights, cfg.losses.perceptual_layers)
    bf16 = resolve_precision(cfg.train.precision, device) == "bf16"
    return TokenizerObjective(vae, cfg.losses, perceptual, bf16).to(device)


class TokenizerTask(TrainTask):
    """The autoencoder's reconstruction + VQ (+ perceptual) objective on image batches.

    A later GAN loss or codebook upkeep fits here: a second optimizer in ``state``/``load_state``
    and its step in ``after_step``."""

    def __init__(self, cfg: TokenizerTrainConfig, objective: TokenizerObjective, device: torch.device,
                 rank: int = 0, world: int = 1):
        self.cfg, self.objective, self.forward = cfg, objective, objective
        self.vae = self.module = objective.vae
        self.device, self.rank, self.world = device, rank, world
        self.last_indices: list[torch.Tensor] = []

    def param_groups(self) -> list[dict]:
        return param_groups(self.vae.named_parameters(), self.cfg.optim.no_decay_keys)

    def distribute(self) -> None:
        # scales that share a phi leave the other phis unused (fewer scales than share_quant_resi)
        q = self.vae.quantize
        self.forward = maybe_ddp(self.objective, len(set(q.phi_of_scale)) < len(q.quant_resi.qresi_ls))

    def loss(self, batch, step: int):
        out = self.forward(batch[0].to(self.device, non_blocking=True))
        self.last_indices = out["indices"]
        keys = [k for k in LOSS_KEYS if k != "perceptual" or self.cfg.losses.perceptual]
        return out["loss"], {f"train/{k}": out[k].detach() for k in keys}

    def interval_metrics(self) -> dict[str, float]:
        return usage(code_hits(self.last_indices, self.cfg.tokenizer.vocab_size), "train")  # all-reduce

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Reconstruction through the discrete path that `tokenize` and sampling use (indices -> image)."""
        if not self.cfg.data.eval_shards:
            return {}
        loader = build_eval_loader(self.cfg.data, self.rank, self.world)
        self.vae.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # on the device: NCCL has no CPU tensors
        hits = torch.zeros(2, self.cfg.tokenizer.vocab_size, device=self.device)
        for x, _, _ in loader:  # ranks may differ by one batch: no collective inside this loop
            x = x.to(self.device, non_blocking=True)
            idx = self.vae.img_to_idx(x)
            err = (self.vae.idx_to_img(idx).float() - x).double()
            sums += torch.stack([err.abs().mean((1, 2, 3)).sum(), err.square().mean((1, 2, 3)).sum(),
                                 err.new_tensor(x.shape[0])])
            hits += code_hits(idx, self.cfg.tokenizer.vocab_size)
        if dist.is_initialized():
            dist.all_reduce(sums)
        self.vae.train()
        n = sums[2].clamp(min=1)
        return {"val/recon_l1": (sums[0] / n).item(), "val/recon_l2": (sums[1] / n).item(), **usage(hits, "val")}

    def save_weights(self, out: Path, meta: dict) -> Path:
        """A tokenizer checkpoint directory (what `load_tokenizer` reads) plus train.yaml."""
        save_tokenizer(out, self.vae, self.cfg.tokenizer)
        (out / "train.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        return out

    def load_weights(self, ckpt_dir: Path) -> None:
        load_into(self.vae, load_state_dict(ckpt_dir / "tokenizer.pt"), ckpt_dir / "tokenizer.pt")


def build_task(cfg: TokenizerTrainConfig, device: torch.device, rank: int, world: int) -> TokenizerTask:
    return TokenizerTask(cfg, build_objective(cfg, device), device, rank, world)


def train_worker(config: dict) -> dict:
    """Ray Train's train_loop_per_worker. Returns {'status': 'completed' | 'nonfinite', 'step': ...}."""
    from mvar.training.ray_worker import run_worker
    return run_worker(config, TokenizerTrainConfig, build_task)


# -- the driver -------------------------------------------------------------------

def _check_shards(cfg: TokenizerTrainConfig) -> int:
    """Both image shard sets against the tokenizer; returns the training set's sample count."""
    from mvar.data.loader import open_shard_set
    samples = 0
    for key, location in (("data.shards", cfg.data.shards), ("data.eval_shards", cfg.data.eval_shards)):
        if not location:
            continue
        try:
            manifest = open_shard_set(location, "images")
        except UserError as err:
            raise UserError(f"{key}: {err}") from None
        if manifest.image_size != cfg.tokenizer.image_size:
            raise UserError(f"{key}: '{location}' holds {manifest.image_size} px images but the tokenizer takes "
                            f"{cfg.tokenizer.image_size} px (tokenizer.image_size); repack with "
                            f"`mvar data pack --image-size {cfg.tokenizer.image_size}` or pick another tokenizer_name")
        if key == "data.shards":
            samples = manifest.num_samples
    return samples


def _check_init_from(cfg: TokenizerTrainConfig) -> None:
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


JOB_PATH_KEYS = ("init_from", "output", "data.shards", "data.eval_shards", "run.storage_path",
                 "losses.perceptual_weights")


def _check_output(cfg: TokenizerTrainConfig, storage: str) -> None:
    out = cfg.output_dir(storage)
    if not is_local(out):
        raise UserError(f"output: the final tokenizer is written to a local (or shared) path, got '{out}'; "
                        "set output to a directory")
    p = Path(out)
    if p.exists() and not (p / "tokenizer.yaml").is_file() and (not p.is_dir() or any(p.iterdir())):
        raise UserError(f"output: '{out}' exists and is not a tokenizer checkpoint; choose another directory")


def prepare(cfg: TokenizerTrainConfig) -> None:
    """Every check on the run's inputs; raises UserError naming the key before anything starts."""
    check_paths_in_job(cfg, JOB_PATH_KEYS)
    resolve_epochs(cfg, _check_shards(cfg))
    if cfg.losses.perceptual:
        load_perceptual(cfg.losses.perceptual_weights, cfg.losses.perceptual_layers)  # the file exists and fits
    _check_init_from(cfg)
    _check_output(cfg, storage_location(cfg.run.storage_path))


def write_output(cfg: TokenizerTrainConfig, outcome: TrainOutcome, storage: str) -> Path:
    """The final Ray checkpoint's tokenizer -> `output` (replacing an earlier tokenizer there)."""
    from ray.train import Checkpoint
    if not outcome.checkpoint:
        raise UserError(f"run '{cfg.run.name}' ended without a checkpoint; nothing to write to output")
    with Checkpoint(outcome.checkpoint).as_directory() as d:
        vae, tok_cfg = load_tokenizer(d)
    out = Path(cfg.output_dir(storage)).resolve()
    return save_tokenizer(out, vae, tok_cfg, overwrite=out.exists())  # prepare() refused anything else there


def train_tokenizer(cfg: TokenizerTrainConfig) -> tuple[TrainOutcome, Path]:
    """Check every input, train with Ray Train, write the tokenizer to `output`; (outcome, output dir)."""
    from mvar import tracking
    from mvar.checkpoint import tokenizer_fingerprint
    prepare(cfg)
    tags = {"mvar.task": "tokenizer", "mvar.model": f"tokenizer-{cfg.tokenizer_name or 'custom'}"}
    outcome = launch(cfg, train_worker, {}, tags)
    out = write_output(cfg, outcome, storage_location(cfg.run.storage_path))
    tracking.Store(cfg.tracking.uri).set_tags(outcome.run_id, {"mvar.tokenizer": str(out),
                                                              "mvar.tokenizer_sha256": tokenizer_fingerprint(out)})
    return outcome, out
