"""docs/config.md is what the dataclasses say today."""
from pathlib import Path

from mvar.config_reference import render

DOC = Path(__file__).resolve().parents[1] / "docs" / "config.md"


def test_config_reference_is_current():
    assert DOC.read_text() == render(), "regenerate: python -m mvar.config_reference > docs/config.md"


def test_reference_lists_the_keys_people_sweep():
    text = render()
    for key in ("`model.window_size`", "`model.depth`", "`model.attention`", "`run.steps`", "`scaling.num_workers`",
                "`tracking.uri`", "`data.shards`"):
        assert key in text
