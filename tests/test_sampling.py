import pytest
import torch

from mvar.models import NextScaleTransformer, named_model
from mvar.sampling import filter_top_k_top_p, make_generator, sample_images
from mvar.tokenizer import MultiScaleVQVAE, TokenizerConfig

TOK = TokenizerConfig.tiny()


def test_top_k_keeps_the_k_largest():
    logits = torch.tensor([[[1.0, 5.0, 3.0, 4.0, 2.0]]])
    kept = filter_top_k_top_p(logits, top_k=2).isfinite()
    assert kept.tolist() == [[[False, True, False, True, False]]]


def test_top_p_keeps_the_smallest_nucleus_and_always_the_best():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().view(1, 1, 4)
    assert filter_top_k_top_p(logits, top_p=0.7).isfinite().tolist() == [[[True, True, False, False]]]
    assert filter_top_k_top_p(logits, top_p=0.01).isfinite().tolist() == [[[True, False, False, False]]]
    assert filter_top_k_top_p(logits, top_p=0.99).isfinite().all()


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
