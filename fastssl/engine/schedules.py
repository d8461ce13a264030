"""Per-step schedules as numpy arrays, indexed by the global step.

Arrays rather than scheduler objects: the position is just the step counter, so
resuming needs no scheduler state and every value is visible up front."""

from __future__ import annotations

import numpy as np

from fastssl.config import TrainConfig


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """[total_steps] values: linear warm-up warmup_start -> base over `warmup_steps`, then
    half-cosine base -> final (SGDR, Loshchilov & Hutter 2017; the DINO/MoCo v3 form):
    v(t) = final + (base - final) * (1 + cos(pi * t / T)) / 2, t counted after warm-up."""
    if total_steps < 1:
        raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps: expected 0 <= warmup_steps <= total_steps={total_steps}, "
                         f"got {warmup_steps}")
    warmup = np.linspace(warmup_start, base, warmup_steps, endpoint=False) if warmup_steps else np.zeros(0)
    t = np.arange(total_steps - warmup_steps)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(np.pi * t / max(len(t), 1)))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def scaled_lr(cfg: TrainConfig) -> float:
    """Peak LR as the papers scale it: base_lr * global_batch / lr_batch_divisor (Goyal et al. 2017)."""
    return cfg.optim.base_lr * cfg.data.batch_size / cfg.optim.lr_batch_divisor


def build_schedules(cfg: TrainConfig, steps_per_epoch: int,
                    total_steps: int | None = None) -> dict[str, np.ndarray]:
    """LR (warm-up + cosine to min_lr) and weight decay (constant, or cosine to
    weight_decay_end) for `total_steps` (default epochs * steps_per_epoch) steps;
    cfg.data.batch_size is the global batch."""
    total = cfg.optim.epochs * steps_per_epoch if total_steps is None else total_steps
    warmup = min(int(round(cfg.optim.warmup_epochs * steps_per_epoch)), total)
    lr = cosine_schedule(scaled_lr(cfg), cfg.optim.min_lr, total, warmup)
    if cfg.optim.weight_decay_end is None:
        wd = np.full(total, cfg.optim.weight_decay, dtype=np.float64)
    else:
        wd = cosine_schedule(cfg.optim.weight_decay, cfg.optim.weight_decay_end, total)
    return {"lr": lr, "weight_decay": wd}
