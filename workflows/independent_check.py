"""The quickstart's independent check of its class accuracy: a second classifier of another design,
trained on the same training split, asked which class each generator's samples show.

The metrics' classifier (`mvar.metrics.classifier`) sees colour: in this synthetic set most classes
differ by hue, so a colour blob of the right hue passes it. This one sees grey levels only (no hue),
through max-pooled 5x5 convolutions (the metrics' classifier: strided 3x3 blocks, global mean), and
trains on shifted, flipped and blurred crops: to name the class of a sample it must find the shape and
its fill (stripes and dots are finer than the tokenizer keeps at 8x8 codes, so a fill class is the
hardest to pass). It is trained here, in seconds, and never written to a checkpoint.

    python -m workflows.independent_check --train out/quickstart/data/synth \
        --samples out/quickstart/eval/var-seed0/<setting>/samples ...
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mvar.commands import Parser, run_cli


def grey(x_uint8_B3HW: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [-1, 1]: the luma of the images, hue dropped."""
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x_uint8_B3HW.float() / 127.5 - 1).mul(w).sum(1, keepdim=True)


class GreyShapeNet(nn.Module):
    """At 32 px: two 5x5 and one 3x3 convolution, each max-pooled, then a 2x2 max-pooled map (where the parts
    of the shape are) and a linear layer."""

    def __init__(self, num_classes: int, side: int = 32):
        super().__init__()
        self.side = side
        layers, c = [], 1
        for width, k in ((16, 5), (32, 5), (48, 3)):
            layers += [nn.Conv2d(c, width, k, padding=k // 2), nn.GroupNorm(4, width), nn.GELU(), nn.MaxPool2d(2)]
            c = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * 4, num_classes)

    def forward(self, x_B1HW: torch.Tensor) -> torch.Tensor:
        if x_B1HW.shape[-1] != self.side:
            x_B1HW = F.interpolate(x_B1HW, size=(self.side, self.side), mode="area")
        h = F.adaptive_max_pool2d(self.features(x_B1HW), 2)
        return self.head(h.flatten(1))


def jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random flips, shifts of up to 1/8 of the side, and a light blur on half of the batch (the tokenizer's
    reconstructions are smoother than the real images)."""
    B, _, H, W = x.shape
    flip = torch.rand(B, generator=gen) < 0.5
    x = torch.where(flip.view(B, 1, 1, 1), x.flip(-1), x)
    pad = H // 8
    padded = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    dy, dx = torch.randint(0, 2 * pad + 1, (2, B), generator=gen)
    x = torch.stack([padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W] for i in range(B)])
    blur = (torch.rand(B, generator=gen) < 0.5).view(B, 1, 1, 1)
    return torch.where(blur, F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1), x)


def train_grey(x_uint8: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300, seed: int = 0,
               batch: int = 64) -> GreyShapeNet:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = GreyShapeNet(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    x = grey(x_uint8)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(labels), (min(batch, len(labels)),), generator=gen)
        loss = F.cross_entropy(model(jitter(x[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def logits(model: GreyShapeNet, x_uint8: torch.Tensor) -> torch.Tensor:
    return torch.cat([model(grey(xb)) for xb in x_uint8.split(256)])


def per_class_accuracy(model: GreyShapeNet, x_uint8: torch.Tensor, labels: torch.Tensor) -> float:
    """The mean over the classes present of the share of their images named right (eval/class_acc's rule)."""
    from mvar.metrics.fidelity import class_accuracy
    return class_accuracy(logits(model, x_uint8), labels)["class_acc"]


def check(train_split: str, held_out: str, samples: dict[str, str], steps: int = 300) -> dict:
    """{'heldout_acc': of real held-out images, 'samples': {name: accuracy}} with one freshly trained model."""
    from mvar.metrics.classifier import read_labelled
    x, y, names, _ = read_labelled(train_split)
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    model = train_grey(x, y, len(names), steps)
    out = {"model": "GreyShapeNet (luma only, 32 px, 5x5/5x5/3x3 convs with max-pooling)", "train_images": len(y),
           "steps": steps, "seconds": round(time.perf_counter() - t0, 1)}
    if held_out:
        xe, ye, _, _ = read_labelled(held_out)
        out["heldout_acc"] = per_class_accuracy(model, xe, ye)
    out["samples"] = {}
    for name, location in samples.items():
        xs, ys, _, _ = read_labelled(location)
        out["samples"][name] = per_class_accuracy(model, xs, ys)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True, help="the labelled training split (image shards)")
    parser.add_argument("--held-out", default="", help="held-out image shards: the check's own accuracy on real images")
    parser.add_argument("--samples", action="append", default=[], metavar="NAME=SHARDS",
                        help="a generator's labelled sample shards (repeatable)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of the check's classifier")
    parser.add_argument("--json", default="", help="write the result here")

    def run(args) -> int:  # noqa: D401 - the command
        bad = [s for s in args.samples if "=" not in s]
        if bad:
            parser.error(f"argument --samples: expected NAME=SHARDS, got '{bad[0]}'")
        result = check(args.train, args.held_out, dict(s.split("=", 1) for s in args.samples), args.steps)
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps(result, indent=1))
        return 0

    parser.set_defaults(func=run)
    return run_cli(parser, argv)


if __name__ == "__main__":
    sys.exit(main())
