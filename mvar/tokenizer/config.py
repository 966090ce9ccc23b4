"""Tokenizer configuration and its named sizes."""
from __future__ import annotations

from dataclasses import dataclass, replace

from mvar.config import check

# Token-map sides of VAR's released tokenizer, per image resolution.
PATCH_NUMS_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PATCH_NUMS_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


@dataclass
class TokenizerConfig:
    """Multi-scale residual VQ autoencoder. Defaults are VAR's `vae_ch160v4096z32`."""

    image_size: int = 256
    vocab_size: int = 4096
    z_channels: int = 32          # Cvae: width of the latent and of each code vector
    ch: int = 160                 # base width of encoder and decoder
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    patch_nums: tuple[int, ...] = PATCH_NUMS_256
    share_quant_resi: int = 4     # number of phi convs shared across the scales
    quant_resi: float = 0.5       # phi(h) = (1 - r) h + r conv(h)
    beta: float = 0.25            # commitment weight of the VQ loss
    dropout: float = 0.0
    norm_groups: int = 32         # GroupNorm groups in encoder and decoder (VAR: 32); every width must divide
    znorm: bool = False           # cosine code lookup (VAR's using_znorm); off in VAR's released tokenizer

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)

    def validate(self, prefix: str = "") -> None:
        p = prefix
        check(self.vocab_size >= 2, p + "vocab_size", "must be at least 2")
        check(self.z_channels >= 1, p + "z_channels", "must be positive")
        check(self.norm_groups >= 1, p + "norm_groups", "must be >= 1")
        check(self.ch > 0 and self.ch % self.norm_groups == 0, p + "ch",
              f"must be a positive multiple of norm_groups ({self.norm_groups}): GroupNorm splits the widths into groups")
        check(len(self.ch_mult) >= 1 and all(m > 0 for m in self.ch_mult), p + "ch_mult", "must be a non-empty list of positive ints")
        check(self.num_res_blocks >= 1, p + "num_res_blocks", "must be at least 1")
        check(len(self.patch_nums) >= 2, p + "patch_nums", "needs at least 2 scales")
        check(all(a < b for a, b in zip(self.patch_nums, self.patch_nums[1:])) and self.patch_nums[0] >= 1,
              p + "patch_nums", f"must be strictly increasing positive ints, got {list(self.patch_nums)}")
        check(self.image_size % self.downsample == 0 and self.patch_nums[-1] == self.latent_size,
              p + "patch_nums",
              f"the last scale ({self.patch_nums[-1]}) must equal image_size / {self.downsample} "
              f"(= {self.image_size / self.downsample:g}) for image_size {self.image_size} and ch_mult {list(self.ch_mult)}")
        check(self.share_quant_resi >= 1, p + "share_quant_resi",
              "must be >= 1 (VAR's released tokenizer uses 4; one phi per scale: set it to len(patch_nums))")
        check(0.0 <= self.quant_resi <= 1.0, p + "quant_resi", "must lie in [0, 1]")

    @classmethod
    def named(cls, name: str) -> "TokenizerConfig":
        if name not in TOKENIZER_SIZES:
            raise KeyError(f"unknown tokenizer size '{name}'; known: {', '.join(TOKENIZER_SIZES)}")
        return replace(TOKENIZER_SIZES[name])

    @classmethod
    def tiny(cls) -> "TokenizerConfig":
        return cls.named("vae-tiny")


TOKENIZER_SIZES: dict[str, TokenizerConfig] = {
    # VAR's released tokenizer (vae_ch160v4096z32.pth)
    "vae-ch160": TokenizerConfig(),
    "vae-ch160-512": TokenizerConfig(image_size=512, patch_nums=PATCH_NUMS_512),
    # the authors' conformance model: 64 px, 4 scales
    "vae-tiny": TokenizerConfig(image_size=64, vocab_size=32, z_channels=8, ch=32, patch_nums=(1, 2, 3, 4)),
    # 32 px local runs: 3 down-samplings -> 4x4 latent
    "vae-tiny32": TokenizerConfig(image_size=32, vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 2, 2, 2),
                                  patch_nums=(1, 2, 3, 4)),
    # the quickstart's: 64 px, 3 down-samplings -> 8x8 latent, 7 scales (155 tokens), so that MVAR's
    # window is smaller than the 6x6 and 8x8 maps; 8 norm groups keep colour (32 would be an instance norm)
    "vae-quick": TokenizerConfig(image_size=64, vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2, 2),
                                 num_res_blocks=1, patch_nums=(1, 2, 3, 4, 5, 6, 8), norm_groups=8),
}
