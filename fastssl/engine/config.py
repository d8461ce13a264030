"""Config merge: dataclass defaults < preset < YAML file < `key=value` overrides.

Every key is checked against the method's dataclass, so a typo is an error rather
than a silently ignored setting; values are converted to the field's type, then checked
against their allowed ranges (`validate_config`)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Callable
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
        loaded = _read_yaml(path) or {}
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
    cfg = cls(**values)
    validate_config(cfg)
    return cfg


def _read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file, with errors as one line naming the file, line and column."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise ValueError(f"config file {str(path)!r}: not UTF-8 text (byte 0x{e.object[e.start]:02x} "
                         f"on line {line})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file {str(path)!r}{where}: not valid YAML ({problem})") from None


def _positive(x: Any) -> bool:
    return x > 0


def _non_negative(x: Any) -> bool:
    return x >= 0


def _at_least_one(x: Any) -> bool:
    return x >= 1


def _fraction(x: Any) -> bool:          # [0, 1)
    return 0 <= x < 1


def _closed_fraction(x: Any) -> bool:   # [0, 1]
    return 0 <= x <= 1


def _open_fraction(x: Any) -> bool:     # (0, 1)
    return 0 < x < 1


# Allowed values per field name, for every method's config that has the field: (what is
# expected, test). None passes wherever the field's type allows it. Cross-field limits
# (warmups within the run) are in validate_config.
RULES: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "image_size": (">= 1", _at_least_one), "eval_size": (">= 1 (or none)", _at_least_one),
    "epochs": (">= 1", _at_least_one),
    "batch_size": (">= 1", _at_least_one), "base_lr": ("> 0", _positive),
    "lr_batch_divisor": (">= 1", _at_least_one), "min_lr": (">= 0", _non_negative),
    "warmup_epochs": (">= 0", _non_negative), "weight_decay": (">= 0", _non_negative),
    "weight_decay_end": (">= 0", _non_negative), "momentum": ("in [0, 1)", _fraction),
    "betas": ("two values in [0, 1)", lambda b: all(_fraction(x) for x in b)),
    "clip_grad": ("> 0 (or none)", _positive), "clip_grad_per_param": ("> 0 (or none)", _positive),
    "optimizer": ("one of sgd, adamw, lars", lambda x: x in ("sgd", "adamw", "lars")),
    "data_backend": ("one of auto, dali, torchvision", lambda x: x in ("auto", "dali", "torchvision")),
    "data_device": ("one of auto, gpu, cpu", lambda x: x in ("auto", "gpu", "cpu")),
    "num_threads": (">= 1", _at_least_one), "seed": (">= 0", _non_negative),
    "checkpoint_every": (">= 0 (0: at epoch ends only)", _non_negative),
    "log_every": (">= 1", _at_least_one), "max_steps": (">= 0 (or none)", _non_negative),
    "dist_timeout_s": ("> 0", _positive),
    "temperature": ("> 0", _positive), "student_temp": ("> 0", _positive),
    "teacher_temp": ("> 0", _positive), "warmup_teacher_temp": ("> 0", _positive),
    "moco_momentum": ("in [0, 1]", _closed_fraction), "teacher_momentum": ("in [0, 1]", _closed_fraction),
    "center_momentum": ("in [0, 1]", _closed_fraction), "queue_size": (">= 1", _at_least_one),
    "moco_dim": (">= 1", _at_least_one), "mlp_hidden_dim": (">= 1", _at_least_one),
    "projector_layers": (">= 1 (or none)", _at_least_one), "out_dim": (">= 1", _at_least_one),
    "head_hidden_dim": (">= 0", _non_negative), "bottleneck_dim": (">= 1", _at_least_one),
    "local_crops": (">= 0", _non_negative), "local_size": (">= 1", _at_least_one),
    "warmup_teacher_temp_epochs": (">= 0", _non_negative),
    "freeze_last_layer_epochs": (">= 0", _non_negative),
    "teacher_centering": ("one of center, sinkhorn_knopp", lambda x: x in ("center", "sinkhorn_knopp")),
    "drop_path_rate": ("in [0, 1)", _fraction), "mask_ratio": ("in (0, 1)", _open_fraction),
    "decoder_dim": (">= 1", _at_least_one), "decoder_depth": (">= 1", _at_least_one),
    "decoder_heads": (">= 1", _at_least_one), "vit_depth": (">= 1 (or none)", _at_least_one),
    "bn_splits": (">= 1", _at_least_one), "label_noise": ("in [0, 1]", _closed_fraction),
    "num_classes": (">= 1", _at_least_one), "rare_threshold": (">= 0 (or none)", _non_negative),
    "rare_factor": ("> 0", _positive),
    "crop_scale": ("0 < min <= max <= 1", lambda s: 0 < s[0] <= s[1] <= 1),
}


def validate_config(cfg: TrainConfig) -> None:
    """Raise ValueError naming the first field whose value is outside its allowed range
    (RULES, NaN never allowed), or a warmup longer than the run."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if isinstance(value, float) and math.isnan(value):
            raise ValueError(f"{f.name}: expected a number, got nan")
        if value is None or f.name not in RULES:
            continue
        expected, ok = RULES[f.name]
        if not ok(value):
            raise ValueError(f"{f.name}: expected {expected}, got {value!r}")
    if cfg.eval_size not in (None, cfg.image_size):
        from fastssl.models.backbones import is_vit_name

        if is_vit_name(cfg.backbone):
            raise ValueError(f"eval_size: a ViT's position embedding is built for image_size "
                             f"({cfg.image_size}); expected none or {cfg.image_size}, got {cfg.eval_size}")
    if cfg.views:
        from fastssl.data.recipes import check_view_overrides

        check_view_overrides(cfg.views)
    for name in ("warmup_epochs", "warmup_teacher_temp_epochs", "freeze_last_layer_epochs"):
        value = getattr(cfg, name, None)
        if value is not None and value > cfg.epochs:
            raise ValueError(f"{name}: expected <= epochs ({cfg.epochs}), got {value!r}")


# Meanings of method keys whose dataclass line carries no comment (a comment there wins).
MEANINGS = {
    "bottleneck_dim": "DINO head: width before the prototypes",
    "center_momentum": "EMA of the teacher center",
    "crop_scale": "random resized crop's area range", "decoder_depth": "MAE decoder blocks",
    "decoder_dim": "MAE decoder width", "decoder_heads": "MAE decoder attention heads",
    "freeze_last_layer_epochs": "epochs the DINO head's last layer stays frozen",
    "head_hidden_dim": "hidden width of the head", "local_crops": "number of small (local) crops",
    "local_size": "local crop size in pixels", "mask_ratio": "fraction of patches masked",
    "mlp_hidden_dim": "hidden width of the projection MLP", "moco_dim": "embedding (key) dimension",
    "moco_momentum": "momentum of the key encoder's EMA", "norm_last_layer": "weight-normalized last layer",
    "norm_pix_loss": "per-patch normalized pixel targets", "out_dim": "number of DINO prototypes",
    "queue_size": "negatives kept in the key queue",
    "rare_factor": "inverse_sqrt: weight factor of rare labels",
    "student_temp": "student softmax temperature", "teacher_temp": "teacher temperature after warm-up",
    "temperature": "InfoNCE softmax temperature", "use_bn_in_head": "BatchNorm in the head MLP",
    "vit_depth": "ViT blocks (none: the model's own)", "warmup_teacher_temp": "teacher temperature at start",
    "warmup_teacher_temp_epochs": "epochs of the teacher temperature warm-up",
}


def describe_fields(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, meaning) of every field of a config dataclass; the meaning is the
    field's comment in the class source (on its line, or the comment lines just above it),
    searched from the class up through its bases, else MEANINGS."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        above: list[str] = []
        for line in inspect.getsource(klass).splitlines():
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(stripped.lstrip("# "))
                continue
            match = re.match(r"(\w+)\s*:[^=]+=.*?(?:#\s*(.*))?$", stripped)
            if match and (match.group(2) or above):
                comments[match.group(1)] = match.group(2) or " ".join(above)
            above = []
    return [(f.name, f.default if f.default is not dataclasses.MISSING else f.default_factory(),
             comments.get(f.name) or MEANINGS.get(f.name, "")) for f in dataclasses.fields(cls)]


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain dict (tuples as lists) that YAML and JSON can hold."""
    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return list(v) if isinstance(v, tuple) else v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable again with resolve_config)."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=True))
