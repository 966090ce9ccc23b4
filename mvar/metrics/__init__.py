"""Sample quality metrics: FID, IS, precision and recall with torch-fidelity's Inception.

    from mvar.metrics import resolve_weights, image_features, compute_reference, fidelity_metrics
    weights = resolve_weights(cfg.feature_extractor_weights)        # '' = the official file
    ref = load_reference("in256_ref.npz")                          # or compute_reference(shards, weights, device)
    check_reference(ref, "in256_ref.npz", image_size=256, weights=weights, prc_k=3)
    metrics = fidelity_metrics(image_features("samples/", weights, device), ref)

The names below load lazily, so that importing this package does not import torch-fidelity.
"""
from __future__ import annotations

from mvar.lazy import lazy_getattr

_EXPORTS = {
    "FeatureWeights": "mvar.metrics.inception",
    "resolve_weights": "mvar.metrics.inception",
    "feature_extractor": "mvar.metrics.inception",
    "extract_features": "mvar.metrics.inception",
    "write_standin_inception_weights": "mvar.metrics.inception",
    "Reference": "mvar.metrics.fidelity",
    "compute_reference": "mvar.metrics.fidelity",
    "check_reference": "mvar.metrics.fidelity",
    "fidelity_metrics": "mvar.metrics.fidelity",
    "image_features": "mvar.metrics.fidelity",
    "load_reference": "mvar.metrics.fidelity",
    "class_accuracy": "mvar.metrics.fidelity",
    "score_images": "mvar.metrics.fidelity",
    "train_classifier": "mvar.metrics.classifier",
    "load_classifier": "mvar.metrics.classifier",
    "save_reference": "mvar.metrics.fidelity",
    "open_image_set": "mvar.metrics.images",
    "write_images_npz": "mvar.metrics.images",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
