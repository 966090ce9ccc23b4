import pytest
import torch

from mvar.models import NextScaleTransformer, named_model
from mvar.models.schedule import markov_cycle, next_scale_loss, scales_for_step
from mvar.sampling import generate
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

TOK = TokenizerConfig.tiny()


def build(variant: str, **kw) -> NextScaleTransformer:
    cfg = named_model(f"{variant}-tiny", cond_drop_rate=0.0, attention_backend="reference", **kw)
    return NextScaleTransformer(cfg, TOK.vocab_size, TOK.z_channels, TOK.patch_nums).eval()


def randomize(model: NextScaleTransformer) -> NextScaleTransformer:
    """VAR's init keeps residual gates near zero: make every block matter for these tests."""
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def tokenizer():
    return MultiScaleVQVAE(TOK).eval()


def teacher_batch(tokenizer, B=3):
    img = torch.rand(B, 3, TOK.image_size, TOK.image_size) * 2 - 1
    with torch.no_grad():
        idx = tokenizer.img_to_idx(img)
        teacher = tokenizer.idx_to_teacher_input(idx)
    return torch.randint(10, (B,)), torch.cat(idx, 1), teacher


def test_all_patterns_share_parameters_and_load_each_other():
    models = [build(v) for v in ("var", "scale_markov", "mvar")]
    keys = [list(m.state_dict()) for m in models]
    assert keys[0] == keys[1] == keys[2]
    models[2].load_state_dict(models[0].state_dict())


@pytest.mark.parametrize("variant", ["scale_markov", "mvar"])
@pytest.mark.parametrize("scales", [(0, 1), (2,), (3,), (1, 3)])
def test_markov_subsets_equal_the_rows_of_the_full_pass(variant, scales, tokenizer):
    model = randomize(build(variant))
    labels, idx, teacher = teacher_batch(tokenizer)
    with torch.no_grad():
        full = model(labels, teacher)
        part = model(labels, teacher, scales)
    torch.testing.assert_close(part, full[:, model.target_positions(scales, full.device)], atol=1e-5, rtol=1e-5)


def test_var_prefix_equals_rows_of_full_pass_and_rejects_non_prefix(tokenizer):
    model = randomize(build("var"))
    labels, idx, teacher = teacher_batch(tokenizer)
    with torch.no_grad():
        full, prefix = model(labels, teacher), model(labels, teacher, (0, 1, 2))
    torch.testing.assert_close(prefix, full[:, :14], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="prefix"):
        model(labels, teacher, (2,))


def test_patterns_differ_where_the_masks_differ(tokenizer):
    labels, idx, teacher = teacher_batch(tokenizer)
    out = {}
    for variant in ("var", "scale_markov", "mvar"):
        torch.manual_seed(1)
        out[variant] = randomize(build(variant))(labels, teacher).detach()
    assert torch.allclose(out["var"][:, :1], out["scale_markov"][:, :1])  # the start token sees itself only
    assert not torch.allclose(out["var"][:, 1:], out["scale_markov"][:, 1:])
    # dense scales: the same attention, computed as one packed call vs per group (float32 rounding only)
    torch.testing.assert_close(out["scale_markov"][:, :14], out["mvar"][:, :14], atol=2e-5, rtol=1e-5)
    assert not torch.allclose(out["scale_markov"][:, 14 + 9:], out["mvar"][:, 14 + 9:])  # 4x4 map with 3x3 windows


@pytest.mark.parametrize("variant", ["var", "scale_markov", "mvar"])
def test_sampling_passes_agree_with_the_teacher_forced_pass(variant, tokenizer):
    # greedy, no CFG: each sampled token is the argmax of the teacher-forced logits of its own sample
    model = randomize(build(variant))
    labels = torch.tensor([1, 4, 7])
    gen = generate(model, tokenizer.quantize, labels, cfg=0.0, top_k=1, top_p=0.0)
    idx = torch.cat(gen.indices, 1)
    with torch.no_grad():
        logits = model(labels, tokenizer.idx_to_teacher_input(gen.indices))
    assert torch.equal(logits.argmax(-1), idx)
    assert (gen.kv_cache_bytes > 0) == (variant == "var")


def test_kv_cache_size_is_all_keys_and_values_of_all_scales(tokenizer):
    model = build("var")
    gen = generate(model, tokenizer.quantize, torch.tensor([0, 1]), cfg=1.5, top_k=5, top_p=0.9)
    # 2 rows per image with CFG, keys and values, every layer, every token, float32
    assert gen.kv_cache_bytes == 2 * 2 * 2 * model.cfg.depth * model.L * model.C * 4


def test_class_dropout_only_in_training(tokenizer):
    cfg = named_model("mvar-tiny", cond_drop_rate=0.5)
    model = randomize(NextScaleTransformer(cfg, TOK.vocab_size, TOK.z_channels, TOK.patch_nums))
    labels, idx, teacher = teacher_batch(tokenizer, B=16)
    model.eval()
    a, b = model(labels, teacher), model(labels, teacher)
    assert torch.equal(a, b)
    model.train()
    null = model.class_emb.weight[-1]
    torch.manual_seed(0)
    assert not torch.equal(model(labels, teacher), a)
    assert null.shape == (model.C,)


def test_markov_cycle_is_eight_one_one():
    cycle = markov_cycle(10)
    assert cycle[:8] == [tuple(range(8))] * 8 and cycle[8] == (8,) and cycle[9] == (9,)
    steps = [scales_for_step("cycle", 10, s) for s in (0, 7, 8, 9, 10, 18)]
    assert steps == [cycle[0], cycle[0], (8,), (9,), cycle[0], (8,)]
    assert scales_for_step("packed", 4, 3) == (0, 1, 2, 3) == scales_for_step("full", 4, 0)


@pytest.mark.parametrize("num_scales, split, ratio", [(10, 8, 8), (10, 7, 2), (4, 1, 1), (6, 3, 5)])
def test_cycle_dense_steps_then_each_windowed_scale_alone(num_scales, split, ratio):
    period = ratio + num_scales - split
    got = [scales_for_step("cycle", num_scales, step, split, ratio) for step in range(2 * period)]
    assert got[:period] == got[period:]  # it repeats
    assert got[:ratio] == [tuple(range(split))] * ratio
    assert got[ratio:period] == [(s,) for s in range(split, num_scales)]
    assert sorted({s for scales in got for s in scales}) == list(range(num_scales))  # every scale trains


def test_cycle_without_dense_or_windowed_scales_is_refused():
    for split in (0, 4):
        with pytest.raises(ValueError, match="leaves no dense or no windowed scale"):
            markov_cycle(4, split)
    with pytest.raises(ValueError, match="cycle_ratio"):
        markov_cycle(4, 2, 0)


def test_loss_weights_every_token_by_one_over_all_tokens(tokenizer):
    """A step on some scales back-propagates its tokens' share of the full-sequence loss, whose
    value is the plain mean over all tokens; the logged token mean is the step's own mean."""
    model = build("mvar")
    labels, idx, teacher = teacher_batch(tokenizer, B=2)
    full = next_scale_loss(model, labels, idx, teacher)
    torch.testing.assert_close(full.loss, full.token_mean)
    parts = [next_scale_loss(model, labels, idx, teacher, scales) for scales in ((0, 1), (2,), (3,))]
    torch.testing.assert_close(sum(p.loss for p in parts), full.loss)
    last = parts[-1]
    n = TOK.patch_nums[-1] ** 2
    torch.testing.assert_close(last.loss, last.token_mean * n / model.L)
    assert last.per_token_Bl.shape == last.correct_Bl.shape == (2, n)


@pytest.mark.parametrize("variant, schedule", [("var", "full"), ("mvar", "cycle"), ("mvar", "packed")])
def test_a_few_steps_fit_one_batch(variant, schedule, tokenizer):
    torch.manual_seed(0)
    model = build(variant).train()
    labels, idx, teacher = teacher_batch(tokenizer, B=4)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        loss, _, _ = next_scale_loss(model, labels, idx, teacher, scales_for_step(schedule, 4, step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    with torch.no_grad():
        final, _, _ = next_scale_loss(model.eval(), labels, idx, teacher)
    first, _, _ = next_scale_loss(build(variant), labels, idx, teacher)
    assert final < 0.7 * first, (first.item(), final.item())


def test_bad_inputs_fail_with_clear_messages(tokenizer):
    from mvar.config import ConfigError

    model = build("mvar")
    labels, idx, teacher = teacher_batch(tokenizer, B=2)
    with pytest.raises(ValueError, match=r"teacher input must be \(B, 29, 8\), got \(2, 28, 8\)"):
        model(labels, teacher[:, 1:])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\]"):
        model(torch.tensor([3, 11]), teacher)
    with pytest.raises(ValueError, match=r"labels must be \(B,\)"):
        model(torch.tensor([3]), teacher)
    with pytest.raises(ValueError, match="scales must be increasing"):
        model(labels, teacher, (3, 2))
    with pytest.raises(ConfigError, match="'model.window_size': 5 is larger than the first windowed scale"):
        build("mvar", window_size=5)
    with pytest.raises(ConfigError, match="'model.markov_from_scale'"):
        build("mvar", markov_from_scale=4)


def test_weights_of_another_architecture_name_the_first_mismatch():
    model = build("var")
    sd = dict(model.state_dict())
    sd["blocks.1.ffn.fc1.weight"] = torch.zeros(128, 64)
    with pytest.raises(ValueError, match=r"key 'blocks.1.ffn.fc1.weight' has shape \(128, 64\) in the weights, \(256, 64\)"):
        model.load_official_state_dict(sd)
    del sd["blocks.1.ffn.fc1.weight"]
    with pytest.raises(ValueError, match="'blocks.1.ffn.fc1.weight' .* is missing"):
        model.load_official_state_dict(sd)


def test_ffn_without_grad_runs_in_blocks_of_tokens_and_gives_the_same_output(monkeypatch):
    import mvar.models.transformer as transformer

    torch.manual_seed(0)
    ffn = transformer.FFN(16, 64, 0.0)
    x = torch.randn(3, 50, 16)
    calls = []
    monkeypatch.setattr(transformer, "FFN_BLOCK_BYTES", 3 * 64 * 4 * 8)  # 8 tokens a block
    monkeypatch.setattr(ffn, "fc1", _Counting(ffn.fc1, calls))
    with torch.no_grad():
        blocked = ffn(x)
    assert len(calls) == 7 and max(calls) == 8  # ceil(50 / 8) blocks
    calls.clear()
    whole = ffn.mlp(x)  # with grad: one call
    torch.testing.assert_close(blocked, whole.detach(), atol=1e-6, rtol=1e-5)
    assert ffn(x).requires_grad and calls == [50, 50]


class _Counting(torch.nn.Module):
    def __init__(self, inner, calls):
        super().__init__()
        self.inner, self.calls, self.out_features = inner, calls, inner.out_features

    def forward(self, x):
        self.calls.append(x.shape[1])
        return self.inner(x)
