"""Config merge: component defaults < the method's defaults < preset < YAML file < `key=value`.

Keys are flat (`base_lr`) or dotted (`optim.base_lr`), and YAML files may nest them under
their component (`optim: {base_lr: 0.1}`). Every key is checked against the composed
dataclasses (fastssl.config), so a typo or a key given twice is an error rather than a
silently ignored setting; values are converted to the field's type here and checked against
their ranges by the dataclasses themselves."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from fastssl.config import (
    MethodConfig,
    TrainConfig,
    components,
    field_types,
    key_index,
    range_text,
)
from fastssl.engine.checkpoint import write_text_atomic

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}
# Flat keys of run folders written before the composed layout, and their names today.
OLD_KEYS = {"data": "source", "data_backend": "loader", "local_crops": "n_local_crops",
            "local_size": "local_crop_size"}


def _convert(key: str, value: Any, annotation: Any) -> Any:
    """Convert `value` (a YAML scalar or a CLI string) to the field's annotated type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _convert(key, value, args[0])
    if origin is dict:
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value) if value.strip() else {}
            except yaml.YAMLError:
                value = None
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise ValueError(f"config key {key!r}: expected a mapping such as {{name: value, ...}}, "
                             f"got {value!r}")
        # lists as tuples: a preset's, a YAML file's and a saved config's mapping compare equal
        return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}
    if origin is tuple:
        items = value.strip("()[] ").split(",") if isinstance(value, str) else list(value)
        elem = typing.get_args(annotation)
        if len(elem) == 2 and elem[1] is Ellipsis:
            elem = (elem[0],) * len(items)
        if len(items) != len(elem):
            raise ValueError(f"config key {key!r}: expected {len(elem)} comma-separated values, "
                             f"got {value!r}")
        items = [v.strip() if isinstance(v, str) else v for v in items]
        return tuple(_convert(key, v, t) for v, t in zip(items, elem))
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
    except (TypeError, ValueError, OverflowError):
        pass
    else:
        return value
    type_name = getattr(annotation, "__name__", annotation)
    raise ValueError(f"config key {key!r}: expected a value of type {type_name}, got {value!r}")


def parse_overrides(items: list[str]) -> dict[str, str]:
    """['base_lr=0.1', 'fused=false'] -> {'base_lr': '0.1', 'fused': 'false'}; a key given twice
    is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r}: expected key=value")
        if key.strip() in out:
            raise ValueError(f"override {key.strip()!r}: given twice ({key.strip()}={out[key.strip()]} and "
                             f"{item.strip()}); give it once")
        out[key.strip()] = value.strip()
    return out


def _flatten(where: str, layer: dict, index: dict, method: str) -> dict[str, Any]:
    """A layer's keys as flat field names: `optim.base_lr` and YAML's `optim: {base_lr: ...}`
    become `base_lr`; unknown keys and a field given twice are errors naming `where`."""
    flat: dict[str, Any] = {}

    def put(key: str, name: str, value: Any) -> None:
        if name not in index:
            if name in ("method", "name"):
                raise ValueError(f"{where}: {key!r} is not a key: choose the method with --method")
            raise ValueError(f"{where}: unknown key {key!r}; valid keys: {', '.join(sorted(index))}")
        if name in flat:
            raise ValueError(f"{where}: key {name!r} given twice; give it once")
        flat[name] = value

    comps = set(components(MethodConfig))
    for key, value in layer.items():
        if key in comps and isinstance(value, dict):
            for sub, v in value.items():
                if key == "method" and sub == "name":
                    if v != method:
                        raise ValueError(f"{where}: method.name {v!r} is not this run's method {method!r}; "
                                         f"choose the method with --method")
                    continue
                _check_component(where, f"{key}.{sub}", key, index.get(sub))
                put(f"{key}.{sub}", sub, v)
            continue
        comp, dot, name = str(key).rpartition(".")
        if dot:
            _check_component(where, key, comp, index.get(name))
        put(key, name if dot else key, value)
    return flat


def _check_component(where: str, key: str, comp: str, entry: tuple | None) -> None:
    if entry is not None and entry[0] != comp:
        raise ValueError(f"{where}: key {key!r}: {key.rsplit('.', 1)[1]} belongs to {entry[0]}, "
                         f"not {comp}")


def resolve_config(method_class: type[MethodConfig], yaml_path: str | Path | None = None,
                   overrides: dict[str, Any] | None = None, preset: dict[str, Any] | None = None
                   ) -> TrainConfig:
    """The TrainConfig of a run of the method whose own fields are `method_class`: the
    components' defaults, the method's `defaults`, `preset` (a named configuration such as
    the demo's), the YAML file's keys, then `overrides`.

    Unknown keys raise ValueError naming the key and listing the valid ones; values are
    converted to each field's annotated type, then each component checks its ranges."""
    index = key_index(method_class)
    layers: list[tuple[str, dict]] = [(f"{method_class.__name__}.defaults", method_class.defaults),
                                      ("preset", dict(preset or {}))]
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            raise ValueError(f"config file: expected an existing YAML file, got {str(path)!r}")
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {str(path)!r}: expected a mapping of key: value, "
                             f"got {type(loaded).__name__}")
        layers.append((f"config file {str(path)!r}", loaded))
    layers.append(("override", dict(overrides or {})))
    values: dict[str, Any] = {}
    user: set[str] = set()
    for where, layer in layers:
        flat = _flatten(where, layer, index, method_class.name)
        if layer is not method_class.defaults:
            user.update(flat)
        for name, value in flat.items():
            comp = index[name][0]
            try:
                values[name] = _convert(name, value, field_types(components(method_class)[comp])[name])
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from None
    _fit_default_warmup(values, user, method_class)
    return build_config(method_class, values)


def build_config(method_class: type[MethodConfig], values: dict[str, Any]) -> TrainConfig:
    """TrainConfig from flat, converted field values (the rest keep their defaults)."""
    index = key_index(method_class)
    parts: dict[str, dict[str, Any]] = {comp: {} for comp in components(method_class)}
    for name, value in values.items():
        parts[index[name][0]][name] = value
    return TrainConfig(**{comp: cls(**parts[comp]) for comp, cls in components(method_class).items()})


def _fit_default_warmup(values: dict[str, Any], user: set[str], method_class: type[MethodConfig]) -> None:
    """A warm-up the user never set keeps the paper's share of the paper's run when the run is
    shorter than that warm-up (DINO's 10 of 100 epochs: 0.1 of a 1-epoch run); one the user set
    longer than the run stays an error."""
    if "warmup_epochs" in user or "epochs" not in values:
        return
    warmup = values.get("warmup_epochs", 0.0)
    paper_epochs = method_class.defaults.get("epochs", 100)
    if warmup > values["epochs"]:
        values["warmup_epochs"] = warmup / paper_epochs * values["epochs"]


def flat_config(saved: dict[str, Any]) -> dict[str, Any]:
    """Flat {field: value} of a saved config: the nested layout (config.yaml, a checkpoint's
    "config"), or the flat layout of older run folders with their key names mapped to today's
    (OLD_KEYS); the method's name (`method`) is dropped."""
    flat: dict[str, Any] = {}
    for key, value in saved.items():
        if key == "method":
            if isinstance(value, dict):
                flat.update({k: v for k, v in value.items() if k != "name"})
            continue
        if isinstance(value, dict) and key in components(MethodConfig):
            flat.update(value)
        else:
            flat[OLD_KEYS.get(key, key)] = value
    return flat


def saved_method_name(saved: dict[str, Any]) -> str | None:
    """The method name a saved config records (nested: method.name; flat: method)."""
    value = saved.get("method")
    return value.get("name") if isinstance(value, dict) else value


def load_config(method_class: type[MethodConfig], saved: dict[str, Any], where: str = "saved config"
                ) -> TrainConfig:
    """A TrainConfig from a saved config (either layout), or a ValueError that says how to
    convert it."""
    flat = flat_config(saved)
    unknown = sorted(set(flat) - set(key_index(method_class)))
    if unknown:
        raise ValueError(f"{where}: keys {unknown} are not {method_class.name} keys; edit them out of its "
                         f"config.yaml (fastssl train --method {method_class.name} --print-config shows "
                         f"today's layout)")
    return resolve_config(method_class, None, flat)


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping key given twice (SafeLoader keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice; give it once", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, with errors as one line naming the file, line and column."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"config file {str(path)!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                         f"on line {line})") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {str(path)!r}{where}: not valid YAML ({problem})") from None


def describe_fields(method_class: type[MethodConfig]) -> list[tuple[str, str, Any, str, str]]:
    """(component, key, default, allowed values, meaning) of every settable key, the
    method's defaults applied, from the fields' `setting` records."""
    cfg = resolve_config(method_class)
    return [(comp, name, getattr(getattr(cfg, comp), name), range_text(f), f.metadata.get("help", ""))
            for name, (comp, f) in key_index(method_class).items()]


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return list(v) if isinstance(v, tuple) else v


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) that YAML and JSON can hold: one mapping per
    component, the method's with its `name`."""
    out = {}
    for f in dataclasses.fields(cfg):
        part = getattr(cfg, f.name)
        out[f.name] = {g.name: _plain(getattr(part, g.name)) for g in dataclasses.fields(part)}
    out["method"] = {"name": cfg.method.name, **out["method"]}
    return out


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as nested YAML (loadable again with resolve_config)."""
    write_text_atomic(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
