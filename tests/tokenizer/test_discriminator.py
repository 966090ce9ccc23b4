"""The adversarial loss: off before its start step, on (and balanced by the adaptive weight) after it;
the hinge loss is 0 for a discriminator that is sure, and training lowers it."""
from __future__ import annotations

import pytest
import torch

from mvar.config import ConfigError
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.tokenizer.discriminator import (
    PatchDiscriminator,
    discriminator_loss,
    generator_adv_loss,
    hinge_d_loss,
    hinge_g_loss,
)
from mvar.tokenizer.training import GanConfig

SMALL = TokenizerConfig(image_size=32, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2, 2),
                        num_res_blocks=1, patch_nums=(1, 2, 3, 4))


class CountingDisc(PatchDiscriminator):
    calls = 0

    def forward(self, img_B3HW):
        CountingDisc.calls += 1
        return super().forward(img_B3HW)


def test_gan_weight_is_zero_before_its_start_step_and_positive_after():
    cfg = GanConfig(weight=0.5, start_step=100)
    assert [cfg.weight_at(s) for s in (0, 99)] == [0.0, 0.0]
    assert cfg.weight_at(100) == cfg.weight_at(5000) == 0.5
    ramp = GanConfig(weight=0.5, start_step=100, ramp_steps=10)
    assert ramp.weight_at(99) == 0 and ramp.weight_at(100) == pytest.approx(0.05) and ramp.weight_at(109) == 0.5
    assert GanConfig().weight_at(10 ** 6) == 0.0  # weight 0: off for good


def test_generator_loss_turns_on_at_the_start_step_with_an_adaptive_weight():
    torch.manual_seed(0)
    vae = MultiScaleVQVAE(SMALL)
    cfg = GanConfig(weight=0.8, start_step=3, channels=16, num_layers=2)
    disc = CountingDisc(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    recon, vq = vae(x)
    rec_loss = (recon - x).abs().mean()
    last = vae.decoder.conv_out.weight
    CountingDisc.calls = 0
    off, info = generator_adv_loss(disc, recon, rec_loss, last, cfg, step=2)
    assert off.item() == 0 and info["gan/weight"] == 0 and CountingDisc.calls == 0
    assert discriminator_loss(disc, x, recon, cfg, step=2) is None and CountingDisc.calls == 0
    on, info = generator_adv_loss(disc, recon, rec_loss, last, cfg, step=3)
    assert CountingDisc.calls == 1 and info["gan/weight"] == 0.8 and info["gan/adaptive"] > 0
    assert on.item() == pytest.approx(0.8 * info["gan/adaptive"] * info["gan/g_loss"], rel=1e-5)
    # the adaptive weight makes the adversarial gradient at the decoder's last layer as large as the
    # reconstruction's (times gan.weight)
    g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0].norm()
    g_adv = torch.autograd.grad(on, last, retain_graph=True)[0].norm()
    assert g_adv.item() == pytest.approx(0.8 * g_rec.item(), rel=1e-2)
    d_loss = discriminator_loss(disc, x, recon, cfg, step=3)
    assert d_loss is not None and d_loss.item() > 0
    d_loss.backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert last.grad is None  # the discriminator's loss sees detached reconstructions


def test_hinge_losses_are_zero_for_a_confident_discriminator_and_training_lowers_them():
    assert hinge_d_loss(torch.full((4, 1, 3, 3), 1.5), torch.full((4, 1, 3, 3), -2.0)).item() == 0
    assert hinge_d_loss(torch.zeros(4, 1, 3, 3), torch.zeros(4, 1, 3, 3)).item() == pytest.approx(1.0)
    assert hinge_g_loss(torch.full((2, 1, 2, 2), 3.0)).item() == -3.0
    torch.manual_seed(0)
    cfg = GanConfig(weight=1.0, channels=16, num_layers=2)
    disc = PatchDiscriminator(cfg)
    assert disc(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 6, 6)  # one logit per overlapping patch
    real = torch.linspace(-1, 1, 32).view(1, 1, 1, 32).expand(8, 3, 32, 32)  # smooth ramps
    fake = torch.rand(8, 3, 32, 32) * 2 - 1                                   # noise
    opt = torch.optim.Adam(disc.parameters(), lr=2e-3, betas=cfg.betas)
    first = None
    for _ in range(20):
        loss = discriminator_loss(disc, real, fake, cfg, step=0)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_gan_config_names_the_bad_key():
    with pytest.raises(ConfigError, match="gan.num_layers"):
        GanConfig(num_layers=0).validate("gan.")
    with pytest.raises(ConfigError, match="gan.weight"):
        GanConfig(weight=-1).validate("gan.")
