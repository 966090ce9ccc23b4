"""The tokenizer: encoder -> multi-scale residual VQ -> decoder."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvar.tokenizer.autoencoder import Decoder, Encoder
from mvar.tokenizer.config import TokenizerConfig
from mvar.tokenizer.quantizer import MultiScaleQuantizer


@dataclass
class TokenizerLosses:
    total: torch.Tensor
    recon_l1: torch.Tensor
    recon_l2: torch.Tensor
    vq: torch.Tensor
    recon: torch.Tensor  # (B,3,H,W), unclamped


class MultiScaleVQVAE(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.cfg = cfg
        self.Cvae, self.vocab_size = cfg.z_channels, cfg.vocab_size
        self.patch_nums = tuple(cfg.patch_nums)
        arch = dict(ch=cfg.ch, ch_mult=tuple(cfg.ch_mult), num_res_blocks=cfg.num_res_blocks,
                    z_channels=cfg.z_channels, dropout=cfg.dropout, norm_groups=cfg.norm_groups)
        self.encoder = Encoder(**arch)
        self.decoder = Decoder(**arch)
        self.quantize = MultiScaleQuantizer(cfg.vocab_size, cfg.z_channels, self.patch_nums,
                                            num_phi=cfg.share_quant_resi, resi_ratio=cfg.quant_resi, beta=cfg.beta,
                                            znorm=cfg.znorm)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, 3, 1, 1)

    # -- encoding ---------------------------------------------------------
    def img_to_features(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] -> f = quant_conv(encoder(img)), (B, Cvae, h, w)."""
        return self.quant_conv(self.encoder(img_B3HW))

    @torch.no_grad()
    def img_to_idx(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Image in [-1, 1] -> code indices of every scale, each (B, pn*pn)."""
        return self.quantize.f_to_idx(self.img_to_features(img_B3HW))

    # -- decoding ---------------------------------------------------------
    def fhat_to_img(self, f_hat_BChw: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(f_hat_BChw)).clamp(-1, 1)

    def idx_to_img(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Code indices of all scales -> image in [-1, 1]."""
        return self.fhat_to_img(self.quantize.idx_to_fhat(idx_list))

    def idx_to_teacher_input(self, idx_list: list[torch.Tensor]) -> torch.Tensor:
        """Teacher-forcing input of the generator for scales 2..K, (B, L - first_l, Cvae)."""
        return self.quantize.idx_to_teacher_input(idx_list)

    def split_flat_idx(self, idx_BL: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) concatenated indices -> list of (B, pn*pn)."""
        return list(idx_BL.split([pn * pn for pn in self.patch_nums], dim=1))

    # -- training ---------------------------------------------------------
    def forward(self, img_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reconstruction (unclamped), VQ loss) with a straight-through quantizer."""
        f_hat, vq_loss, _ = self.quantize(self.img_to_features(img_B3HW))
        return self.decoder(self.post_quant_conv(f_hat)), vq_loss

    def losses(self, img_B3HW: torch.Tensor, l1_weight: float = 1.0, l2_weight: float = 1.0,
               vq_weight: float = 1.0) -> TokenizerLosses:
        """Reconstruction (L1 + L2) and VQ losses; a perceptual term is added by the trainer."""
        recon, vq = self(img_B3HW)
        l1 = F.l1_loss(recon, img_B3HW)
        l2 = F.mse_loss(recon, img_B3HW)
        total = l1_weight * l1 + l2_weight * l2 + vq_weight * vq
        return TokenizerLosses(total=total, recon_l1=l1, recon_l2=l2, vq=vq, recon=recon)
