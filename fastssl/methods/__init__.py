"""Pretraining methods. Each module registers its Method subclass in METHODS."""

from fastssl.methods.base import Method, StepContext, TrainConfig

METHODS: dict[str, type[Method]] = {}

__all__ = ["METHODS", "Method", "StepContext", "TrainConfig"]
