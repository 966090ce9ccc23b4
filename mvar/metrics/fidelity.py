"""FID, KID, Inception Score, precision and recall (and, with the classifier, class accuracy) from a feature
extractor's features, with torch-fidelity's own formulas.

The reference side is a ``Reference``: FID statistics (mu, sigma) plus the pool features that
precision/recall needs (its k-nearest-neighbour balls are built on the reference features).
`mvar eval make-ref` computes one once from a shard set (or an ADM `.npz` batch) and saves it
as an `.npz` that also records the image size and the sha256 of the Inception weights, so that
a reference of another resolution or made with other weights is refused instead of giving a
meaningless number.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mvar.errors import UserError
from mvar.files import NPZ_ERRORS, one_line
from mvar.metrics.images import batched_tensors, iter_labelled_images, open_image_set
from mvar.metrics.inception import (
    FEATURE_EXTRACTOR,
    FID_LAYER,
    ISC_LAYER,
    FeatureWeights,
    extract_features,
    feature_extractor,
)

REFERENCE_FORMAT = "mvar-fid-ref/1"
# KID: torch-fidelity's defaults (100 subsets of 1000, cubic kernel), the subset no larger than either side
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000
LABELS = "labels"   # key of the images' class labels in a features dict (-1: the set has none)


@dataclass
class Reference:
    mu: np.ndarray            # (D,) float32; D = 2048 for Inception
    sigma: np.ndarray         # (D, D) float64
    features: torch.Tensor    # (M, D) float32: the balls of precision/recall
    image_size: int
    weights_sha256: str
    source: str
    feature_extractor: str = FEATURE_EXTRACTOR

    @property
    def num_images(self) -> int:
        return int(self.features.shape[0])


def fid_statistics(features_N2048: torch.Tensor) -> dict[str, np.ndarray]:
    from torch_fidelity.metric_fid import fid_features_to_statistics
    return fid_features_to_statistics(features_N2048)


def reference_from_features(features: dict[str, torch.Tensor], image_size: int, weights_sha256: str,
                            source: str, extractor: str = FEATURE_EXTRACTOR) -> Reference:
    stats = fid_statistics(features[FID_LAYER])
    return Reference(stats["mu"], stats["sigma"], features[FID_LAYER], image_size, weights_sha256, source, extractor)


def image_features(location: str, weights: FeatureWeights, device: torch.device,
                   batch_size: int = 32, progress: str = "") -> dict[str, torch.Tensor]:
    """Features of every image of a shard set or `.npz` (see `extract_features`), and their class labels
    under LABELS ((N,) int64, -1 where the set has none). ``progress``: the title of a progress bar
    (mvar.progress: drawn on a terminal only), none when empty."""
    from mvar import progress as bars
    extractor = feature_extractor(weights, device)
    labels: list[int] = []
    total = open_image_set(location).num_images if progress else None

    def images(bar):
        for image, label in iter_labelled_images(location):
            labels.append(label)
            bar.update(1)
            yield image

    with bars.bar(total, progress, flag=bool(progress)) as bar:
        out = extract_features(batched_tensors(images(bar), batch_size), extractor, device)
    out[LABELS] = torch.tensor(labels, dtype=torch.int64)
    return out


def compute_reference(location: str, weights: FeatureWeights, device: torch.device,
                      batch_size: int = 32, progress: bool = True) -> Reference:
    image_set = open_image_set(location)
    features = image_features(location, weights, device, batch_size, f"make-ref {location}" if progress else "")
    source = location if "://" in location else str(Path(location).resolve())
    return reference_from_features(features, image_set.image_size, weights.sha256, source, weights.extractor)


def save_reference(path: str | Path, ref: Reference) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    np.savez(tmp, format=np.array(REFERENCE_FORMAT), mu=ref.mu, sigma=ref.sigma, features=ref.features.numpy(),
             image_size=np.array(ref.image_size), feature_extractor=np.array(ref.feature_extractor),
             weights_sha256=np.array(ref.weights_sha256), source=np.array(ref.source))
    os.replace(tmp, path)
    return path


def is_reference_file(path: str) -> bool:
    """True for a file made by `mvar eval make-ref` (an ADM image batch is not one)."""
    try:
        with np.load(path) as data:
            return "format" in data.files
    except NPZ_ERRORS:
        return False


REFERENCE_KEYS = ("format", "mu", "sigma", "features", "image_size", "weights_sha256", "source", "feature_extractor")


def load_reference(path: str | Path) -> Reference:
    """A `mvar eval make-ref` file, its statistics checked (``check_statistics``)."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"reference statistics file '{path}' does not exist; make it with "
                        f"`mvar eval make-ref --shards DIR --out {path}`")
    try:
        with np.load(path) as data:
            missing = [k for k in REFERENCE_KEYS if k not in data.files]
            if missing:
                raise UserError(f"'{path}' is not a reference made by `mvar eval make-ref`: it lacks "
                                f"{', '.join(missing)} (has {', '.join(data.files) or 'nothing'})")
            if str(data["format"]) != REFERENCE_FORMAT:
                raise UserError(f"'{path}' has format {str(data['format'])!r}, expected {REFERENCE_FORMAT!r}")
            ref = Reference(mu=data["mu"], sigma=data["sigma"], features=torch.from_numpy(data["features"]),
                            image_size=int(data["image_size"]), weights_sha256=str(data["weights_sha256"]),
                            source=str(data["source"]), feature_extractor=str(data["feature_extractor"]))
    except NPZ_ERRORS as err:
        raise UserError(f"cannot read reference statistics '{path}' (truncated or not an .npz?): "
                        f"{one_line(err)}") from None
    check_statistics(ref, path)
    return ref


def check_statistics(ref: Reference, where: str) -> None:
    """mu (D,), sigma (D, D) and the features (M, D) of one D, every value finite: else FID fails, or is NaN,
    only after all the sampling."""
    mu, sigma, features = np.asarray(ref.mu), np.asarray(ref.sigma), ref.features
    d = mu.shape[0] if mu.ndim == 1 else -1
    if d < 1 or sigma.shape != (d, d) or features.ndim != 2 or features.shape[1] != d:
        raise UserError(f"reference '{where}': mu {tuple(mu.shape)}, sigma {tuple(sigma.shape)} and features "
                        f"{tuple(features.shape)} do not agree (FID needs mu (D,), sigma (D, D), features (M, D)); "
                        f"remake it with `mvar eval make-ref`")
    for name, values in (("mu", mu), ("sigma", sigma), ("features", features.numpy())):
        if not np.isfinite(values).all():
            raise UserError(f"reference '{where}': {name} holds {int((~np.isfinite(values)).sum())} NaN or inf "
                            f"values; remake it with `mvar eval make-ref`")


def feature_dim(weights: FeatureWeights) -> int:
    """D of the extractor's FID / precision-recall features: Inception's pool (2048), or the classifier's."""
    if weights.extractor == FEATURE_EXTRACTOR:
        return int(FID_LAYER)
    from mvar.metrics.classifier import read_meta
    return read_meta(weights.path).feature_dim


def check_reference(ref: Reference, where: str, image_size: int, weights: FeatureWeights, prc_k: int) -> None:
    """Refuse a reference that cannot be compared with these samples (before any sampling)."""
    if ref.image_size != image_size:
        raise UserError(f"eval.reference '{where}' holds {ref.image_size} px images but the model makes "
                        f"{image_size} px images; use a reference set of {image_size} px")
    if ref.feature_extractor != weights.extractor:
        raise UserError(f"eval.reference '{where}' holds {ref.feature_extractor} features, this evaluation uses "
                        f"{weights.extractor} (eval.feature_extractor); remake it with `mvar eval make-ref "
                        f"--feature-extractor ...` and the same eval.feature_extractor_weights")
    if ref.weights_sha256 != weights.sha256:
        kind = "Inception" if weights.extractor == FEATURE_EXTRACTOR else "classifier"
        raise UserError(f"eval.reference '{where}' was made with {kind} weights sha256 {ref.weights_sha256[:12]}..., "
                        f"this evaluation uses {weights.sha256[:12]}... ({weights.path}); remake it with "
                        f"`mvar eval make-ref` and the same eval.feature_extractor_weights")
    dim = feature_dim(weights)
    if ref.mu.shape[0] != dim:
        raise UserError(f"eval.reference '{where}' holds {ref.mu.shape[0]}-dimensional features, the feature "
                        f"extractor ({weights.path}) gives {dim}; remake it with `mvar eval make-ref` and the same "
                        f"eval.feature_extractor_weights")
    if ref.num_images <= prc_k:
        raise UserError(f"eval.reference '{where}' has {ref.num_images} images; precision/recall with "
                        f"eval.prc_neighborhood={prc_k} needs more than {prc_k}")


def cache_name(location: str, weights_sha256: str) -> str:
    """File name of the reference computed from an image set, per location and weights."""
    key = hashlib.sha256(f"{location}\n{weights_sha256}".encode()).hexdigest()[:12]
    return f"reference-{key}.npz"


def kid_subset_size(num_generated: int, num_reference: int) -> int:
    """KID's subset size: torch-fidelity's 1000, or fewer when either side has fewer features."""
    return min(KID_SUBSET_SIZE, num_generated, num_reference)


def kid_metrics(features_ND: torch.Tensor, ref: Reference, seed: int = 2020) -> dict[str, float]:
    """{'kid', 'kid_std'}: the mean and std over ``KID_SUBSETS`` subsets of the unbiased MMD^2 (cubic
    polynomial kernel) between generated and reference features, torch-fidelity's estimator."""
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric
    size = kid_subset_size(features_ND.shape[0], ref.num_images)
    kid = kid_features_to_metric(features_ND, ref.features, kid_subsets=KID_SUBSETS, kid_subset_size=size,
                                 rng_seed=seed, verbose=False)
    return {"kid": kid[KEY_METRIC_KID_MEAN], "kid_std": kid[KEY_METRIC_KID_STD]}


def fidelity_metrics(features: dict[str, torch.Tensor], ref: Reference, prc_k: int = 3,
                     isc_splits: int = 10) -> dict[str, float]:
    """{'fid', 'kid', 'kid_std', 'is', 'is_std', 'precision', 'recall'} of generated features against ``ref``."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )
    from torch_fidelity.metric_prc import (
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    num = features[FID_LAYER].shape[0]
    if num <= prc_k or num < isc_splits:
        raise ValueError(f"{num} samples: precision/recall needs more than k={prc_k}, IS at least {isc_splits}")
    fid = fid_statistics_to_metric(fid_statistics(features[FID_LAYER]), {"mu": ref.mu, "sigma": ref.sigma}, False)
    isc = isc_features_to_metric(features[ISC_LAYER], splits=isc_splits, shuffle=True, rng_seed=2020)
    # convention of torch-fidelity: input 1 = generated, input 2 = real; the chunked variant keeps memory flat
    prc = prc_features_to_metric(features[FID_LAYER], ref.features, prc_neighborhood=prc_k, prc_batch_size=10000,
                                 save_cpu_ram=True, verbose=False)
    return {"fid": fid[KEY_METRIC_FID], **kid_metrics(features[FID_LAYER], ref), "is": isc[KEY_METRIC_ISC_MEAN],
            "is_std": isc[KEY_METRIC_ISC_STD], "precision": prc[KEY_METRIC_PRECISION],
            "recall": prc[KEY_METRIC_RECALL]}


def class_accuracy(logits_NC: torch.Tensor, labels_N: torch.Tensor) -> dict[str, float]:
    """{'class_acc': the mean over classes of the share of class c's images classified as c,
    'class_acc_min': the worst class's share}. Only the classes that occur in ``labels_N`` count."""
    if labels_N.numel() == 0 or bool((labels_N < 0).any()):
        raise ValueError("class accuracy needs a class label for every image")
    pred_N = logits_NC.argmax(1)
    shares = [(pred_N[labels_N == c] == c).float().mean().item() for c in labels_N.unique().tolist()]
    return {"class_acc": float(np.mean(shares)), "class_acc_min": float(min(shares))}


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(np.asarray(sigma, np.float64))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def fid_resampler(features_ND: np.ndarray, ref: Reference):
    """``fid(idx)``: the FID of the generated features ``features_ND[idx]`` against ``ref``'s fixed statistics.
    tr sqrt(sigma_g sigma_r) is the sum of the square roots of the eigenvalues of Xc sigma_r Xc^T / (N-1)
    (Xc: the resample, centred): with N <= D an N x N eigenproblem per resample on the Gram matrix
    X sigma_r X^T computed once, with N > D a D x D one; never a D x D sqrtm."""
    x = np.asarray(features_ND, np.float64)
    mu_r, sigma_r = np.asarray(ref.mu, np.float64), np.asarray(ref.sigma, np.float64)
    tr_r = float(np.trace(sigma_r))
    n_all, d = x.shape
    if n_all <= d:
        gram_r, gram = x @ sigma_r @ x.T, x @ x.T
    else:
        y = x @ _psd_sqrt(sigma_r)

    def fid(idx: np.ndarray) -> float:
        n = len(idx)
        diff = x[idx].mean(0) - mu_r
        if n_all <= d:
            sub = np.ix_(idx, idx)
            g = gram[sub]
            tr_g = float(np.trace(g) - g.sum() / n) / (n - 1)
            inner = _centred(gram_r[sub]) / (n - 1)
        else:
            yc, xc = y[idx] - y[idx].mean(0), x[idx] - x[idx].mean(0)
            tr_g = float((xc * xc).sum()) / (n - 1)
            inner = yc.T @ yc / (n - 1)
        tr_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(inner), 0, None)).sum())
        return float(diff @ diff + tr_g + tr_r - 2 * tr_sqrt)

    return fid


def _centred(gram_NN: np.ndarray) -> np.ndarray:
    """The Gram matrix of the centred rows, from the Gram matrix of the rows."""
    return gram_NN - gram_NN.mean(0)[None] - gram_NN.mean(1)[:, None] + gram_NN.mean()


def bootstrap_metrics(features: dict[str, torch.Tensor], ref: Reference, resamples: int, seed: int = 0,
                      class_acc: bool = False, level: float = 0.95) -> dict[str, float]:
    """{'fid_boot_std', 'fid_boot_low', 'fid_boot_high'} (and 'class_acc_boot_*' with ``class_acc``: the
    classifier's logits and labels): bootstrap over the generated samples, the reference fixed (FID: the basic
    interval, which corrects its resampling bias; class accuracy: the percentile interval)."""
    from mvar.metrics.stats import bootstrap_interval
    n = int(features[FID_LAYER].shape[0])
    index = np.arange(n)
    out = {}
    fid = fid_resampler(features[FID_LAYER].numpy(), ref)
    b = bootstrap_interval(fid, index, resamples, seed, level, basic=True, floor=0.0)  # FID's resampling bias
    out.update({"fid_boot_std": b.std, "fid_boot_low": b.low, "fid_boot_high": b.high})
    if class_acc:
        pred, true = features[ISC_LAYER].argmax(1).numpy(), features[LABELS].numpy()

        def acc(p: np.ndarray, y: np.ndarray) -> float:
            return float(np.mean([(p[y == c] == c).mean() for c in np.unique(y)]))

        b = bootstrap_interval(acc, (pred, true), resamples, seed, level)
        out.update({"class_acc_boot_std": b.std, "class_acc_boot_low": b.low, "class_acc_boot_high": b.high})
    return out


def score_images(location: str, ref: Reference, weights: FeatureWeights, device: torch.device,
                 prc_k: int = 3, isc_splits: int = 10, batch_size: int = 32) -> dict[str, float]:
    """The metrics of an image set (samples, or real images for a floor) against ``ref``: FID, KID, IS,
    precision, recall, and with the classifier the class accuracy of its labelled images."""
    check_reference(ref, "reference", open_image_set(location).image_size, weights, prc_k)
    features = image_features(location, weights, device, batch_size, f"features of {location}")
    metrics = fidelity_metrics(features, ref, prc_k, isc_splits)
    if weights.extractor != FEATURE_EXTRACTOR:
        metrics.update(class_accuracy(features[ISC_LAYER], features[LABELS]))
    return metrics
