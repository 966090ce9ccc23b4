"""Training the multi-scale tokenizer: its task for the trainer core.

``TokenizerTask`` plugs into `mvar.training.trainer` (the same loop, optimizer step,
checkpoints and resume as the generator's; `mvar.training.ray_worker` runs it on Ray
Train, with the objective wrapped in DDP). The objective is L1 + L2
reconstruction, the multi-scale VQ loss, and a VGG16 perceptual term when
`losses.perceptual_weight` > 0 (weights from a local file only). Encoder and
decoder run under bf16 autocast on GPU; the quantizer always runs in float32
so that code choice does not depend on the precision.

Collectives besides the core's: DDP's gradient all-reduce, the code histograms at
log steps and the validation sums at checkpoints.

The driver's part of a tokenizer run (its checks, tags, and the final tokenizer
written to `output`) is its spec, `mvar.training.tasks.TOKENIZER`.
"""
from __future__ import annotations

import dataclasses
import logging
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch import nn

from mvar.checkpoint import load_into, load_state_dict, save_tokenizer, tokenizer_dir
from mvar.data import build_eval_loader, build_train_loader
from mvar.tokenizer import MultiScaleVQVAE
from mvar.tokenizer.codebook import (
    CodeUsage,
    init_codebook,
    reset_rows,
    restart_dead_codes,
)
from mvar.tokenizer.discriminator import (
    PatchDiscriminator,
    discriminator_loss,
    generator_adv_loss,
)
from mvar.tokenizer.metrics import code_counts, low_usage, psnr_db, usage_metrics
from mvar.tokenizer.perceptual import VGGPerceptual, load_perceptual
from mvar.training.optim import param_groups, peak_lr
from mvar.training.tokenizer_config import TokenizerLossConfig, TokenizerTrainConfig
from mvar.training.trainer import TrainTask, maybe_ddp, resolve_precision

log = logging.getLogger(__name__)

LOSS_KEYS = ("loss", "recon_l1", "recon_l2", "vq_loss", "perceptual")


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
        rec = w.l1_weight * l1 + w.l2_weight * l2
        perceptual = rec.new_zeros(())
        if self.perceptual is not None and w.perceptual_weight > 0:
            with self._autocast(dev):
                perceptual = self.perceptual(recon, img_B3HW)
            rec = rec + w.perceptual_weight * perceptual
        # rec: what the GAN's adaptive weight balances; features: what codebook restarts re-seed from
        return {"loss": rec + w.vq_weight * vq, "recon_l1": l1, "recon_l2": l2, "vq_loss": vq,
                "perceptual": perceptual, "indices": indices, "rec_loss": rec, "recon": recon,
                "features": f_BChw.detach().float()}


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


def build_gan(cfg: TokenizerTrainConfig, device: torch.device):
    """(discriminator, its Adam) with ``gan.weight`` > 0, else (None, None); the same weights on every rank."""
    if not cfg.gan.enabled:
        return None, None
    torch.manual_seed(cfg.run.seed + 1)
    disc = PatchDiscriminator(cfg.gan).to(device)
    lr = cfg.gan.lr or peak_lr(cfg.optim, cfg.data.batch_size * max(1, cfg.scaling.num_workers))
    return disc, torch.optim.Adam(disc.parameters(), lr=lr, betas=tuple(cfg.gan.betas))


class TokenizerTask(TrainTask):
    """The autoencoder's reconstruction + VQ (+ perceptual, + adversarial) objective on image batches,
    with the codebook's upkeep: initialised from the first batches' residuals before step 0 (not on
    resume: the codebook is in the checkpoint), dead codes re-seeded every ``codebook.restart_every``
    steps in ``after_step``. The discriminator and its optimizer are the task's state."""

    def __init__(self, cfg: TokenizerTrainConfig, objective: TokenizerObjective, device: torch.device,
                 rank: int = 0, world: int = 1):
        self.cfg, self.objective, self.forward = cfg, objective, objective
        self.vae = self.module = objective.vae
        self.device, self.rank, self.world = device, rank, world
        self.last_indices: list[torch.Tensor] = []
        S, V = len(cfg.tokenizer.patch_nums), cfg.tokenizer.vocab_size
        self.restart_usage = CodeUsage(S, V, device)  # hits since the last restart check
        self.log_usage = CodeUsage(S, V, device)      # hits since the last log step
        self.restarts, self.inits = 0, 0
        self.optimizer: torch.optim.Optimizer | None = None
        self.last_features: torch.Tensor | None = None
        self.disc, self.disc_opt = build_gan(cfg, device)
        self.disc_forward = self.disc
        self.fake: tuple[torch.Tensor, torch.Tensor] | None = None  # (real, recon) for the discriminator's step
        self.gan_metrics: dict[str, float] = {}

    def param_groups(self) -> list[dict]:
        return param_groups(self.vae.named_parameters(), self.cfg.optim.no_decay_keys)

    def attach_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer  # a restarted code's Adam moments are zeroed (reset_rows)

    def distribute(self) -> None:
        # scales that share a phi leave the other phis unused (fewer scales than share_quant_resi)
        q = self.vae.quantize
        self.forward = maybe_ddp(self.objective, len(set(q.phi_of_scale)) < len(q.quant_resi.qresi_ls))
        if self.disc is not None:
            self.disc_forward = maybe_ddp(self.disc)

    @torch.no_grad()
    def init_codebook(self, x_B3HW: torch.Tensor) -> None:
        """Codes from the encoder features of this rank's first ``codebook.init_batches`` batches (step 0's
        ``x_B3HW``, then the ones after it in the rank's shard order), rank 0's copied to every rank."""
        cb = self.cfg.codebook
        if cb.init == "none" or self.cfg.init_from:
            return
        batches_ = [x_B3HW]
        if cb.init_batches > 1:
            loader = build_train_loader(dataclasses.replace(self.cfg.data, num_workers=0), self.rank, self.world)
            loader.set_epoch(0)
            batches_ += [b[0].to(self.device) for b in islice(loader, 1, cb.init_batches)]
        f_BChw = torch.cat([self.vae.img_to_features(x).float() for x in batches_])
        init_codebook(self.vae.quantize, f_BChw, cb)
        self.inits += 1
        if self.rank == 0:
            log.info("codebook: %s init from the residuals of %d images", cb.init, f_BChw.shape[0])

    def loss(self, batch, step: int):
        x = batch[0].to(self.device, non_blocking=True)
        if step == 0:  # a resumed run starts later: its codebook is the checkpoint's
            self.init_codebook(x)
        out = self.forward(x)
        self.last_indices, self.last_features = out["indices"], out["features"]
        self.restart_usage.add(out["indices"])
        self.log_usage.add(out["indices"])
        keys = [k for k in LOSS_KEYS if k != "perceptual" or self.cfg.losses.perceptual]
        metrics = {f"train/{k}": out[k].detach() for k in keys}
        total = out["loss"]
        if self.disc is not None:
            total = total + self.adversarial(x, out, step, metrics)
            metrics["train/loss"] = total.detach()
        return total, metrics

    def adversarial(self, x: torch.Tensor, out: dict, step: int, metrics: dict) -> torch.Tensor:
        """The tokenizer's weighted GAN term (0 before gan.start_step); keeps (real, recon) for the
        discriminator's own step in ``after_step``."""
        self.disc.requires_grad_(False)  # this term trains the tokenizer only
        g, info = generator_adv_loss(self.disc, out["recon"], out["rec_loss"],
                                     self.vae.decoder.conv_out.weight, self.cfg.gan, step)
        self.disc.requires_grad_(True)
        metrics.update(info)
        self.fake = (x, out["recon"].detach()) if info["gan/weight"] > 0 else None
        return g

    def after_step(self, step: int, outcome) -> None:
        if self.fake is not None:
            d_loss = discriminator_loss(self.disc_forward, *self.fake, self.cfg.gan, step)
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()
            self.gan_metrics = {"gan/d_loss": d_loss.item()}
            self.fake = None
        if self.cfg.codebook.restart_due(step + 1):
            self.restart(step + 1)

    def restart(self, done: int) -> None:
        """Re-seed the codes no scale used enough since the last check (every rank; rank 0 decides)."""
        q = self.vae.quantize
        rows = restart_dead_codes(q, self.last_features, self.restart_usage.window(), self.cfg.codebook, step=done)
        if rows.numel() and self.optimizer is not None:
            reset_rows(self.optimizer, q.embedding.weight, rows)
        self.restarts += rows.numel()

    def interval_metrics(self) -> dict[str, float]:
        out = usage(code_hits(self.last_indices, self.cfg.tokenizer.vocab_size), "train")  # all-reduce
        counts_SV = self.log_usage.window()  # all-reduce
        out.update(usage_metrics(counts_SV, "tok"))
        out["tok/restarts"] = float(self.restarts)
        out["tok/low_usage_scales"] = float(self.warn_low_usage(counts_SV, "training batches"))
        return {**out, **self.gan_metrics}

    def warn_low_usage(self, counts_SV: torch.Tensor, what: str) -> int:
        """The warning line (rank 0) for scales below ``codebook.warn_usage_below``; how many there are."""
        low = low_usage(counts_SV, self.cfg.codebook.warn_usage_below)
        if low and self.rank == 0:
            log.warning("codebook usage low on the %s: %s", what, "; ".join(low))
        return len(low)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Reconstruction through the discrete path that `tokenize` and sampling use (indices -> image):
        L1, L2, PSNR (`tok/val_psnr`) and per-scale usage/perplexity (`tok/val_usage_s{k}` ...)."""
        if not self.cfg.data.eval_shards:
            return {}
        loader = build_eval_loader(self.cfg.data, self.rank, self.world)
        self.vae.eval()
        V = self.cfg.tokenizer.vocab_size
        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # on the device: NCCL has no CPU tensors
        hits = torch.zeros(2, V, device=self.device)
        counts_SV = torch.zeros(len(self.cfg.tokenizer.patch_nums), V, device=self.device)
        for x, _, _ in loader:  # ranks may differ by one batch: no collective inside this loop
            x = x.to(self.device, non_blocking=True)
            idx = self.vae.img_to_idx(x)
            recon = self.vae.idx_to_img(idx).float()
            err = (recon - x).double()
            sums += torch.stack([err.abs().mean((1, 2, 3)).sum(), err.square().mean((1, 2, 3)).sum(),
                                 psnr_db(recon, x).double().sum(), err.new_tensor(x.shape[0])])
            hits += code_hits(idx, V)
            counts_SV += code_counts(idx, V).to(counts_SV)
        if dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(counts_SV)
        self.vae.train()
        n = sums[3].clamp(min=1)
        per_scale = {k.replace("tok/", "tok/val_"): v for k, v in usage_metrics(counts_SV, "tok").items()}
        self.warn_low_usage(counts_SV, "held-out set")
        return {"val/recon_l1": (sums[0] / n).item(), "val/recon_l2": (sums[1] / n).item(),
                "tok/val_psnr": (sums[2] / n).item(), **per_scale, **usage(hits, "val")}

    def state(self) -> dict:
        out = {"restarts": self.restarts, "restart_hits": self.restart_usage.hits_SV.cpu()}
        if self.disc is not None:
            out.update(disc=self.disc.state_dict(), disc_opt=self.disc_opt.state_dict())
        return out

    def load_state(self, state: dict) -> None:
        self.restarts = int(state.get("restarts", 0))
        if "restart_hits" in state:
            self.restart_usage.hits_SV.copy_(state["restart_hits"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    def save_weights(self, out: Path, meta: dict) -> Path:
        """A tokenizer checkpoint directory (what `load_tokenizer` reads) plus train.yaml."""
        save_tokenizer(out, self.vae, self.cfg.tokenizer)
        (out / "train.yaml").write_text(yaml.safe_dump(meta, sort_keys=False))
        return out

    def load_weights(self, ckpt_dir: Path) -> None:
        load_into(self.vae, load_state_dict(ckpt_dir / "tokenizer.pt"), ckpt_dir / "tokenizer.pt")


def build_task(cfg: TokenizerTrainConfig, device: torch.device, rank: int, world: int) -> TokenizerTask:
    return TokenizerTask(cfg, build_objective(cfg, device), device, rank, world)
