"""YAML -> frozen dataclasses: type conversion against annotations, numeric bounds from field metadata, unknown and
missing keys, deep merge and dotted overrides; every error names the key path (`params.yaml: runs.x.train.lr ...`).
Imports neither torch nor any model package."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal

from diffusion.errors import UserError


class ConfigError(UserError, ValueError):
    """A params.yaml value is missing, unknown, mistyped or out of range; the message names the key path."""


def _range(ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    return {"ge": ge, "gt": gt, "le": le, "lt": lt}


def bounded(ge=None, gt=None, le=None, lt=None, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field (required unless `default` is given) whose numeric value must lie in the given range."""
    return field(default=default, metadata=_range(ge, gt, le, lt))


def check_ranges(obj: Any, path: str) -> None:
    """Every bounded numeric field of a dataclass instance lies in its range (ConfigError naming path.field); for
    configs built in code and then overridden field by field (model presets)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata and isinstance(value, int | float) and not isinstance(value, bool):
            _check_range(f"{path}.{f.name}", value, f.metadata)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {[f.name for f in dataclasses.fields(tp)]}"
    return getattr(tp, "__name__", str(tp))


def _check_range(path: str, value: float, meta: Mapping[str, Any]) -> None:
    bounds = {k: meta.get(k) for k in ("ge", "gt", "le", "lt") if meta.get(k) is not None}
    ok = all(
        {"ge": value >= b, "gt": value > b, "le": value <= b, "lt": value < b}[k] for k, b in bounds.items()
    )
    if not ok:
        words = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
        allowed = " and ".join(f"{words[k]} {b}" for k, b in bounds.items())
        raise ConfigError(f"params.yaml: {path} must be {allowed}, got {value!r}")


def convert(tp: Any, value: Any, path: str) -> Any:
    """Check `value` against the type annotation `tp` and build it (dataclasses recursively)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        allowed = typing.get_args(tp)
        # bool is an int in Python: `True` must not pass for Literal[1, 3].
        if isinstance(value, bool) or value not in allowed:
            raise ConfigError(f"params.yaml: {path} must be {_describe(tp)}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return convert(arg, value, path)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"params.yaml: {path} must be one of {args}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, path)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"params.yaml: {path} must be a mapping, got {type(value).__name__} {value!r}")
        _, val_tp = typing.get_args(tp)
        return {str(k): convert(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"params.yaml: {path} must be a list, got {value!r}")
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(convert(args[0], v, f"{path}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"params.yaml: {path} must have {len(args)} items, got {len(value)}")
        return tuple(convert(a, v, f"{path}[{i}]") for i, (a, v) in enumerate(zip(args, value, strict=True)))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"params.yaml: {path} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"params.yaml: {path} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"params.yaml: {path} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"params.yaml: {path} must be a string, got {value!r}")
        return value
    raise TypeError(f"config type {tp!r} at {path} is not supported")


def build_dataclass(cls: type, raw: Any, path: str, extra: Mapping[str, Any] | None = None) -> Any:
    """Build a frozen dataclass from a mapping, rejecting unknown and missing keys by their path."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"params.yaml: {path} must be {_describe(cls)}, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prebuilt = dict(extra or {})  # values already typed by the caller (e.g. a run's DatasetConfig)
    given = dict(raw) | prebuilt
    unknown = sorted(set(given) - set(fields))
    if unknown:
        raise ConfigError(
            f"params.yaml: unknown key {path}.{unknown[0]}; allowed keys under {path} are {sorted(fields)}"
        )
    missing = [name for name, f in fields.items() if name not in given and not _has_default(f)]
    if missing:
        raise ConfigError(f"params.yaml: missing key {path}.{missing[0]} ({_describe(hints[missing[0]])})")
    values = {}
    for name, f in fields.items():
        sub = f"{path}.{name}"
        if name not in given:  # an optional key left out: the dataclass default
            continue
        if name in prebuilt:
            values[name] = prebuilt[name]
            continue
        value = convert(hints[name], given[name], sub)
        if f.metadata and isinstance(value, int | float) and not isinstance(value, bool):
            _check_range(sub, value, f.metadata)
        values[name] = value
    try:
        return cls(**values)
    except ConfigError as err:
        raise ConfigError(f"params.yaml: {path}: {err}") from None


def _has_default(f: dataclasses.Field) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """`over` wins; mappings merge key by key (except `overrides`, which replaces as a whole)."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) and key != "overrides":
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def unshared(obj: Any) -> Any:
    """A deep copy of YAML data as plain dicts and lists: nothing shared, not even what YAML anchors made one object."""
    if isinstance(obj, Mapping):
        return {k: unshared(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [unshared(v) for v in obj]
    return obj


def set_dotted(raw: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `raw` with each dotted key (`runs.rin_fmnist.train.steps`) set; missing mappings on the way are
    created. The copy shares nothing with `raw`, so a key set under one run changes no other."""
    out = unshared(raw)
    for dotted, value in overrides.items():
        keys = dotted.split(".")
        if not all(keys):
            raise ConfigError(f"override {dotted!r}: empty key part; write e.g. runs.rin_fmnist.train.steps")
        node = out
        for i, key in enumerate(keys[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {dotted!r}: params.yaml {'.'.join(keys[: i + 1])} is "
                                  f"{type(child).__name__} {child!r}, not a mapping")
            node = child
        node[keys[-1]] = unshared(value)
    return out
