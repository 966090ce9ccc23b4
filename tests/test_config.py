from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from mvar.config import ConfigError, check, describe, flatten, from_dict, load, parse_overrides, replace


@dataclass
class Inner:
    depth: int = 2
    rate: float = 0.5
    kind: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    name: Optional[str] = None

    def validate(self, prefix=""):
        check(self.depth > 0, prefix + "depth", "must be positive")


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    flag: bool = False


def test_defaults_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("inner:\n  depth: 4\n  sizes: [3, 4, 5]\nflag: true\n")
    cfg = load(Outer, f, ["inner.depth=8", "inner.rate=1", "inner.kind=b"])
    assert cfg.inner.depth == 8 and cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)
    assert cfg.inner.sizes == (3, 4, 5) and cfg.flag is True and cfg.inner.kind == "b"


def test_unknown_key_names_the_key_and_the_allowed_ones():
    with pytest.raises(ConfigError, match=r"unknown config key 'inner.dept'.*allowed under 'inner': depth, kind"):
        from_dict(Outer, {"inner": {"dept": 3}})
    with pytest.raises(ConfigError, match="unknown config key 'nope'"):
        load(Outer, None, ["nope=1"])


@pytest.mark.parametrize("override, key", [
    ("inner.depth=abc", "inner.depth"), ("inner.depth=1.5", "inner.depth"), ("flag=3", "flag"),
    ("inner.kind=c", "inner.kind"), ("inner.sizes=[1,x]", r"inner.sizes\[1\]"), ("inner=5", "inner"),
])
def test_wrong_types_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        load(Outer, None, [override])


def test_validate_hook_runs_with_prefix():
    with pytest.raises(ConfigError, match="'inner.depth': must be positive"):
        from_dict(Outer, {"inner": {"depth": 0}})


def test_overrides_parse_and_reject_malformed():
    assert parse_overrides(["a.b=1", "a.c=x,y", "d="]) == {"a": {"b": 1, "c": "x,y"}, "d": ""}
    assert load(Outer, None, ["inner.sizes=7,8"]).inner.sizes == (7, 8)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["novalue"])


def test_missing_file_and_flatten_and_replace(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load(Outer, tmp_path / "missing.yaml")
    cfg = from_dict(Outer)
    flat = flatten(cfg)
    assert flat["inner.depth"] == 2 and flat["flag"] is False and flat["inner.sizes"] == [1, 2]
    assert replace(cfg, ["inner.depth=3"]).inner.depth == 3 and cfg.inner.depth == 2
    keys = [row[0] for row in describe(Outer)]
    assert keys == ["inner.depth", "inner.rate", "inner.kind", "inner.sizes", "inner.name", "flag"]


def test_model_and_tokenizer_configs_validate():
    from mvar.models import ModelConfig, named_model
    from mvar.tokenizer import TokenizerConfig

    with pytest.raises(ConfigError, match="'window_size': must be a positive odd"):
        from_dict(ModelConfig, {"window_size": 4})
    with pytest.raises(ConfigError, match="'num_heads'"):
        from_dict(ModelConfig, {"depth": 3, "embed_dim": 64, "num_heads": 5})
    with pytest.raises(ConfigError, match="'patch_nums'"):
        from_dict(TokenizerConfig, {"image_size": 128})
    assert named_model("mvar-d16").width == 1024 and named_model("var-d30").heads == 30
    with pytest.raises(KeyError, match="unknown model"):
        named_model("mvar-d17")
