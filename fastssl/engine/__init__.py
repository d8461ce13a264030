"""Training engine: config merge, schedules, optimizers, checkpoints and the Trainer loop."""

from fastssl.engine.checkpoint import load_checkpoint, save_atomic
from fastssl.engine.config import parse_overrides, resolve_config, save_config
from fastssl.engine.optim import LARS, build_optimizer
from fastssl.engine.schedules import build_schedules, cosine_schedule, scaled_lr
from fastssl.engine.trainer import NonFiniteLossError, Trainer, init_distributed

__all__ = [
    "LARS", "NonFiniteLossError", "Trainer", "build_optimizer", "build_schedules", "cosine_schedule",
    "init_distributed", "load_checkpoint", "parse_overrides", "resolve_config", "save_atomic", "save_config",
    "scaled_lr",
]
