"""Configuration of the tokenizer-training pieces that live beside the model: the codebook's upkeep
(`CodebookConfig`: data-dependent initialisation, dead-code restarts, the usage warning) and the
adversarial loss (`GanConfig`). The tokenizer trainer nests them as `codebook.*` and `gan.*`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from mvar.config import check


@dataclass
class CodebookConfig:
    """The `codebook.*` keys."""

    # before the first step, codes are picked from the residuals of the first batches, scale by scale:
    # kmeans++ (D^2 sampling, then `init_iters` Lloyd steps per scale), random (uniform picks), or none
    # (the module's N(0, 1) init, which a fresh encoder's small features collapse onto one code)
    init: Literal["kmeans++", "random", "none"] = "kmeans++"
    init_batches: int = 4          # batches of this rank whose encoder features feed the initialisation
    init_iters: int = 0            # Lloyd iterations over each scale's new codes (0 = seeding only)
    # every `restart_every` steps (0 = never) a code that no scale used more than `restart_below` x its
    # uniform share (tokens of that scale / V) in the window is re-seeded from the current residuals
    restart_every: int = 0
    restart_below: float = 0.03
    restart_until: int = 0         # no restarts from this step on (0 = to the end): let the codebook settle
    warn_usage_below: float = 0.1  # warn when a scale uses fewer codes than this x min(V, its tokens)
    seed: int = 0

    def validate(self, prefix: str = "") -> None:
        p = prefix
        check(self.init in ("kmeans++", "random", "none"), p + "init", "must be kmeans++, random or none")
        check(self.init_batches >= 1, p + "init_batches", "must be >= 1")
        check(self.init_iters >= 0, p + "init_iters", "must be >= 0")
        check(self.restart_every >= 0, p + "restart_every", "must be >= 0 (0 = no restarts)")
        check(0 < self.restart_below <= 1, p + "restart_below", "must lie in (0, 1]: a share of the uniform hit count")
        check(self.restart_until >= 0, p + "restart_until", "must be >= 0 (0 = to the end)")
        check(0 <= self.warn_usage_below <= 1, p + "warn_usage_below", "must lie in [0, 1]")

    def restart_due(self, done: int) -> bool:
        """True after step ``done`` (1-based count of finished steps) when a restart check runs."""
        if not self.restart_every or done % self.restart_every:
            return False
        return not self.restart_until or done < self.restart_until


@dataclass
class GanConfig:
    """The `gan.*` keys: a patch discriminator with a hinge loss, weighted as VQGAN does."""

    weight: float = 0.0            # 0 = no adversarial loss; VQGAN's disc_weight
    start_step: int = 0            # the loss (and the discriminator's training) starts here
    ramp_steps: int = 0            # linear ramp of the weight over this many steps after start_step
    adaptive: bool = True          # VQGAN's adaptive weight: |grad rec| / |grad gan| at the decoder's last layer
    adaptive_max: float = 1e4      # clamp of that ratio
    channels: int = 32             # discriminator width of the first layer (doubling per layer, at most 8x)
    num_layers: int = 3            # stride-2 layers: the patch each logit sees grows with it
    lr: float = 0.0                # discriminator learning rate; 0 = the tokenizer's peak lr
    betas: tuple[float, float] = (0.5, 0.9)  # Adam betas of the discriminator (VQGAN's)

    def validate(self, prefix: str = "") -> None:
        p = prefix
        check(self.weight >= 0, p + "weight", "must be >= 0 (0 turns the adversarial loss off)")
        check(self.start_step >= 0, p + "start_step", "must be >= 0")
        check(self.ramp_steps >= 0, p + "ramp_steps", "must be >= 0")
        check(self.adaptive_max > 0, p + "adaptive_max", "must be > 0")
        check(self.channels >= 8 and self.channels % 8 == 0, p + "channels", "must be a positive multiple of 8")
        check(1 <= self.num_layers <= 5, p + "num_layers", "must lie in 1..5")
        check(self.lr >= 0, p + "lr", "must be >= 0 (0 = the tokenizer's peak lr)")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), p + "betas", "two values in [0, 1)")

    @property
    def enabled(self) -> bool:
        return self.weight > 0

    def weight_at(self, step: int) -> float:
        """The adversarial loss weight at 0-based ``step``: 0 before ``start_step``, then ``weight``
        (reached linearly over ``ramp_steps`` when given)."""
        if not self.enabled or step < self.start_step:
            return 0.0
        if self.ramp_steps:
            return self.weight * min(1.0, (step - self.start_step + 1) / self.ramp_steps)
        return self.weight
