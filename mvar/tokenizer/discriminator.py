"""The adversarial part of the tokenizer's loss: a patch discriminator, the hinge loss, VQGAN's adaptive weight.

    disc = PatchDiscriminator(cfg.gan)
    g_loss, info = generator_adv_loss(disc, recon, rec_loss, vae.decoder.conv_out.weight, cfg.gan, step)
    total = rec_loss + ... + g_loss                      # 0 (and no discriminator pass) before gan.start_step
    d_loss = discriminator_loss(disc, img, recon.detach(), cfg.gan, step)   # its own optimizer step

The discriminator scores overlapping patches (PatchGAN, pix2pix): stride-2 4x4 convolutions with
LeakyReLU(0.2), then a stride-1 layer and a 1-channel logit map. GroupNorm rather than BatchNorm, so
a rank's logits do not depend on the other images of its batch and ranks need no synchronised
statistics. The adaptive weight (Esser et al. 2021, VQGAN) balances the two losses by the ratio of
their gradient norms at the decoder's last layer. Torch only.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from mvar.tokenizer.training import GanConfig


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=min(32, channels // 4), num_channels=channels, eps=1e-6)


class PatchDiscriminator(nn.Module):
    """Image in [-1, 1] (B, 3, H, W) -> real/fake logits (B, 1, h, w), one per overlapping patch."""

    def __init__(self, cfg: GanConfig, in_channels: int = 3):
        super().__init__()
        widths = [cfg.channels * min(2 ** n, 8) for n in range(cfg.num_layers + 1)]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 4, 2, 1), nn.LeakyReLU(0.2)]
        for n in range(1, cfg.num_layers + 1):
            stride = 2 if n < cfg.num_layers else 1  # the last feature layer keeps the resolution
            layers += [nn.Conv2d(widths[n - 1], widths[n], 4, stride, 1, bias=False), _norm(widths[n]),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)
        for m in self.modules():  # pix2pix's init: small normal weights, unit-mean norms
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.GroupNorm):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(img_B3HW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Discriminator hinge loss: 0 once real logits are >= 1 and fake ones <= -1 (mean of the two terms)."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Generator side of the hinge GAN: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    max_weight: float = 1e4) -> torch.Tensor:
    """|d rec / d last_layer| / (|d g / d last_layer| + 1e-4), clamped to [0, max_weight], detached."""
    g_rec = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_gan = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (g_rec.norm() / (g_gan.norm() + 1e-4)).clamp(0, max_weight).detach()


def generator_adv_loss(disc: nn.Module, recon_B3HW: torch.Tensor, rec_loss: torch.Tensor, last_layer: torch.Tensor,
                       cfg: GanConfig, step: int) -> tuple[torch.Tensor, dict[str, float]]:
    """(weighted adversarial loss for the tokenizer, metrics). Zero, without a discriminator pass, while
    ``cfg.weight_at(step)`` is 0. ``rec_loss`` is the reconstruction loss the adaptive weight balances."""
    w = cfg.weight_at(step)
    if w == 0:
        return recon_B3HW.new_zeros(()), {"gan/weight": 0.0}
    g_loss = hinge_g_loss(disc(recon_B3HW))
    lam = adaptive_weight(rec_loss, g_loss, last_layer, cfg.adaptive_max) if cfg.adaptive \
        else g_loss.new_ones(())
    return w * lam * g_loss, {"gan/weight": w, "gan/adaptive": lam.item(), "gan/g_loss": g_loss.item()}


def discriminator_loss(disc: nn.Module, real_B3HW: torch.Tensor, fake_B3HW: torch.Tensor, cfg: GanConfig,
                       step: int) -> torch.Tensor | None:
    """Hinge loss of the discriminator on real images and (detached) reconstructions; None before the
    adversarial loss starts (the discriminator does not train then)."""
    if cfg.weight_at(step) == 0:
        return None
    logits = disc(torch.cat([real_B3HW, fake_B3HW.detach()]))  # one pass for both halves
    B = real_B3HW.shape[0]
    return hinge_d_loss(logits[:B], logits[B:])
