"""The authors' VAR and MVAR outputs for tiny random models, reproduced tensor by tensor.

Reads MVAR_REFERENCE_DIR (default: ../shared/conformance/reference_tiny). Tolerances from
its README: features and logits 1e-4 absolute, images 1e-3; training steps 1e-5 relative
(lr, loss, gradient norm per step) and 1e-5 absolute (the weights after the last step).
"""
import pytest
import torch

from mvar.config import from_dict
from mvar.models import ModelConfig, NextScaleTransformer
from mvar.models.transformer import OFFICIAL_DERIVED_BUFFERS
from mvar.sampling import make_generator, sample_images
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig
from mvar.training.config import TrainConfig
from mvar.training.loop import GeneratorTask
from mvar.training.trainer import Hooks, Trainer

FEATURE_TOL, IMAGE_TOL = 1e-4, 1e-3
STEP_REL_TOL, WEIGHT_TOL = 1e-5, 1e-5
# the authors' lr schedule names -> optim.hold_ratio (lin0 holds the peak for 5 % of the decay, lin00 not at all)
HOLD_OF_SCHEDULE = {"lin0": 0.05, "lin00": 0.0}


def tokenizer_from(ref_config, ref_dir) -> MultiScaleVQVAE:
    v = ref_config["vqvae"]
    pns = v["v_patch_nums"]
    cfg = from_dict(TokenizerConfig, dict(vocab_size=v["vocab_size"], z_channels=v["z_channels"], ch=v["ch"],
                                          share_quant_resi=v["share_quant_resi"], patch_nums=pns,
                                          image_size=pns[-1] * 16))
    model = MultiScaleVQVAE(cfg).eval()
    model.load_state_dict(torch.load(ref_dir / "vqvae_state_dict.pt", weights_only=True))
    return model


def model_keys(ref_config, attention: str) -> dict:
    """The set's generator as the project's `model.*` keys."""
    g, m = ref_config["var"], ref_config["mvar"]
    return dict(attention=attention, depth=g["depth"], embed_dim=g["embed_dim"], num_heads=g["num_heads"],
                mlp_ratio=g["mlp_ratio"], norm_eps=g["norm_eps"], attn_l2_norm=g["attn_l2_norm"],
                num_classes=g["num_classes"], cond_drop_rate=g.get("cond_drop_rate", 0.0),
                drop_rate=g.get("drop_rate", 0.0), attn_drop_rate=g.get("attn_drop_rate", 0.0),
                drop_path_rate=g["drop_path_rate"], window_size=m["kernel_size"],
                markov_from_scale=m["markov_from_scale"], attention_backend="reference")


def build_generator(ref_config, cfg: ModelConfig, state_dict: dict) -> NextScaleTransformer:
    v = ref_config["vqvae"]
    model = NextScaleTransformer(cfg, v["vocab_size"], v["z_channels"], tuple(ref_config["var"]["patch_nums"]))
    model.load_official_state_dict(state_dict)
    return model


def generator_from(ref_config, ref_dir, attention: str) -> NextScaleTransformer:
    cfg = from_dict(ModelConfig, {**model_keys(ref_config, attention), "cond_drop_rate": 0.0})
    return build_generator(ref_config, cfg, torch.load(ref_dir / "var_state_dict.pt", weights_only=True)).eval()


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


# -- training: the authors' trainers, step by step -------------------------------------------

def train_config(ref_config, ref_dir, variant: str) -> TrainConfig:
    """The run's `hyper` (the authors' names) as this project's own config keys."""
    hyper = ref_config["train"][variant]["hyper"]
    if hyper["sche"] not in HOLD_OF_SCHEDULE:
        pytest.fail(f"train.{variant}.hyper.sche '{hyper['sche']}': no optim.hold_ratio for it "
                    f"(known: {', '.join(HOLD_OF_SCHEDULE)})")
    iters = hyper["iters"]
    return from_dict(TrainConfig, {
        "model": model_keys(ref_config, variant),
        # the batches come from the set's tensors (below), not from shards: these only name where
        "tokenizer": str(ref_dir), "data": {"shards": str(ref_dir / f"train_{variant}.pt"),
                                            "batch_size": hyper["batch"]},
        "optim": {"lr": hyper["tlr"], "weight_decay": hyper["twd"], "weight_decay_end": None,
                  "warmup_steps": round(hyper["wp"]), "warmup_start_ratio": hyper["wp0"],
                  "end_ratio": hyper["wpe"], "hold_ratio": HOLD_OF_SCHEDULE[hyper["sche"]],
                  "grad_clip": hyper["tclip"]},
        "train": {"scale_schedule": "auto", "cycle_ratio": hyper.get("ratio_k", 8), "precision": "fp32"},
        "run": {"steps": iters, "seed": hyper.get("seed", 0), "log_every": iters, "checkpoint_every": iters},
    })


class Record(Hooks):
    """What the reference holds per step: the lr used, the plain token-mean loss, the grad norm."""

    def __init__(self):
        self.lr, self.loss_mean, self.grad_norm = [], [], []

    def on_step(self, step, outcome, metrics):
        self.lr.append(outcome.lr)
        self.loss_mean.append(float(metrics["train/loss"]))
        self.grad_norm.append(outcome.grad_norm.item())


def assert_rel_close(actual: list[float], expected: torch.Tensor, what: str) -> None:
    actual_t = torch.tensor(actual, dtype=torch.float64)
    assert actual_t.shape == expected.shape, what
    err = ((actual_t - expected.double()).abs() / expected.double().abs().clamp(min=1e-30)).max().item()
    assert err <= STEP_REL_TOL, f"{what}: max relative error {err:.3g} > {STEP_REL_TOL}"


@pytest.mark.parametrize("variant", ["var", "mvar"])
def test_train_steps_match_the_authors_trainer(variant, tokenizer, ref_config, ref_dir):
    ref = torch.load(ref_dir / f"train_{variant}.pt", weights_only=True)
    expected = ref_config["train"][variant]
    cfg = train_config(ref_config, ref_dir, variant)
    initial = {k.removeprefix("initial."): v for k, v in ref.items() if k.startswith("initial.")}
    model = build_generator(ref_config, cfg.model, initial).train()
    task = GeneratorTask(cfg, model, tokenizer, torch.device("cpu"))
    trainer = Trainer(task, cfg, torch.device("cpu"))
    # the project's own cycle and parameter groups are the authors'
    assert [list(task.scales(i)) for i in range(cfg.run.steps)] == expected["scales_per_step"]
    names = {id(p): n for n, p in model.named_parameters()}
    undecayed = sorted(names[id(p)] for g in trainer.optimizer.param_groups if g["wd_scale"] == 0 for p in g["params"])
    assert undecayed == sorted(expected["no_weight_decay"])
    record = Record()
    batches = iter(zip(ref["inputs.tokens"], ref["inputs.labels"]))
    assert trainer.run(batches, 0, record) == {"status": "completed", "step": cfg.run.steps}
    assert_rel_close(record.lr, ref["per_step.lr"], "per_step.lr")
    assert_rel_close(record.loss_mean, ref["per_step.loss_mean"], "per_step.loss_mean")
    assert_rel_close(record.grad_norm, ref["per_step.grad_norm"], "per_step.grad_norm")
    final = {k.removeprefix("final."): v for k, v in ref.items() if k.startswith("final.")}
    own = model.state_dict()
    assert set(own) == set(final) - set(OFFICIAL_DERIVED_BUFFERS)
    for key, value in own.items():
        close(value, final[key], WEIGHT_TOL, f"final.{key}")
