"""Config merge: dataclass defaults < YAML file < `key=value` overrides.

Every key is checked against the method's dataclass, so a typo is an error rather
than a silently ignored setting, and values are converted to the field's type."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from fastssl.methods.base import TrainConfig

C = TypeVar("C", bound=TrainConfig)

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


def _convert(cls: type, key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` (a YAML scalar or a CLI string) to the field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(cls, key, value, args[0])
    if origin is tuple:
        items = value.strip("()[] ").split(",") if isinstance(value, str) else list(value)
        elem = typing.get_args(annotation)
        if len(elem) == 2 and elem[1] is Ellipsis:
            elem = (elem[0],) * len(items)
        if len(items) != len(elem):
            raise ValueError(f"config key {key!r}: expected {len(elem)} comma-separated values, "
                             f"got {value!r}")
        items = [v.strip() if isinstance(v, str) else v for v in items]
        return tuple(_convert(cls, key, v, t) for v, t in zip(items, elem))
    try:
        if annotation is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if annotation is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if annotation is str:
            return str(value)
    except ValueError:
        pass
    else:
        return value
    type_name = getattr(annotation, "__name__", annotation)
    raise ValueError(f"config key {key!r}: expected a value of type {type_name}, got {value!r}")


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['lr=0.1', 'fused=false'] -> {'lr': '0.1', 'fused': 'false'}."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def resolve_config(cls: type[C], yaml_path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, preset: dict[str, Any] | None = None) -> C:
    """Build a `cls` instance: its defaults, then `preset` (a named configuration such as the
    demo's), then the YAML file's keys, then `overrides`.

    Unknown keys (in the file or the overrides) raise ValueError naming the key and
    listing the valid ones; values are converted to each field's annotated type."""
    fields = _fields(cls)
    values: dict[str, Any] = {}
    layers: list[tuple[str, dict]] = [("preset", dict(preset or {}))]
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ValueError(f"config file: expected an existing YAML file, got {str(path)!r}")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r}: expected a mapping of key: value, "
                             f"got {type(loaded).__name__}")
        layers.append((f"config file {str(path)!r}", loaded))
    layers.append(("override", dict(overrides or {})))
    for where, layer in layers:
        for key, value in layer.items():
            if key not in fields:
                raise ValueError(f"{where}: unknown key {key!r} for {cls.__name__}; valid keys: "
                                 f"{', '.join(sorted(fields))}")
            values[key] = _convert(cls, key, value, fields[key])
    return cls(**values)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain dict (tuples as lists) that YAML and JSON can hold."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with resolve_config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=True))
