"""The metrics layer: stand-in weights fit torch-fidelity's Inception, metrics separate real from noise,
reference files keep what a comparison needs and refuse what would be meaningless."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mvar.errors import UserError
from mvar.metrics.fidelity import (
    LABELS,
    Reference,
    bootstrap_metrics,
    check_reference,
    fid_resampler,
    fidelity_metrics,
    kid_metrics,
    kid_subset_size,
    load_reference,
    reference_from_features,
    save_reference,
)
from mvar.metrics.images import open_image_set, write_images_npz
from mvar.metrics.inception import (
    FID_LAYER,
    ISC_LAYER,
    extract_features,
    feature_extractor,
    resolve_weights,
    write_standin_inception_weights,
)


def test_standin_weights_are_seeded_and_load_strictly_into_torch_fidelitys_inception(eval_inputs, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    again = write_standin_inception_weights(tmp_path / "again.pt", seed=0)
    other = write_standin_inception_weights(tmp_path / "other.pt", seed=1)
    weights = resolve_weights(eval_inputs.weights)
    assert weights.sha256 == again != other
    assert not weights.official  # numbers made with it must be flagged as not comparable
    # torch-fidelity loads the file with a strict load_state_dict: every key and shape matches
    FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=eval_inputs.weights)


def test_fid_of_two_halves_is_far_below_fid_against_noise(eval_inputs):
    ref = load_reference(eval_inputs.ref_npz)  # features of 20 synthetic images
    half_a, half_b = ref.features[:10], ref.features[10:]
    weights = resolve_weights(eval_inputs.weights)
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (10, 3, 64, 64), dtype=np.uint8))
    noise_features = extract_features([noise[:5], noise[5:]], feature_extractor(weights, torch.device("cpu")),
                                      torch.device("cpu"))
    set_b = reference_from_features({FID_LAYER: half_b}, 64, weights.sha256, "half b")
    logits = torch.zeros(10, 1008)  # IS is not under test here
    same = fidelity_metrics({FID_LAYER: half_a, "logits_unbiased": logits}, set_b, prc_k=3, isc_splits=2)
    vs_noise = fidelity_metrics({**noise_features}, reference_from_features({FID_LAYER: ref.features}, 64,
                                                                            weights.sha256, "all"), 3, 2)
    assert same["fid"] * 5 < vs_noise["fid"], (same, vs_noise)
    assert same["kid"] < vs_noise["kid"] and vs_noise["kid_std"] >= 0  # KID beside FID, on the same features
    # noise images crowd together in feature space: their k-NN balls hold none of the real images
    assert vs_noise["recall"] < same["recall"]
    assert 0.0 <= vs_noise["precision"] <= 1.0 and vs_noise["is"] >= 1.0


def test_reference_file_round_trips_and_refuses_mismatches(eval_inputs, tmp_path):
    ref = load_reference(eval_inputs.ref_npz)
    weights = resolve_weights(eval_inputs.weights)
    assert ref.num_images == 20 and ref.image_size == 64 and ref.weights_sha256 == weights.sha256
    assert ref.mu.shape == (2048,) and ref.sigma.shape == (2048, 2048) and ref.features.shape == (20, 2048)
    check_reference(ref, "ref", 64, weights, prc_k=3)
    with pytest.raises(UserError, match="64 px images but the model makes 32 px"):
        check_reference(ref, "ref", 32, weights, prc_k=3)
    with pytest.raises(UserError, match="needs more than 25"):
        check_reference(ref, "ref", 64, weights, prc_k=25)
    write_standin_inception_weights(tmp_path / "w.pt", seed=3)
    with pytest.raises(UserError, match="made with Inception weights sha256"):
        check_reference(ref, "ref", 64, resolve_weights(str(tmp_path / "w.pt")), prc_k=3)
    copy = save_reference(tmp_path / "copy.npz", Reference(ref.mu, ref.sigma, ref.features, 64, "abc", "src"))
    assert load_reference(copy).weights_sha256 == "abc"
    with pytest.raises(UserError, match="does not exist"):
        load_reference(tmp_path / "missing.npz")


def test_images_npz_is_written_as_a_stream_in_the_adm_layout(tmp_path):
    images = [np.full((8, 8, 3), i, dtype=np.uint8) for i in range(5)]
    path = write_images_npz(str(tmp_path / "s.npz"), iter(images), 5, 8)
    with np.load(path) as data:
        assert data.files == ["arr_0"]
        assert data["arr_0"].shape == (5, 8, 8, 3) and data["arr_0"].dtype == np.uint8
        assert (data["arr_0"][:, 0, 0, 0] == np.arange(5)).all()
    assert open_image_set(path).image_size == 8 and open_image_set(path).num_images == 5
    with pytest.raises(ValueError, match="4 images written"):
        write_images_npz(str(tmp_path / "short.npz"), iter(images[:4]), 5, 8)
    assert not (tmp_path / "short.npz").exists()


def _features(n: int, d: int, shift: float, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 1, (d, d)) / np.sqrt(d)
    return torch.from_numpy((rng.normal(shift, 1, (n, d)) @ mix).astype(np.float32))


@pytest.mark.parametrize("n", [12, 60])  # fewer samples than dimensions (N x N form) and more (D x D form)
def test_the_resampled_fid_of_all_samples_is_torch_fidelitys_fid(n):
    from torch_fidelity.metric_fid import fid_statistics_to_metric

    from mvar.metrics.fidelity import fid_statistics
    ref = reference_from_features({FID_LAYER: _features(80, 24, 0.0, 0)}, 64, "sha", "ref")
    gen = _features(n, 24, 0.3, 1)
    ref_stats = {"mu": ref.mu, "sigma": ref.sigma}
    expected = fid_statistics_to_metric(fid_statistics(gen), ref_stats, False)["frechet_inception_distance"]
    fid = fid_resampler(gen.numpy(), ref)
    assert fid(np.arange(n)) == pytest.approx(expected, rel=1e-4)
    idx = np.random.default_rng(2).integers(0, n, n)
    again = fid_statistics_to_metric(fid_statistics(gen[idx]), ref_stats, False)
    assert fid(idx) == pytest.approx(again["frechet_inception_distance"], rel=1e-4)


def _unbiased_mmd2_cubic(x: np.ndarray, y: np.ndarray) -> float:
    """KID's estimator written out: k(a, b) = (a.b / d + 1)^3; within-set sums without the diagonal."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (a @ b.T / d + 1.0) ** 3  # noqa: E731
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
    return float(within - 2 * kxy.sum() / (m * m))


def test_kid_is_torch_fidelitys_unbiased_mmd_with_a_subset_no_larger_than_either_side():
    assert kid_subset_size(50000, 20000) == 1000 and kid_subset_size(60, 80) == 60 and kid_subset_size(80, 12) == 12
    gen, real = _features(30, 24, 0.3, 1), _features(30, 24, 0.0, 0)
    ref = reference_from_features({FID_LAYER: real}, 64, "sha", "ref")
    m = kid_metrics(gen, ref)  # 30 of each: every subset is the whole set, in some order
    expected = _unbiased_mmd2_cubic(gen.double().numpy(), real.double().numpy())
    assert m["kid"] == pytest.approx(expected, rel=1e-3, abs=1e-6) and m["kid_std"] == pytest.approx(0, abs=1e-4)
    pool = _features(92, 24, 0.0, 0)  # one distribution: 80 reference features, 12 more like them
    ref = reference_from_features({FID_LAYER: pool[:80]}, 64, "sha", "ref")
    same, shifted = kid_metrics(pool[80:], ref), kid_metrics(_features(12, 24, 0.5, 0), ref)
    assert same["kid"] < shifted["kid"] and shifted["kid_std"] > 0  # 12 of the 80 reference features per subset


def test_bootstrap_metrics_give_an_interval_for_fid_and_class_accuracy():
    ref = reference_from_features({FID_LAYER: _features(80, 24, 0.0, 0)}, 64, "sha", "ref")
    labels = torch.arange(40) % 4
    logits = torch.nn.functional.one_hot(labels, 4).float()
    logits[:8] = logits[:8].roll(1, dims=1)  # 8 of 40 misclassified
    features = {FID_LAYER: _features(40, 24, 0.5, 1), ISC_LAYER: logits, LABELS: labels}
    m = bootstrap_metrics(features, ref, resamples=50, seed=0, class_acc=True)
    assert m["fid_boot_low"] < m["fid_boot_high"] and m["fid_boot_std"] > 0
    assert m["class_acc_boot_low"] < 0.8 < m["class_acc_boot_high"] <= 1.0
    assert bootstrap_metrics(features, ref, resamples=50, seed=0, class_acc=True) == m  # seeded
    assert set(bootstrap_metrics(features, ref, resamples=5)) == {"fid_boot_std", "fid_boot_low", "fid_boot_high"}
