"""The authors' VAR and MVAR outputs for tiny random models, reproduced tensor by tensor.

Reads MVAR_REFERENCE_DIR (default: ../shared/conformance/reference_tiny). Tolerances from
its README: features and logits 1e-4 absolute, images 1e-3.
"""
import pytest
import torch

from mvar.config import from_dict
from mvar.models import ModelConfig, NextScaleTransformer
from mvar.sampling import make_generator, sample_images
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

FEATURE_TOL, IMAGE_TOL = 1e-4, 1e-3


def tokenizer_from(ref_config, ref_dir) -> MultiScaleVQVAE:
    v = ref_config["vqvae"]
    pns = v["v_patch_nums"]
    cfg = from_dict(TokenizerConfig, dict(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"],
                                          share_quant_resi=v["share_quant_resi"], patch_nums=pns,
                                          image_size=pns[-1] * 16))
    model = MultiScaleVQVAE(cfg).eval()
    model.load_state_dict(torch.load(ref_dir / "vqvae_state_dict.pt", weights_only=True))
    return model


def generator_from(ref_config, ref_dir, attention: str) -> NextScaleTransformer:
    g, m = ref_config["var"], ref_config["mvar"]
    cfg = from_dict(ModelConfig, dict(
        attention=attention, depth=g["depth"], embed_dim=g["embed_dim"], num_heads=g["num_heads"],
        mlp_ratio=g["mlp_ratio"], norm_eps=g["norm_eps"], attn_l2_norm=g["attn_l2_norm"],
        num_classes=g["num_classes"], cond_drop_rate=0.0, drop_path_rate=g["drop_path_rate"],
        window_size=m["kernel_size"], markov_from_scale=m["markov_from_scale"], attention_backend="reference"))
    v = ref_config["vqvae"]
    model = NextScaleTransformer(cfg, v["vocab_size"], v["z_channels"], tuple(g["patch_nums"])).eval()
    model.load_official_state_dict(torch.load(ref_dir / "var_state_dict.pt", weights_only=True))
    return model


@pytest.fixture(scope="module")
def tokenizer(ref_config, ref_dir):
    return tokenizer_from(ref_config, ref_dir)


def close(actual, expected, tol, what):
    assert actual.shape == expected.shape, what
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol}"


def test_tokenizer_features_indices_teacher_input_reconstruction(tokenizer, ref_expected):
    img = ref_expected["inputs.img"]
    with torch.no_grad():
        close(tokenizer.img_to_features(img), ref_expected["vae.f"], FEATURE_TOL, "vae.f")
        idx = tokenizer.img_to_idx(img)
        for s, idx_Bl in enumerate(idx):
            assert torch.equal(idx_Bl, ref_expected[f"vae.idx.{s}"]), f"vae.idx.{s}"
        close(tokenizer.idx_to_teacher_input(idx), ref_expected["vae.var_input"], FEATURE_TOL, "vae.var_input")
        close(tokenizer.idx_to_img(idx), ref_expected["vae.recon"], IMAGE_TOL, "vae.recon")


@pytest.mark.parametrize("attention, prefix", [("var", "var"), ("mvar", "mvar")])
def test_teacher_forced_logits(attention, prefix, ref_config, ref_dir, ref_expected):
    model = generator_from(ref_config, ref_dir, attention)
    with torch.no_grad():
        logits = model(ref_expected["inputs.labels"], ref_expected["vae.var_input"])
    close(logits, ref_expected[f"{prefix}.logits"], FEATURE_TOL, f"{prefix}.logits")


@pytest.mark.parametrize("attention, prefix", [("var", "var"), ("mvar", "mvar")])
def test_greedy_samples(attention, prefix, tokenizer, ref_config, ref_dir, ref_expected):
    model = generator_from(ref_config, ref_dir, attention)
    infer = ref_config["infer"]
    labels = ref_expected["inputs.labels"][: infer["batch"]]
    imgs = sample_images(model, tokenizer, labels, cfg=infer["cfg"], top_k=infer["top_k"], top_p=infer["top_p"],
                         generator=make_generator(infer.get("g_seed", 0), torch.device("cpu")))
    close(imgs, ref_expected[f"{prefix}.greedy_samples"], IMAGE_TOL, f"{prefix}.greedy_samples")


def test_mvar_differs_from_var_where_the_masks_differ(ref_config, ref_dir, ref_expected):
    # guards against a test that passes because both patterns silently run the same mask
    assert (ref_expected["var.logits"] - ref_expected["mvar.logits"]).abs().max() > 1e-3
