"""Typed configuration: dataclass defaults, then YAML, then `a.b=c` overrides.

Every component keeps its own dataclass beside it (``ModelConfig`` in
``mvar.models``, ``TokenizerConfig`` in ``mvar.tokenizer`` ...); a run config
nests them. This module turns plain data (YAML, command line) into those
dataclasses, checking every key and type on the way, so that a typo fails
before any work starts with a message that names the key and what is allowed.

A dataclass may define ``validate(self, prefix)``: it is called once after
loading (children first) and raises ``ConfigError`` naming ``prefix + field``.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Literal, TypeVar, Union, get_args, get_origin

import yaml

from mvar.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A configuration key is unknown, mistyped or out of range (a UserError: one handler catches both)."""


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it converted."""
    origin = get_origin(tp)
    bad = ConfigError(f"config key '{key}': expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _build(tp, value, key + ".")
    if origin is Literal:
        for allowed in get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return allowed
        raise bad
    if origin in (Union, types.UnionType):
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                if value is None:
                    return None
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError as err:
                errors.append(err)
        raise bad
    if origin in (list, tuple):
        if isinstance(value, str) and "," in value:  # `a.b=1,2,3` on the command line
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise bad
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item_tp = args[0] if args else Any
        items = [_convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    if isinstance(tp, type) and isinstance(value, tp):
        return value
    raise bad


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type[T], data: dict, prefix: str = "") -> T:
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        where = f"under '{prefix[:-1]}'" if prefix else "at the top level"
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; allowed {where}: {', '.join(sorted(fields))}")
    hints = _hints(cls)
    kwargs = {name: _convert(value, hints[name], prefix + name) for name, value in data.items()}
    return cls(**kwargs)


def _validate(obj: Any, prefix: str = "") -> None:
    for f in dataclasses.fields(obj):
        child = getattr(obj, f.name)
        if dataclasses.is_dataclass(child):
            _validate(child, f"{prefix}{f.name}.")
    if hasattr(obj, "validate"):
        obj.validate(prefix)


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (tuples as lists), fit for YAML or JSON."""
    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


def merge(base: dict, update: dict) -> dict:
    """Recursive dict merge; ``update`` wins."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_overrides(overrides: Iterable[str]) -> dict:
    """``["model.depth=16", "data.urls=[a,b]"]`` -> nested dict, values parsed as YAML."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override '{item}' has an empty key part")
        value = yaml.safe_load(raw) if raw.strip() else ""
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}' conflicts with an earlier override")
        node[parts[-1]] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """A config file's mapping; ConfigError naming the file when it is missing, unreadable or not YAML."""
    from mvar.files import read_mapping
    return read_mapping(path, "config file", ConfigError)


def from_dict(cls: type[T], data: dict | None = None, prefix: str = "") -> T:
    """Defaults of ``cls`` overlaid with ``data``; checked and validated. ``prefix`` ('model.'): where ``data``
    sits in its file, so that an error names the key's whole path."""
    cfg = _build(cls, data or {}, prefix)
    _validate(cfg, prefix)
    return cfg


def load(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults, then the YAML file, then command-line overrides; resolved and validated once."""
    data = read_yaml(path) if path else {}
    data = merge(data, parse_overrides(overrides))
    return from_dict(cls, data)


def replace(cfg: T, overrides: Iterable[str]) -> T:
    """A copy of ``cfg`` with dotted overrides applied and re-validated."""
    return from_dict(type(cfg), merge(to_dict(cfg), parse_overrides(overrides)))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"model.depth": 16, ...}``: the names runs log as parameters."""
    data = to_dict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any]]:
    """(key, type, default) for every leaf: the generated config reference."""
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, f"{prefix}{f.name}.")
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = to_dict(f.default_factory())  # type: ignore[misc]
        else:
            default = None
        rows.append((prefix + f.name, _type_name(tp), default))
    return rows


def check(condition: bool, key: str, message: str) -> None:
    """Raise ``ConfigError`` naming ``key`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config key '{key}': {message}")
