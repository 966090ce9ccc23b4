"""The feature extractors behind the metrics (torch-fidelity's Inception-v3, or this project's small
classifier, `mvar.metrics.classifier`) and where their weights come from.

torch-fidelity's ``inception-v3-compat`` is the TensorFlow FID Inception ported to PyTorch; its
weights download once from a release page into the torch hub cache. On machines without
internet pass a local copy (``eval.feature_extractor_weights``). Tests and the quickstart use
stand-in weights: a seeded random state dict for the same architecture. Their features still
tell real images from noise, but numbers made with them are not comparable with published ones.
The official file is recognised by its sha256, whose first 8 hex digits torch hub puts in the
file name (``...-6726825d.pth``).

`eval.feature_extractor` picks the extractor: ``inception`` (default) or ``classifier`` (a file
from `mvar eval train-classifier`, for labelled sets Inception does not fit). Whichever it is,
`extract_features` files its FID / precision-recall features under FID_LAYER and its logits
under ISC_LAYER, so the metrics code is the same for both.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from mvar.errors import UserError
from mvar.files import check_torch_file, file_sha256

FEATURE_EXTRACTOR = "inception-v3-compat"
FID_LAYER = "2048"               # pool features: FID and precision/recall
ISC_LAYER = "logits_unbiased"    # logits without the fc bias: Inception Score (torch-fidelity's default)
OFFICIAL_SHA256_PREFIX = "6726825d"
WEIGHTS_KEY = "eval.feature_extractor_weights"
# eval.feature_extractor -> torch-fidelity's registry name
EXTRACTORS = {"inception": FEATURE_EXTRACTOR, "classifier": "mvar-classifier"}


@dataclass(frozen=True)
class FeatureWeights:
    """The weights file the feature extractor loads, and its sha256."""

    path: str
    sha256: str
    extractor: str = FEATURE_EXTRACTOR   # torch-fidelity's name: inception-v3-compat | mvar-classifier

    @property
    def official(self) -> bool:
        """True for torch-fidelity's released Inception weights (metrics comparable with papers)."""
        return self.extractor == FEATURE_EXTRACTOR and self.sha256.startswith(OFFICIAL_SHA256_PREFIX)

    @property
    def layers(self) -> tuple[str, str]:
        """The extractor's own names of (FID / precision-recall features, logits)."""
        if self.extractor == FEATURE_EXTRACTOR:
            return FID_LAYER, ISC_LAYER
        from mvar.metrics.classifier import FEATURE_LAYER, LOGITS_LAYER
        return FEATURE_LAYER, LOGITS_LAYER


def official_url() -> str:
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    return URL_INCEPTION_V3


def official_cache_path() -> Path:
    """Where torch hub keeps the downloaded official weights."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(official_url())


def resolve_weights(path: str = "", download: bool = True, extractor: str = "inception") -> FeatureWeights:
    """The local weights file: ``path`` when given, else the official Inception file (downloaded once if
    missing). ``extractor``: an `eval.feature_extractor` value; a classifier needs ``path``, checked here."""
    if extractor not in EXTRACTORS:
        raise UserError(f"eval.feature_extractor: '{extractor}' is not one of {', '.join(EXTRACTORS)}")
    if extractor == "classifier":
        from mvar.metrics.classifier import read_meta
        if not path:
            raise UserError(f"{WEIGHTS_KEY}: eval.feature_extractor=classifier needs the classifier file "
                            "(`mvar eval train-classifier --shards DIR --out FILE.pt`)")
        meta = read_meta(path)  # exists, has its yaml, and the sha256 matches
        return FeatureWeights(str(Path(path).resolve()), meta.weights_sha256, EXTRACTORS[extractor])
    if path:
        if not Path(path).is_file():
            raise UserError(f"{WEIGHTS_KEY}: file '{path}' does not exist (make stand-in weights for tests with "
                            "`mvar eval standin-weights --out FILE`, or copy the official Inception weights)")
        check_torch_file(path, WEIGHTS_KEY)
        return FeatureWeights(str(Path(path).resolve()), file_sha256(path))
    cached = official_cache_path()
    if not cached.is_file():
        if not download:
            raise UserError(f"the official Inception weights are not in {cached}; set {WEIGHTS_KEY}")
        _download_official(cached)
    return FeatureWeights(str(cached), file_sha256(cached))


def _download_official(dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(official_url(), str(dest), hash_prefix=OFFICIAL_SHA256_PREFIX, progress=False)
    except Exception as err:
        raise UserError(f"cannot download torch-fidelity's Inception weights from {official_url()} ({err}); "
                        f"on a machine without internet set {WEIGHTS_KEY} to a local copy of that file") from err


_EXTRACTORS: dict[tuple[str, str], torch.nn.Module] = {}


def feature_extractor(weights: FeatureWeights, device: torch.device) -> torch.nn.Module:
    """torch-fidelity's extractor of ``weights`` giving the FID and IS layers (one instance per weights and device)."""
    key = (weights.extractor, weights.sha256, str(device))
    if key not in _EXTRACTORS:
        from torch_fidelity.utils import create_feature_extractor
        if weights.extractor != FEATURE_EXTRACTOR:
            from mvar.metrics.classifier import register
            register()
        try:
            extractor = create_feature_extractor(weights.extractor, list(weights.layers), cuda=False,
                                                 feature_extractor_weights_path=weights.path, verbose=False)
        except (RuntimeError, KeyError, ValueError, OSError) as err:
            raise UserError(f"{WEIGHTS_KEY}: '{weights.path}' is not a state dict for torch-fidelity's "
                            f"{weights.extractor}: {str(err)[:300]}") from err
        _EXTRACTORS.clear()  # keep at most one (about 100 MB) alive
        _EXTRACTORS[key] = extractor.to(device)
    return _EXTRACTORS[key]


@torch.no_grad()
def extract_features(batches_B3HW: Iterable[torch.Tensor], extractor: torch.nn.Module,
                     device: torch.device) -> dict[str, torch.Tensor]:
    """{FID_LAYER: (N, D), ISC_LAYER: (N, C)} float32 on CPU from uint8 (B, 3, H, W) batches: Inception's
    (N, 2048) pool features and (N, 1008) logits, or the classifier's penultimate features and logits."""
    fid_layer, isc_layer = extractor.get_requested_features_list()
    parts: dict[str, list[torch.Tensor]] = {FID_LAYER: [], ISC_LAYER: []}
    for x_B3HW in batches_B3HW:
        if x_B3HW.dtype != torch.uint8 or x_B3HW.dim() != 4 or x_B3HW.shape[1] != 3:
            raise ValueError(f"feature extraction takes uint8 (B, 3, H, W) images, got {x_B3HW.dtype} "
                             f"{tuple(x_B3HW.shape)}")
        features = extractor.convert_features_tuple_to_dict(extractor(x_B3HW.to(device)))
        for role, name in ((FID_LAYER, fid_layer), (ISC_LAYER, isc_layer)):
            parts[role].append(features[name].float().cpu())
    if not parts[FID_LAYER]:
        raise ValueError("no images to extract features from")
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


def write_standin_inception_weights(path: str | Path, seed: int = 0) -> str:
    """A seeded random state dict for torch-fidelity's Inception (same keys and shapes); returns its sha256.

    Convolutions get He-normal weights and batch norms stay identity, so activations keep their
    scale through the 90-odd layers and the features are O(1): good enough to separate image
    sets in tests. Written atomically; the same seed gives the same tensors.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    class _Unloaded(FeatureExtractorInceptionV3):
        def load_state_dict(self, state_dict, strict=True, assign=False):  # construction only
            return None

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        empty = Path(tmp) / "empty.pt"
        torch.save({}, empty)
        model = _Unloaded(FEATURE_EXTRACTOR, [FID_LAYER], feature_extractor_weights_path=str(empty), verbose=False)
        gen = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu", generator=gen)
            elif isinstance(module, torch.nn.Linear):
                torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5, generator=gen)
                torch.nn.init.zeros_(module.bias)
        tmp_file = Path(tmp) / "weights.pt"
        torch.save(model.state_dict(), tmp_file)
        os.replace(tmp_file, path)
    return file_sha256(path)
