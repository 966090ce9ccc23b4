"""Sample quality metrics: FID, IS, precision and recall with torch-fidelity's Inception.

    from mvar.metrics import resolve_weights, image_features, compute_reference, fidelity_metrics
    weights = resolve_weights(cfg.feature_extractor_weights)        # '' = the official file
    ref = load_reference("in256_ref.npz")                          # or compute_reference(shards, weights, device)
    check_reference(ref, "in256_ref.npz", image_size=256, weights=weights, prc_k=3)
    metrics = fidelity_metrics(image_features("samples/", weights, device), ref)

The names below load lazily, so that importing this package does not import torch-fidelity.
"""
from __future__ import annotations

from mvar.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mvar.metrics.inception": ["FeatureWeights", "resolve_weights", "feature_extractor", "extract_features",
                               "write_standin_inception_weights"],
    "mvar.metrics.fidelity": ["Reference", "compute_reference", "check_reference", "fidelity_metrics",
                              "image_features", "load_reference", "class_accuracy", "score_images",
                              "save_reference"],
    "mvar.metrics.classifier": ["train_classifier", "load_classifier"],
    "mvar.metrics.images": ["open_image_set", "write_images_npz"],
})
