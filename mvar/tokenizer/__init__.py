"""Multi-scale residual VQ tokenizer, compatible with VAR's released weights.

The names below load lazily, so that `mvar.tokenizer.config` (the config, ``TOKENIZER_SIZES``) can be
imported without torch.
"""
from __future__ import annotations

from mvar.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mvar.tokenizer.config": ["TokenizerConfig", "TOKENIZER_SIZES", "PATCH_NUMS_256", "PATCH_NUMS_512"],
    "mvar.tokenizer.vqvae": ["MultiScaleVQVAE", "TokenizerLosses"],
    "mvar.tokenizer.quantizer": ["phi_index_map"],
})
