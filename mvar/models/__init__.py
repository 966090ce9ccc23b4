"""The next-scale transformer (VAR, scale-Markov, MVAR) and its attention backends.

The names below load lazily, so that `mvar.models.config` (the config, the size registry) and
`mvar.models.patterns` (the pattern registry) can be imported without torch.
"""
from __future__ import annotations

from mvar.lazy import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "mvar.models.attention": ["AttentionSpec", "attend", "window_attention"],
    "mvar.models.config": ["ModelConfig", "SIZES", "model_names", "named_model", "tokenizer_for"],
    "mvar.models.patterns": ["PATTERNS", "PATTERN_INFO", "PatternInfo", "pattern_info"],
    "mvar.models.transformer": ["NextScaleTransformer"],
})
