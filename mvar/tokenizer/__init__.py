"""Multi-scale residual VQ tokenizer, compatible with VAR's released weights."""
from mvar.tokenizer.config import PATCH_NUMS_256, PATCH_NUMS_512, TOKENIZER_SIZES, TokenizerConfig
from mvar.tokenizer.quantizer import phi_index_map
from mvar.tokenizer.vqvae import MultiScaleVQVAE, TokenizerLosses

__all__ = ["TokenizerConfig", "MultiScaleVQVAE", "TokenizerLosses", "TOKENIZER_SIZES",
           "PATCH_NUMS_256", "PATCH_NUMS_512", "phi_index_map"]
