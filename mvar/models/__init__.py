"""The next-scale transformer (VAR, scale-Markov, MVAR) and its attention backends.

The names below load lazily, so that `mvar.models.config` (the config, ``PATTERNS``, the size
registry) can be imported without torch.
"""
from __future__ import annotations

from mvar.lazy import lazy_getattr

_EXPORTS = {
    "AttentionSpec": "mvar.models.attention",
    "attend": "mvar.models.attention",
    "window_attention": "mvar.models.attention",
    "ModelConfig": "mvar.models.config",
    "PATTERNS": "mvar.models.config",
    "SIZES": "mvar.models.config",
    "model_names": "mvar.models.config",
    "named_model": "mvar.models.config",
    "tokenizer_for": "mvar.models.config",
    "NextScaleTransformer": "mvar.models.transformer",
}

__all__ = list(_EXPORTS)

__getattr__ = lazy_getattr(__name__, _EXPORTS)
