"""A small image classifier as torch-fidelity's feature extractor, for data sets Inception does not fit.

Random Inception weights (all there is offline) measure little. For a labelled set such as the
synthetic one, a classifier trained on its training split gives features that mean something
(the MNIST-style FID): its penultimate features feed FID and precision/recall, its logits the
Inception Score (at most the number of classes), and its argmax the class accuracy of class-
conditional samples. Numbers made with it are comparable only with numbers made with the same
file (the reference records its sha256), never with Inception's.

    train_classifier("data/synth", "out/classifier.pt", eval_shards="data/synth-eval")
    mvar eval --feature-extractor classifier --feature-extractor-weights out/classifier.pt ...

The file is a state dict (`classifier.pt`) and, beside it, `classifier.yaml`: format, class names,
image size, architecture, training figures and the sha256 of the `.pt`. The yaml is written last
and checked on load, so a half-written or replaced weights file is refused.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from mvar.errors import UserError
from mvar.files import file_sha256

EXTRACTOR_NAME = "mvar-classifier"
FORMAT = "mvar-classifier/1"
FEATURE_LAYER = "penultimate"   # FID, KID, precision/recall
LOGITS_LAYER = "logits"         # Inception Score, class accuracy
WEIGHTS_KEY = "eval.feature_extractor_weights"


@dataclass
class ClassifierMeta:
    """What `classifier.yaml` holds."""

    class_names: list[str]
    image_size: int
    widths: list[int] = field(default_factory=lambda: [16, 32, 64, 128])
    feature_dim: int = 64
    weights_sha256: str = ""
    format: str = FORMAT
    training: dict = field(default_factory=dict)   # source shards, steps, accuracies, seconds

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, 2, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True),
                         nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class SmallClassifier(nn.Module):
    """Images in [-1, 1] at ``image_size`` -> (penultimate features (B, feature_dim), logits (B, C)).

    One stride-2 block per width (so 4 widths take 64 px to 4x4), global average pooling, a ReLU
    layer of ``feature_dim`` (the features) and a linear head."""

    def __init__(self, meta: ClassifierMeta):
        super().__init__()
        widths = [3, *meta.widths]
        self.blocks = nn.Sequential(*[_block(a, b) for a, b in zip(widths, widths[1:])])
        self.embed = nn.Linear(widths[-1], meta.feature_dim)
        self.head = nn.Linear(meta.feature_dim, meta.num_classes)

    def forward(self, x_B3HW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_BC = self.blocks(x_B3HW).mean((2, 3))
        feat_BD = F.relu(self.embed(h_BC))
        return feat_BD, self.head(feat_BD)


def to_input(x_uint8_B3HW: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 images -> float in [-1, 1] at the classifier's size (antialiased bilinear when it differs)."""
    x = x_uint8_B3HW.float().div(127.5).sub(1)
    if x.shape[-1] != image_size or x.shape[-2] != image_size:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
    return x


# -- the file --------------------------------------------------------------------------------------

def meta_path(weights: str | Path) -> Path:
    return Path(weights).with_suffix(".yaml")


def save_classifier(path: str | Path, model: SmallClassifier, meta: ClassifierMeta) -> Path:
    """Write ``path`` (.pt) and its yaml atomically, the yaml (with the .pt's sha256) last."""
    path = Path(path)
    if path.suffix != ".pt":
        raise UserError(f"--out: the classifier is a .pt file (its .yaml goes beside it), got '{path}'")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(model.state_dict(), tmp)
    meta.weights_sha256 = file_sha256(tmp)
    tmp_meta = meta_path(path).with_name(f".{meta_path(path).name}.tmp-{os.getpid()}")
    tmp_meta.write_text(yaml.safe_dump(asdict(meta), sort_keys=False))
    os.replace(tmp, path)
    os.replace(tmp_meta, meta_path(path))
    return path


def read_meta(path: str | Path) -> ClassifierMeta:
    """The yaml beside ``path``, checked against the weights file (UserError naming what is wrong)."""
    path, mpath = Path(path), meta_path(path)
    if not path.is_file():
        raise UserError(f"{WEIGHTS_KEY}: classifier file '{path}' does not exist; train one with "
                        f"`mvar eval train-classifier --shards DIR --out {path}`")
    if not mpath.is_file():
        raise UserError(f"{WEIGHTS_KEY}: '{path}' has no '{mpath.name}' beside it: not a classifier from "
                        "`mvar eval train-classifier`, or its writing did not finish")
    data = yaml.safe_load(mpath.read_text()) or {}
    if data.get("format") != FORMAT:
        raise UserError(f"{WEIGHTS_KEY}: '{mpath}' has format {data.get('format')!r}, expected {FORMAT!r}")
    meta = ClassifierMeta(**data)
    actual = file_sha256(path)
    if actual != meta.weights_sha256:
        raise UserError(f"{WEIGHTS_KEY}: '{path}' has sha256 {actual[:16]}..., its yaml says "
                        f"{meta.weights_sha256[:16]}...: the file was replaced or is incomplete; retrain it")
    return meta


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> tuple[SmallClassifier, ClassifierMeta]:
    meta = read_meta(path)
    model = SmallClassifier(meta)
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except (RuntimeError, ValueError, OSError) as err:
        raise UserError(f"{WEIGHTS_KEY}: '{path}' does not fit its yaml's architecture: {str(err)[:300]}") from err
    return model.to(device).eval(), meta


# -- torch-fidelity --------------------------------------------------------------------------------

def _base():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    return FeatureExtractorBase


def register() -> None:
    """Register the extractor with torch-fidelity under EXTRACTOR_NAME (once per process)."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor
    if EXTRACTOR_NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(EXTRACTOR_NAME, extractor_class())


_CLASS = None


def extractor_class():
    """The FeatureExtractorBase subclass, made on first use so that importing this module does not
    import torch-fidelity."""
    global _CLASS
    if _CLASS is None:
        _CLASS = _make_extractor_class(_base())
    return _CLASS


def _make_extractor_class(base):
    class ClassifierFeatureExtractor(base):
        """uint8 (B, 3, H, W) -> the requested of ('penultimate' (B, D), 'logits' (B, C)), float32."""

        def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
            super().__init__(name, features_list)
            if not feature_extractor_weights_path:
                raise UserError(f"{WEIGHTS_KEY}: the classifier feature extractor needs its weights file "
                                "(`mvar eval train-classifier`); nothing is downloaded")
            self.model, self.meta = load_classifier(feature_extractor_weights_path)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return FEATURE_LAYER, LOGITS_LAYER

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {"isc": LOGITS_LAYER, "fid": FEATURE_LAYER, "kid": FEATURE_LAYER, "prc": FEATURE_LAYER}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return torch.zeros(1, 3, 64, 64, dtype=torch.uint8)

        def forward(self, x):
            if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
                raise ValueError(f"the classifier takes uint8 (B, 3, H, W) images, got {getattr(x, 'shape', x)}")
            feat, logits = self.model(to_input(x, self.meta.image_size).to(next(self.model.parameters()).device))
            out = {FEATURE_LAYER: feat.float(), LOGITS_LAYER: logits.float()}
            return tuple(out[name] for name in self.features_list)

    return ClassifierFeatureExtractor


# -- training --------------------------------------------------------------------------------------

def read_labelled(location: str, max_images: int = 0) -> tuple[torch.Tensor, torch.Tensor, list[str], int]:
    """(uint8 images (N, 3, S, S), labels (N,), class names, S) of an image shard set, all in memory."""
    from mvar.data.manifest import read_manifest
    from mvar.metrics.images import iter_shard_images
    manifest = read_manifest(location)
    if manifest.kind != "images":
        raise UserError(f"--shards: '{location}' holds {manifest.kind} shards; the classifier trains on images")
    images, labels = [], []
    for image, label in iter_shard_images(location):
        if label < 0:
            raise UserError(f"--shards: '{location}' has an unlabelled sample; the classifier needs class labels")
        images.append(image)
        labels.append(label)
        if max_images and len(images) >= max_images:
            break
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels), list(manifest.class_names), manifest.image_size


def augment(x_B3HW: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Horizontal flips, and a Gaussian blur (sigma up to 1.5 px) on half the images, so that the
    classifier still knows a class in a tokenizer's smoother reconstructions of it."""
    B = x_B3HW.shape[0]
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x_B3HW.flip(-1), x_B3HW)
    sigma = torch.rand(B, generator=gen) * 1.5 * (torch.rand(B, generator=gen) < 0.5)
    r = torch.arange(-3, 4, dtype=x.dtype)
    k_BK = torch.exp(-r.square() / (2 * sigma.clamp(min=1e-3).square().unsqueeze(1)))
    k_BK = k_BK / k_BK.sum(1, keepdim=True)
    C = x.shape[1]
    w_h = k_BK.repeat_interleave(C, 0).view(B * C, 1, 1, 7)  # separable: one row and one column pass per channel
    y = F.conv2d(F.pad(x.reshape(1, B * C, *x.shape[2:]), (3, 3, 0, 0), mode="replicate"), w_h, groups=B * C)
    y = F.conv2d(F.pad(y, (0, 0, 3, 3), mode="replicate"), w_h.transpose(2, 3), groups=B * C)
    return y.view_as(x)


@dataclass
class TrainResult:
    path: Path
    meta: ClassifierMeta
    train_acc: float
    heldout_acc: float | None


@torch.no_grad()
def accuracy(model: SmallClassifier, x_uint8: torch.Tensor, labels: torch.Tensor, image_size: int) -> float:
    model.eval()
    correct = sum((model(to_input(xb, image_size))[1].argmax(1) == yb).sum().item()
                  for xb, yb in zip(x_uint8.split(256), labels.split(256)))
    return correct / len(labels)


def train_classifier(shards: str, out: str | Path, eval_shards: str = "", steps: int = 400, batch_size: int = 64,
                     lr: float = 3e-3, seed: int = 0, feature_dim: int = 64, log_every: int = 100) -> TrainResult:
    """Train on the labelled image shards at ``shards`` (AdamW, cosine lr, augmentations), save to ``out``."""
    x, y, class_names, size = read_labelled(shards)
    meta = ClassifierMeta(class_names=class_names, image_size=size, feature_dim=feature_dim)
    torch.manual_seed(seed)
    model = SmallClassifier(meta)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for step in range(steps):
        model.train()
        idx = torch.randint(len(y), (min(batch_size, len(y)),), generator=gen)
        _, logits = model(augment(to_input(x[idx], size), gen))
        loss = F.cross_entropy(logits, y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}: loss {loss.item():.4f}", flush=True)
    seconds = time.perf_counter() - t0
    train_acc = accuracy(model, x, y, size)
    heldout_acc = None
    if eval_shards:
        xe, ye, names_e, size_e = read_labelled(eval_shards)
        if names_e != class_names or size_e != size:
            raise UserError(f"--eval-shards: '{eval_shards}' has other classes or image size than '{shards}'")
        heldout_acc = accuracy(model, xe, ye, size)
    meta.training = {"shards": str(shards), "eval_shards": str(eval_shards), "images": len(y), "steps": steps,
                     "batch_size": batch_size, "lr": lr, "seed": seed, "seconds": round(seconds, 1),
                     "train_acc": train_acc, "heldout_acc": heldout_acc}
    path = save_classifier(out, model, meta)
    return TrainResult(path, meta, train_acc, heldout_acc)
