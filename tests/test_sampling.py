import pytest
import torch

from mvar.models import NextScaleTransformer, named_model
from mvar.sampling import make_generator, sample_images, sample_tokens, top_k_top_p_candidates
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

TOK = TokenizerConfig.tiny()


def full_vocabulary_filter(logits_BlV: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """The yardstick: the filter sampling used before (and the authors use), masking over the whole
    vocabulary with a full sort for the nucleus. Everything outside top-k and top-p set to -inf."""
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        kth = logits_BlV.topk(top_k, dim=-1).values[..., -1:]
        logits_BlV = logits_BlV.masked_fill(logits_BlV < kth, float("-inf"))
    if top_p > 0:
        sorted_logits, sorted_idx = logits_BlV.sort(dim=-1, descending=False)
        drop_sorted = sorted_logits.softmax(-1).cumsum(-1) <= (1 - top_p)
        drop_sorted[..., -1:] = False
        logits_BlV = logits_BlV.masked_fill(drop_sorted.scatter(-1, sorted_idx, drop_sorted), float("-inf"))
    return logits_BlV


def kept(logits_NV, top_k=0, top_p=0.0):
    """Boolean (N, V): the tokens top_k_top_p_candidates leaves drawable."""
    vals, ids = top_k_top_p_candidates(logits_NV, top_k, top_p)
    if ids is None:
        return vals.isfinite()
    return torch.zeros_like(logits_NV, dtype=torch.bool).scatter(-1, ids, vals.isfinite())


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    assert kept(logits, top_k=2).tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_the_smallest_nucleus_and_always_the_best():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().view(1, 4)
    assert kept(logits, top_p=0.7).tolist() == [[True, True, False, False]]
    assert kept(logits, top_p=0.01).tolist() == [[True, False, False, False]]
    assert kept(logits, top_p=0.99).all()
    assert kept(logits, top_k=3, top_p=0.99).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("top_k, top_p", [(900, 0.96), (50, 0.5), (4096, 0.9), (0, 0.8), (300, 0.0), (1, 0.96)])
def test_candidates_are_the_tokens_the_full_vocabulary_filter_keeps(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4096, generator=gen) * torch.linspace(0.5, 6, 64)[:, None]  # flat to peaked
    expected = full_vocabulary_filter(logits, top_k, top_p).isfinite()
    assert torch.equal(kept(logits, top_k, top_p), expected)


@pytest.mark.parametrize("top_k, top_p", [(20, 0.9), (40, 0.0), (0, 0.7)])
def test_token_frequencies_match_the_full_vocabulary_filter(top_k, top_p):
    """Both samplers, 40,000 draws each over seeds 0..9, against the yardstick's probabilities."""
    logits = torch.randn(1, 1, 64, generator=torch.Generator().manual_seed(3)) * 2
    probs = full_vocabulary_filter(logits, top_k, top_p).softmax(-1).view(-1).double()
    support = probs > 0
    counts = {"candidates": torch.zeros(64), "full vocabulary": torch.zeros(64)}
    for seed in range(10):
        rows = logits.expand(1, 4000, 64)
        counts["candidates"] += torch.bincount(
            sample_tokens(rows, top_k, top_p, torch.Generator().manual_seed(seed)).view(-1), minlength=64)
        yard = full_vocabulary_filter(rows, top_k, top_p).softmax(-1).view(-1, 64)
        counts["full vocabulary"] += torch.bincount(
            torch.multinomial(yard, 1, generator=torch.Generator().manual_seed(seed)).view(-1), minlength=64)
    df = int(support.sum()) - 1
    for name, c in counts.items():
        assert c[~support].sum() == 0, f"{name}: a filtered-out token was drawn"
        expected = probs[support] * c.sum()
        chi2 = float(((c[support].double() - expected) ** 2 / expected).sum())
        assert chi2 < df + 4 * (2 * df) ** 0.5, f"{name}: chi2 {chi2:.1f} with {df} degrees of freedom"
    both = counts["candidates"] + counts["full vocabulary"]  # two-sample homogeneity
    e = both[support].double() / 2
    chi2 = float((2 * (counts["candidates"][support].double() - e) ** 2 / e).sum())
    assert chi2 < df + 4 * (2 * df) ** 0.5


def test_greedy_sampling_is_the_argmax_in_blocks_of_positions(monkeypatch):
    from mvar import sampling

    torch.manual_seed(0)
    gen = NextScaleTransformer(named_model("var-tiny"), TOK.vocab_size, TOK.z_channels, TOK.patch_nums).eval()
    features = torch.randn(6, 16, gen.C)
    with torch.no_grad():
        logits = gen.logits(features)
        expected = ((1 + 0.5) * logits[:3] - 0.5 * logits[3:]).argmax(-1)
        monkeypatch.setattr(sampling, "LOGITS_BLOCK_BYTES", 6 * TOK.vocab_size * 4 * 5)  # 5 positions a block
        picks = sampling.sample_scale(gen, features, 3, 0.5, top_k=1, top_p=0.96, generator=None)
    assert torch.equal(picks, expected)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    tok = MultiScaleVQVAE(TOK).eval()
    gen = NextScaleTransformer(named_model("mvar-tiny"), TOK.vocab_size, TOK.z_channels, TOK.patch_nums).eval()
    with torch.no_grad():
        for p in gen.parameters():
            p.normal_(0, 0.3)  # make sampling depend on the class and the seed
    return gen, tok


def test_seeded_sampling_is_reproducible_and_seed_dependent(models):
    gen, tok = models
    run = lambda seed, labels=torch.tensor([1, 2, 3]): sample_images(  # noqa: E731
        gen, tok, labels, cfg=1.5, top_k=20, top_p=0.9, generator=make_generator(seed, torch.device("cpu")))
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (3, 3, 64, 64) and 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_labels_and_bad_labels(models):
    gen, tok = models
    imgs = sample_images(gen, tok, None, batch_size=5, generator=make_generator(0, torch.device("cpu")))
    assert imgs.shape[0] == 5
    with pytest.raises(ValueError, match="class ids must lie in"):
        sample_images(gen, tok, torch.tensor([10]))
