"""Pretraining methods. Each module registers its Method subclass in METHODS."""

from fastssl.method import Method

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: METHODS[cls.name] = cls."""
    if not cls.name or cls.name in METHODS:
        raise ValueError(f"method name must be unique and non-empty, got {cls.name!r}")
    METHODS[cls.name] = cls
    return cls


# imported after METHODS exists: each module registers itself
from fastssl.methods import (  # noqa: E402,F401
    colorization,
    context,
    dino,
    dinov2,
    instdisc,
    mae,
    mocov2,
    mocov3,
    rotnet,
    simclr,
    weak,
)

__all__ = ["METHODS", "register"]
