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
from fastssl.data.spec import FASHION_MNIST  # noqa: E402
from fastssl.methods import (  # noqa: E402,F401
    clip,
    colorization,
    context,
    dino,
    dinov2,
    ibot,
    instdisc,
    mae,
    mocov2,
    mocov3,
    rotnet,
    simclr,
    weak,
)

# The demo (`make demo`, `fastssl train` with no --method and no --data): DEMO_METHOD's Fashion-MNIST
# preset (its `presets["fashion-mnist"]`, chosen by the recipe search in benchmarks/RESULTS.md) with
# DEMO_SETTINGS on top. Fixed work (epochs, no time budget), so a busy machine takes longer but
# prints the same numbers; same seed, same machine -> the same losses and kNN. No per-epoch kNN
# monitor: the demo prints the full kNN before and after training, and the monitor's subsample
# checks cost ~3% of its command (21 of 656 s in SimCLR's 8-epoch run).
DEMO_METHOD = "simclr"
DEMO_SETTINGS = {"deterministic": True, "eval_every": 0}


def demo_preset() -> dict:
    """The demo's configuration layer: DEMO_METHOD's Fashion-MNIST preset with DEMO_SETTINGS."""
    return {**METHODS[DEMO_METHOD].presets[FASHION_MNIST], **DEMO_SETTINGS}


__all__ = ["DEMO_METHOD", "DEMO_SETTINGS", "METHODS", "demo_preset", "register"]
