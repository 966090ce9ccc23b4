"""The next-scale transformer (VAR, scale-Markov, MVAR) and its attention backends."""
from mvar.models.attention import AttentionSpec, attend, window_attention
from mvar.models.config import SIZES, ModelConfig, model_names, named_model, tokenizer_for
from mvar.models.transformer import NextScaleTransformer

__all__ = ["AttentionSpec", "attend", "window_attention", "ModelConfig", "SIZES", "model_names",
           "named_model", "tokenizer_for", "NextScaleTransformer"]
