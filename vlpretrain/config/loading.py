"""Building a ``Config``: YAML files (``include:`` composes files, later keys win; a key repeated in one
mapping is an error) plus ``--set key=value`` overrides, coerced field by field against the schema's types
(unknown keys and wrong types name the key), then ``rules.validate``.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from vlpretrain.config.rules import ConfigError, validate
from vlpretrain.config.schema import Config


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` (no dot) as a float, as people write learning rates."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"))


def _yaml_load(text: str, where: str, prefix: str = ""):
    """Parse YAML with ``_Loader``; a key repeated in one mapping is an error (yaml keeps the last silently)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_duplicate_keys(node, where, prefix, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _check_duplicate_keys(node: yaml.Node, where: str, prefix: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias: already checked (and recursive anchors terminate)
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for k, v in node.value:
            if k.tag == "tag:yaml.org,2002:merge" or not isinstance(k, yaml.ScalarNode):
                continue  # ``<<: *base`` merges may be overridden by design
            key = f"{prefix}.{k.value}" if prefix else str(k.value)
            if k.value in lines:
                line = k.start_mark.line + 1
                at = f"line {line}" if line == lines[k.value] else f"lines {lines[k.value]} and {line}"
                raise ConfigError(f"config error: {where}: duplicate key '{key}' ({at})")
            lines[k.value] = k.start_mark.line + 1
            _check_duplicate_keys(v, where, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _check_duplicate_keys(v, where, f"{prefix}[{i}]", seen)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list[{_type_name(typing.get_args(tp)[0])}]"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config error: {key}: expected a mapping, got {type(value).__name__}")
        return build_dataclass(tp, value, key)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise ConfigError(f"config error: {key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"config error: {key}: expected a finite number, got {value!r}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is bool or tp is str:
        if isinstance(value, tp):
            return value
    else:  # pragma: no cover - a field type this module does not know
        raise TypeError(f"unsupported config field type {tp!r} for {key}")
    raise ConfigError(f"config error: {key}: expected {_type_name(tp)}, got {value!r}")


def build_dataclass(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise ConfigError(f"config error: unknown key '{key}'")
        kwargs[k] = _coerce(v, hints[k], key)
    return cls(**kwargs)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}" if mark is not None else problem


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if not path.is_file():
        where = f" (included from {seen[-1]})" if seen else ""
        raise ConfigError(f"config error: file not found: {path}{where}")
    if path in seen:
        raise ConfigError(f"config error: include cycle at {path}")
    try:
        data = _yaml_load(path.read_text(), str(path))
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: {path}: invalid YAML ({_yaml_error(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config error: {path}: cannot read ({type(e).__name__}: {e})") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config error: {path}: top level must be a mapping, got {type(data).__name__}")
    includes = data.pop("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) and i for i in includes):
        raise ConfigError(f"config error: {path}: include must be a file name or a list of file names, "
                          f"got {includes!r}")
    merged: dict = {}
    for inc in includes:
        merged = _deep_merge(merged, _read_yaml(path.parent / inc, seen + (path,)))
    return _deep_merge(merged, data)


def parse_overrides(overrides: list[str]) -> dict:
    """``["train.lr=1e-4", "parallel.tp=2"]`` -> nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"config error: override '{item}' is not of the form key=value")
        key, raw = item.split("=", 1)
        try:
            value = _yaml_load(raw, f"override '{key}'", key.strip()) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config error: override '{key}' conflicts with another override")
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_yaml(Path(path)) if path else {}
    data = _deep_merge(data, parse_overrides(overrides or []))
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = build_dataclass(Config, data)
    validate(cfg)
    return cfg
