"""Training engine: config merge, schedules, optimizers, where a run executes (run), and the
Trainer composed of its run folder, checkpointer, stop signals, metrics log and time budget."""

from fastssl.engine.checkpoint import load_checkpoint, save_atomic
from fastssl.engine.config import parse_overrides, resolve_config, save_config
from fastssl.engine.optim import LARS, build_optimizer
from fastssl.engine.run import RunContext, init_run
from fastssl.engine.schedules import build_schedules, cosine_schedule, scaled_lr
from fastssl.engine.trainer import NonFiniteLossError, Trainer

__all__ = [
    "LARS", "NonFiniteLossError", "RunContext", "Trainer", "build_optimizer", "build_schedules",
    "cosine_schedule", "init_run", "load_checkpoint", "parse_overrides", "resolve_config",
    "save_atomic", "save_config", "scaled_lr",
]
