import pytest
import torch

from mvar.config import from_dict
from mvar.tokenizer import TOKENIZER_SIZES, MultiScaleVQVAE, TokenizerConfig, phi_index_map
from mvar.tokenizer.quantizer import phi_anchors


def test_phi_map_of_ten_scales_settles_the_exact_ties_like_var():
    # scales 2 and 7 lie exactly between two anchors; VAR's float64 argmin gives this map
    assert phi_index_map(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert phi_anchors(4)[0] == 1 / 12 and phi_anchors(4)[-1] == 11 / 12
    assert phi_anchors(3) == pytest.approx([1 / 6, 1 / 2, 5 / 6])
    assert phi_index_map(4, 4) == [0, 1, 2, 3]
    assert phi_index_map(6, 1) == [0] * 6


def test_named_sizes_are_valid_and_default_is_the_released_model():
    for name, cfg in TOKENIZER_SIZES.items():
        from_dict(TokenizerConfig, {k: v for k, v in vars(cfg).items()})
    cfg = TokenizerConfig()
    assert (cfg.vocab_size, cfg.z_channels, cfg.ch, cfg.num_tokens) == (4096, 32, 160, 680)


def test_quickstart_tokenizer_has_token_maps_where_a_window_matters():
    cfg = TokenizerConfig.named("vae-quick")
    cfg.validate()
    assert cfg.downsample == 8 and cfg.latent_size == 8 and cfg.vocab_size >= 256
    assert len(cfg.patch_nums) >= 7 and cfg.patch_nums[-2:] == (6, 8)
    model = MultiScaleVQVAE(cfg)
    groups = {m.num_groups for m in model.modules() if isinstance(m, torch.nn.GroupNorm)}
    assert groups == {8}


@pytest.mark.parametrize("name", ["vae-tiny", "vae-tiny32", "vae-quick"])
def test_encode_decode_shapes_and_index_ranges(name):
    cfg = TokenizerConfig.named(name)
    model = MultiScaleVQVAE(cfg).eval()
    img = torch.rand(2, 3, cfg.image_size, cfg.image_size) * 2 - 1
    idx = model.img_to_idx(img)
    assert [t.shape for t in idx] == [(2, pn * pn) for pn in cfg.patch_nums]
    assert all(t.min() >= 0 and t.max() < cfg.vocab_size for t in idx)
    teacher = model.idx_to_teacher_input(idx)
    assert teacher.shape == (2, cfg.num_tokens - 1, cfg.z_channels)
    rec = model.idx_to_img(idx)
    assert rec.shape == img.shape and rec.abs().max() <= 1
    flat = torch.cat(idx, dim=1)
    assert all(torch.equal(a, b) for a, b in zip(model.split_flat_idx(flat), idx))


def test_training_losses_have_gradients_everywhere_that_learns():
    cfg = TokenizerConfig.named("vae-tiny32")
    model = MultiScaleVQVAE(cfg).train()
    img = torch.rand(2, 3, 32, 32) * 2 - 1
    losses = model.losses(img)
    assert losses.total.isfinite() and losses.vq > 0 and losses.recon_l1 > 0
    losses.total.backward()
    for name in ("encoder.conv_in.weight", "decoder.conv_out.weight", "quantize.embedding.weight",
                 "quantize.quant_resi.qresi_ls.0.weight", "quant_conv.weight", "post_quant_conv.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_straight_through_output_equals_quantized_value():
    cfg = TokenizerConfig.named("vae-tiny32")
    model = MultiScaleVQVAE(cfg).eval()
    img = torch.rand(1, 3, 32, 32) * 2 - 1
    f = model.img_to_features(img)
    f_hat_st, _, idx = model.quantize(f)
    torch.testing.assert_close(f_hat_st, model.quantize.idx_to_fhat(idx), atol=1e-5, rtol=0)
