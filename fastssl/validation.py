"""Argument checks shared by every layer: ops, losses, data, models, engine and config.

Each check raises a one-line TypeError/ValueError that names the argument, says what was
expected and what was received, and returns the (converted) value, so a caller writes
`n = check_int("n", n, low=1)` and nothing else. Nothing here imports the rest of fastssl.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from numbers import Integral, Real
from typing import Any

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    like: str | None = None,
    nonempty: bool = True,
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming `name` unless `value` fits; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device}{f' like {like}' if like else ''}, got {value.device}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_scalar(name: str, value: object, *, device: torch.device, like: str | None = None) -> torch.Tensor:
    """A one-element tensor on `device` (returned as it is, so gradients flow), or a Python number
    made into a float32 one; else an error naming `name`."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float32, device=device)
    check_tensor(name, value, device=device, like=like)
    if value.numel() != 1:
        raise ValueError(f"{name} must hold one value (a 0-d or [1] tensor), got shape {tuple(value.shape)}")
    return value


def check_image_text(image_features: object, text_features: object, logit_scale: object,
                     logit_bias: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An image-text loss's inputs: the towers' features [N, D] and [M, D] (2-D, one dtype and
    device, the same D), the logit scale and the bias (check_scalar each; the bias may be None).
    Returns (scale, bias) as tensors."""
    check_tensor("image_features", image_features, ndim=2)
    check_tensor("text_features", text_features, ndim=2, device=image_features.device, like="image_features")
    check_same_dtype(("image_features", "text_features"), (image_features, text_features))
    D = image_features.shape[1]
    if text_features.shape[1] != D:
        raise ValueError(f"text_features must have D={D} columns like image_features, got shape "
                         f"{tuple(text_features.shape)}")
    on = dict(device=image_features.device, like="image_features")
    bias = None if logit_bias is None else check_scalar("logit_bias", logit_bias, **on)
    return check_scalar("logit_scale", logit_scale, **on), bias


def check_same_dtype(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """All tensors share one dtype, or a TypeError lists each one's."""
    if len({t.dtype for t in tensors}) > 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{', '.join(names)} must share one dtype, got {got}")


def _range_text(low: Any, high: Any, low_open: bool, high_open: bool) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high}")
    return " and ".join(parts)


def check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> int:
    """An integer (not a bool) in [low, high], or an error naming `name`; returns a Python int."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be an integer {_range_text(low, high, False, False)}, got {value}")
    return value


def check_number(name: str, value: object, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a bool) in the given range, or an error naming `name`.

    `low_open` / `high_open` exclude the bound itself (`low=0, low_open=True` is "> 0")."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    value = float(value)
    bounds = _range_text(low, high, low_open, high_open)
    if not -math.inf < value < math.inf:  # comparisons, not math.isfinite: torch.compile traces them
        raise ValueError(f"{name} must be a finite number{' ' + bounds if bounds else ''}, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be a number {bounds}, got {value}")
    return value


def check_positive(name: str, value: object) -> float:
    """A finite number > 0, or an error naming `name`."""
    return check_number(name, value, low=0, low_open=True)


def check_bool(name: str, value: object) -> bool:
    """True or False (not 0/1 or a string), or a TypeError naming `name`."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_float_dtype(name: str, value: object) -> torch.dtype:
    """One of FLOAT_DTYPES, or a TypeError naming `name` and listing them."""
    if value not in FLOAT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
        raise TypeError(f"{name} must be one of ({names}), got {value}")
    return value


def check_choice(name: str, value: object, choices: Iterable[Any]) -> Any:
    """One of `choices`, or a ValueError naming `name` and listing them."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")
    return value


def parse_bool(name: str, text: object) -> bool:
    """A bool from a bool or from text (true/false, 1/0, yes/no, on/off, any case)."""
    if isinstance(text, bool):
        return text
    if isinstance(text, str) and text.strip().lower() in _TRUE | _FALSE:
        return text.strip().lower() in _TRUE
    raise ValueError(f"{name} must be true or false (also 1/0, yes/no, on/off), got {text!r}")
