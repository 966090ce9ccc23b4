"""The attention-pattern registry: complete, consistent, and what the model code asks."""
import dataclasses
from typing import get_args

import pytest
import torch

from mvar.models.attention import AttentionSpec, attended_pairs, scale_groups, sequence_mask
from mvar.models.config import PATTERNS as CONFIG_PATTERNS
from mvar.models.patterns import MASKS, PATTERN_INFO, PATTERNS, SCHEDULES, Pattern, pattern_info
from mvar.models.schedule import ScaleSchedule
from mvar.training.config import LoopConfig

PATCH_NUMS = (1, 2, 3, 4, 5, 6)


def spec(pattern: str) -> AttentionSpec:
    return AttentionSpec(pattern, PATCH_NUMS, 3, 4, "reference")


def test_the_registry_names_the_config_type_and_its_fields_hold_known_values():
    assert PATTERNS == get_args(Pattern) == CONFIG_PATTERNS
    assert set(SCHEDULES) == set(get_args(ScaleSchedule))
    for name, info in PATTERN_INFO.items():
        assert info.name == name and info.summary and info.pairs
        assert info.mask in MASKS and info.default_schedule in info.schedules and set(info.schedules) <= set(SCHEDULES)
        assert LoopConfig().schedule_for(name) == info.default_schedule
        assert info.sampling == ("kv_cache" if info.kv_cache else "per_scale")
    with pytest.raises(KeyError, match="unknown attention pattern 'foo'; known: var, scale_markov, mvar"):
        pattern_info("foo")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_masks_follow_the_entry_and_attended_pairs_count_the_mask(pattern):
    info, s = pattern_info(pattern), spec(pattern)
    scales = tuple(range(len(PATCH_NUMS)))
    mask = sequence_mask(s, scales)
    first, second = PATCH_NUMS[0] ** 2, PATCH_NUMS[1] ** 2
    # the second scale's tokens see the first scale's under a block-causal mask only
    assert bool(mask[first:first + second, :first].any()) == (info.mask == "block_causal")
    windowed = [si for si in scales if s.windowed(si)]
    assert bool(windowed) == info.windowed and all(si >= s.markov_from_scale for si in windowed)
    assert attended_pairs(s, scales) == int(mask.sum())  # the FLOP count is the mask's
    assert attended_pairs(s, scales, cached_prefix=7) - attended_pairs(s, scales) == (7 * mask.shape[0]
                                                                                       if info.kv_cache else 0)


def test_a_new_entry_is_all_a_pattern_with_known_behaviour_needs(monkeypatch):
    monkeypatch.setitem(PATTERN_INFO, "dense_markov", dataclasses.replace(PATTERN_INFO["scale_markov"],
                                                                          name="dense_markov"))
    scales = tuple(range(len(PATCH_NUMS)))
    new, old = spec("dense_markov"), spec("scale_markov")
    assert torch.equal(sequence_mask(new, scales), sequence_mask(old, scales))
    assert scale_groups(new, scales) == scale_groups(old, scales)
    assert attended_pairs(new, scales) == attended_pairs(old, scales)
    assert LoopConfig().schedule_for("dense_markov") == "cycle"
