"""Every attention path against an explicit masked softmax."""
import pytest
import torch

from mvar.models.attention import (CPU_AUTO, AttentionSpec, _flex_block_mask, _window_mask_mod, attend, attended_pairs,
                                   brute_force_attention, flex_block_size,
                                   natten_available, resolve_backend, scale_groups, sequence_mask, window_attention,
                                   window_bands, window_mask)

PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def window_by_definition(n: int, k: int) -> torch.Tensor:
    """Clamped k x k windows written out position by position (NATTEN na2d, dilation 1)."""
    mask = torch.zeros(n * n, n * n, dtype=torch.bool)
    start = lambda i: min(max(i - k // 2, 0), max(n - k, 0))  # noqa: E731
    for qi in range(n):
        for qj in range(n):
            for ki in range(start(qi), min(start(qi) + k, n)):
                for kj in range(start(qj), min(start(qj) + k, n)):
                    mask[qi * n + qj, ki * n + kj] = True
    return mask


@pytest.mark.parametrize("n, k", [(13, 7), (16, 7), (16, 3), (10, 9), (5, 7), (4, 3)])
def test_window_mask_matches_the_definition(n, k):
    mask = window_mask(n, k)
    assert torch.equal(mask, window_by_definition(n, k))
    assert int(mask.sum(1).min()) == min(k, n) ** 2  # every query sees exactly k*k keys (clamped, not cut)


def qkv(L, B=2, H=2, d=16, requires_grad=False):
    return [torch.randn(B, H, L, d, requires_grad=requires_grad) for _ in range(3)]


# compiled flex on CPU: its own tests below (each shape is a compile of several seconds)
BACKENDS = ["reference", "banded", pytest.param("natten", marks=pytest.mark.skipif(
    not natten_available(), reason="NATTEN is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("side, k", [(13, 7), (16, 7), (8, 3), (5, 5)])
def test_window_backends_match_brute_force(backend, side, k):
    if backend == "natten" and not torch.cuda.is_available():
        pytest.skip("NATTEN kernels need CUDA here")
    device = "cuda" if backend == "natten" else "cpu"
    q, k_, v = (t.to(device) for t in qkv(side * side))
    expected = brute_force_attention(q, k_, v, window_mask(side, k, device), scale=0.7)
    out = window_attention(q, k_, v, side, k, scale=0.7, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("side, k", [(13, 7), (16, 7), (24, 7), (8, 3), (10, 9), (6, 5)])
def test_banded_window_matches_brute_force_values_and_gradients(side, k):
    q, k_, v = qkv(side * side, requires_grad=True)
    out = window_attention(q, k_, v, side, k, scale=0.7, backend="banded")
    grads = torch.autograd.grad(out.square().sum(), (q, k_, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k_, v))
    expected = brute_force_attention(q2, k2, v2, window_mask(side, k), scale=0.7)
    grads2 = torch.autograd.grad(expected.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, atol=1e-4, rtol=1e-3)


def test_bands_cover_every_query_once_and_attend_fewer_pairs_than_the_map():
    side, k = 32, 7
    bands = window_bands(side, k)
    assert [b[0] for b in bands[1:]] == [b[1] for b in bands[:-1]] and bands[0][0] == 0 and bands[-1][1] == side ** 2
    for q0, q1, k0, k1, mask in bands:
        assert mask.shape == (q1 - q0, k1 - k0) and ((mask == 0).sum(1) == k * k).all()  # each query: its window
    assert sum((q1 - q0) * (k1 - k0) for q0, q1, k0, k1, _ in bands) < 0.5 * side ** 4


def test_auto_on_cpu_follows_the_measured_table_and_never_takes_flex_with_grad():
    cpu = torch.device("cpu")
    for grad, rule in CPU_AUTO.items():
        sides = sorted({lo for lo, _ in rule} | {lo - 1 for lo, _ in rule if lo > 0} | {13, 16, 24, 32, 64})
        for side in sides:
            expected = next(name for lo, name in rule if side >= lo)  # first match wins
            assert resolve_backend("auto", cpu, side, needs_grad=grad) == expected
        assert rule[-1][0] == 0  # every side has a backend
    assert all(name != "flex" for _, name in CPU_AUTO[True])
    assert resolve_backend("reference", cpu, 32) == "reference"
    for grad in (False, True):  # the measured winners (quiet, k 7): banded at 24x24 and 32x32, reference below
        assert [resolve_backend("auto", cpu, s, needs_grad=grad) for s in (13, 16, 24, 32)] == \
            ["reference", "reference", "banded", "banded"]


@pytest.mark.parametrize("side", [13, 16, 24, 32])
@pytest.mark.parametrize("k", [3, 5, 7, 9])
def test_flex_block_mask_is_the_window_and_skips_only_empty_blocks(side, k):
    """The mask_mod equals the window at every pair; a (query, key) block pair the block mask leaves out
    holds no allowed pair, and a block it calls full holds no masked one (the kernel skips the mask there)."""
    n = side * side
    idx = torch.arange(n)
    mask = _window_mask_mod(side, k)(0, 0, idx[:, None], idx[None, :])
    assert torch.equal(mask, window_mask(side, k))
    qb, kb = flex_block_size(side)
    assert qb % side == 0 and kb % side == 0
    bm = _flex_block_mask(side, k, "cpu")
    listed = bm.to_dense()[0, 0].bool()  # partial or full blocks
    nq, nk = -(-n // qb), -(-n // kb)
    padded = torch.zeros(nq * qb, nk * kb, dtype=torch.bool)
    padded[:n, :n] = mask
    any_allowed = padded.reshape(nq, qb, nk, kb).any(3).any(1)
    assert torch.equal(listed[:nq, :nk], any_allowed)
    assert listed.sum() < nq * nk or side <= 2 * k  # rows far apart are skipped


@pytest.mark.slow  # a compile each: 10-60 s on 2 loaded cores
@pytest.mark.parametrize("side, k", [(16, 3), (24, 9)])
def test_compiled_flex_on_cpu_is_exact_at_d8_shapes_without_grad(side, k):
    q, k_, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in qkv(side * side, B=2, H=8, d=64))
    with torch.no_grad():
        out = window_attention(q, k_, v, side, k, scale=0.125, backend="flex")
    torch.testing.assert_close(out, brute_force_attention(q, k_, v, window_mask(side, k), scale=0.125),
                               atol=1e-5, rtol=1e-4)


def test_flex_with_grad_on_cpu_is_an_error_naming_the_key():
    q, k, v = qkv(64, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on cpu.*model.attention_backend"):
        window_attention(q, k, v, 8, 3, scale=1.0, backend="flex")


SEQUENCES = [tuple(range(10)), tuple(range(8)), (8,), (9,), (0,), (3, 4, 5)]


@pytest.mark.parametrize("pattern", ["var", "scale_markov", "mvar"])
@pytest.mark.parametrize("scales", SEQUENCES)
def test_sequence_attention_matches_brute_force_values_and_gradients(pattern, scales):
    if pattern == "var" and scales != tuple(range(len(scales))):
        pytest.skip("var sequences are prefixes")
    spec = AttentionSpec(pattern, PATCH_NUMS, window_size=7, markov_from_scale=8, backend="reference")
    L = sum(PATCH_NUMS[s] ** 2 for s in scales)
    q, k, v = qkv(L, requires_grad=True)
    out = attend(q, k, v, spec, scales, scale=0.5)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    expected = brute_force_attention(q2, k2, v2, sequence_mask(spec, scales), scale=0.5)
    grads2 = torch.autograd.grad(expected.square().sum(), (q2, k2, v2))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    for g, g2 in zip(grads, grads2):
        torch.testing.assert_close(g, g2, atol=1e-4, rtol=1e-3)


def test_masks_of_the_three_patterns():
    spec = lambda p: AttentionSpec(p, (1, 2, 3, 4), window_size=3, markov_from_scale=2, backend="auto")  # noqa: E731
    var, sm, mv = (sequence_mask(spec(p), (0, 1, 2, 3)) for p in ("var", "scale_markov", "mvar"))
    assert var[29, :].all() and not var[0, 1:].any()          # last token sees all, start token only itself
    assert sm[0].sum() == 1 and sm[29, :14].sum() == 0 and sm[29, 14:].all()
    assert torch.equal(mv[:14, :14], sm[:14, :14])               # scales below markov_from_scale: dense
    assert mv[14:, 14:].sum() == 3 * 3 * 16 and (mv <= sm).all()  # 4x4 map with 3x3 windows


def test_groups_pack_dense_scales_and_isolate_windowed_ones():
    spec = AttentionSpec("mvar", PATCH_NUMS, 7, 8, "auto")
    assert scale_groups(spec, tuple(range(10))) == (tuple(range(8)), (8,), (9,))
    assert scale_groups(AttentionSpec("scale_markov", PATCH_NUMS, 7, 8, "auto"), tuple(range(10))) == (tuple(range(10)),)


def test_attended_pairs_shrink_from_var_to_mvar():
    pairs = {p: attended_pairs(AttentionSpec(p, PATCH_NUMS, 7, 8, "auto"), tuple(range(10)))
             for p in ("var", "scale_markov", "mvar")}
    cumulative = [sum(pn ** 2 for pn in PATCH_NUMS[: s + 1]) for s in range(10)]
    assert pairs["var"] == sum(pn ** 2 * cum for pn, cum in zip(PATCH_NUMS, cumulative))
    assert pairs["var"] == int(sequence_mask(AttentionSpec("var", PATCH_NUMS, 7, 8, "auto"), tuple(range(10))).sum())
    assert pairs["scale_markov"] == sum(pn ** 4 for pn in PATCH_NUMS)
    assert pairs["mvar"] == sum(pn ** 4 for pn in PATCH_NUMS[:8]) + (169 + 256) * 49
    assert pairs["var"] > pairs["scale_markov"] > pairs["mvar"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_on_cuda_matches_brute_force_with_gradients():
    q, k, v = (t.cuda() for t in qkv(256, B=2, H=4, d=64))
    expected = brute_force_attention(q, k, v, window_mask(16, 7, "cuda"), scale=0.125)
    out = window_attention(q, k, v, 16, 7, scale=0.125, backend="flex")
    torch.testing.assert_close(out, expected, atol=2e-3, rtol=2e-3)


def test_a_window_larger_than_its_map_is_an_error_not_a_fallback():
    q, k, v = qkv(25)
    with pytest.raises(ValueError, match="larger than the 5x5 map"):
        window_attention(q, k, v, 5, 7, scale=1.0)
