"""The attention patterns: one entry each, saying what the pattern means to every part that asks.

Torch-free, so that parsers and config checks read it without loading the model. Code that behaves
differently per pattern asks its entry (``pattern_info(name).kv_cache``), never its name; adding a
pattern is an entry here plus the behaviour its fields name (docs/architecture.md, "Adding an
attention pattern").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Pattern = Literal["var", "scale_markov", "mvar"]   # the names, spelled here only (the config's type)
# the masks mvar.models.attention builds: a token sees its own scale and every scale before it
# (block_causal), or its own scale only (own_scale)
MASKS = ("block_causal", "own_scale")
SCHEDULES = ("full", "cycle", "packed")             # train.scale_schedule (mvar.models.schedule)


@dataclass(frozen=True)
class PatternInfo:
    """What a pattern means for masks, the KV cache, the training cycle, sampling and FLOPs."""

    name: str
    summary: str                  # one line for help texts and docs
    mask: str                     # one of MASKS: the mask (and the grouping into attention calls) it builds
    windowed: bool                # scales >= model.markov_from_scale see a window_size x window_size window only
    kv_cache: bool                # sampling keeps the keys and values of earlier scales (the cache)
    default_schedule: str         # what train.scale_schedule=auto means for it
    schedules: tuple[str, ...]    # the train.scale_schedule values it trains with
    pairs: str                    # how attended (query, key) pairs count (attention.attended_pairs, FLOPs)

    @property
    def prefix_only(self) -> bool:
        """Trains only on a prefix 0..n-1 of the scales (a token needs every scale before its own)."""
        return self.mask == "block_causal"

    @property
    def sampling(self) -> str:
        """How a scale is sampled: against the cache of every earlier scale, or from its own input alone."""
        return "kv_cache" if self.kv_cache else "per_scale"


PATTERN_INFO: dict[str, PatternInfo] = {p.name: p for p in (
    PatternInfo("var", "VAR: block-causal, a token sees its scale and every scale before it",
                mask="block_causal", windowed=False, kv_cache=True, default_schedule="full", schedules=("full",),
                pairs="every key of the query's scale and of the scales before it, plus the cached prefix "
                      "when sampling"),
    PatternInfo("scale_markov", "scale-Markov: a token sees its own scale only (bidirectional)",
                mask="own_scale", windowed=False, kv_cache=False, default_schedule="cycle", schedules=SCHEDULES,
                pairs="n^4 per scale of side n"),
    PatternInfo("mvar", "MVAR: scale-Markov, and a k x k window from model.markov_from_scale on",
                mask="own_scale", windowed=True, kv_cache=False, default_schedule="cycle", schedules=SCHEDULES,
                pairs="n^4 per dense scale; on a windowed scale each query's k x k window (clamped inside the map)"),
)}
PATTERNS: tuple[str, ...] = tuple(PATTERN_INFO)


def pattern_info(name: str) -> PatternInfo:
    try:
        return PATTERN_INFO[name]
    except KeyError:
        raise KeyError(f"unknown attention pattern '{name}'; known: {', '.join(PATTERNS)}") from None

