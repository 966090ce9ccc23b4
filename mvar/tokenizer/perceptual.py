"""A VGG16-features perceptual distance (LPIPS without its learned channel weights).

Both images in [-1, 1] are mapped to ImageNet normalisation and sent through
torchvision's VGG16 `features`; at each tap (relu1_2, relu2_2, relu3_3,
relu4_3, relu5_3, or the first ``num_layers`` of them) the features are
unit-normalised over channels, and the squared difference is summed over
channels and averaged over positions and the batch; the result is the mean
over taps (each tap's term lies in [0, 4]).

The weights come from a local file only: a torchvision ``vgg16`` state dict
(``vgg16-397923af.pth``), or just its ``features.*`` keys. Nothing is ever
downloaded. ``save_standin_weights`` writes a seeded random file of the same
layout for tests and offline demos: its distances are not comparable with
numbers made with the ImageNet weights.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision.models import vgg

from mvar.errors import UserError

WEIGHTS_KEY = "losses.perceptual_weights"
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
TAP_INDICES = (3, 8, 15, 22, 29)  # positions of those ReLUs in torchvision's vgg16().features
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features(num_layers: int = 5) -> nn.Sequential:
    """torchvision's vgg16().features (same layers, same indices), cut after tap ``num_layers``.

    Built with torchvision's own `make_layers`, as `vgg16(weights=None)` does, without the
    400 MB classifier that this distance never uses.
    """
    if not 1 <= num_layers <= len(TAP_INDICES):
        raise ValueError(f"num_layers must lie in 1..{len(TAP_INDICES)}, got {num_layers}")
    features = vgg.make_layers(vgg.cfgs["D"], batch_norm=False)
    return features[:TAP_INDICES[num_layers - 1] + 1]


class VGGPerceptual(nn.Module):
    """Frozen perceptual distance; ``forward(x, y)`` -> scalar, gradients flow into ``x`` only."""

    def __init__(self, num_layers: int = 5):
        super().__init__()
        self.num_layers = num_layers
        self.features = vgg16_features(num_layers)
        self.register_buffer("mean_13", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std_13", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> VGGPerceptual:
        return super().train(False)  # always frozen, whatever the enclosing module does

    def taps(self, img_B3HW: torch.Tensor) -> list[torch.Tensor]:
        """Unit-normalised features at each tap, each (B, C_t, H_t, W_t) in float32."""
        h = ((img_B3HW + 1) / 2 - self.mean_13) / self.std_13
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in TAP_INDICES:
                f = h.float()
                out.append(f / (f.square().sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        B = x_B3HW.shape[0]
        taps = self.taps(torch.cat([x_B3HW, y_B3HW.detach()]))  # one pass over both images
        terms = [(f[:B] - f[B:]).square().sum(1).mean() for f in taps]
        return torch.stack(terms).mean()

    def load_weights(self, path: str | Path) -> VGGPerceptual:
        """Load a local torchvision vgg16 state dict (or its ``features.*`` keys); UserError if it does not fit."""
        self.features.load_state_dict(features_state_dict(path, self.features))
        return self


def _read(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"{WEIGHTS_KEY}: file '{path}' does not exist; give a local torchvision vgg16 state dict "
                        "(vgg16-397923af.pth, or only its features.* keys); nothing is downloaded")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, not a torch file ...
        raise UserError(f"{WEIGHTS_KEY}: cannot read '{path}': {err}") from err
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{WEIGHTS_KEY}: '{path}' does not hold a state dict of tensors")
    return obj


def features_state_dict(path: str | Path, features: nn.Sequential) -> dict[str, torch.Tensor]:
    """The entries of ``features`` from the file at ``path`` (``features.N.*`` or bare ``N.*`` keys)."""
    path = Path(path)
    sd = _read(path)
    prefixed = {k[len("features."):]: v for k, v in sd.items() if k.startswith("features.")}
    sd = prefixed or sd
    out = {}
    for key, want in features.state_dict().items():
        if key not in sd:
            raise UserError(f"{WEIGHTS_KEY}: '{path}' has no key 'features.{key}' (nor '{key}'): "
                            "expected a torchvision vgg16 state dict or its features.* keys")
        if sd[key].shape != want.shape:
            raise UserError(f"{WEIGHTS_KEY}: '{path}': 'features.{key}' has shape {tuple(sd[key].shape)}, "
                            f"VGG16 needs {tuple(want.shape)}")
        out[key] = sd[key]
    return out


def load_perceptual(path: str | Path, num_layers: int = 5) -> VGGPerceptual:
    return VGGPerceptual(num_layers).load_weights(path)


def save_standin_weights(path: str | Path, num_layers: int = 5, seed: int = 0) -> Path:
    """Seeded random VGG16 features (torchvision's init) as ``features.*`` keys: tests and offline demos only."""
    gen = torch.Generator().manual_seed(seed)
    features = vgg16_features(num_layers)
    for m in features:
        if isinstance(m, nn.Conv2d):
            std = (2.0 / (m.out_channels * 9)) ** 0.5  # kaiming normal, fan_out, relu: as VGG.__init__
            m.weight.data = torch.randn(m.weight.shape, generator=gen) * std
            nn.init.zeros_(m.bias)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    return path

