"""Exponential moving average of a network's parameters (momentum encoder / EMA teacher)."""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with requires_grad=False everywhere: the starting point of an EMA teacher."""
    teacher = copy.deepcopy(module)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher_p <- m * teacher_p + (1 - m) * student_p for every parameter pair, with two
    multi-tensor launches (torch._foreach_*) instead of one kernel pair per parameter.

    Buffers (BN running statistics) are not averaged: each network keeps its own, as in the
    official MoCo and DINO code. The two modules must have the same architecture.
    """
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    t_params = list(teacher.parameters())
    s_params = list(student.parameters())
    if len(t_params) != len(s_params):
        raise ValueError(
            f"teacher and student must have the same parameters, got {len(t_params)} and {len(s_params)}"
        )
    # FSDP-sharded networks (DTensor parameters, each split on dim 0 the same way for teacher
    # and student): the update is elementwise, so each rank updates its own shard in place.
    t_params = [_local(t) for t in t_params]
    s_params = [_local(s.detach()) for s in s_params]
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - momentum)


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def cosine_momentum(base: float, total_steps: int) -> np.ndarray:
    """Per-step momentum rising from `base` to 1 on a half cosine (BYOL, MoCo v3, DINO):
    m_t = 1 - (1 - base) * (cos(pi * t / total_steps) + 1) / 2, t = 0 .. total_steps-1."""
    t = np.arange(total_steps, dtype=np.float64)
    return 1.0 - (1.0 - base) * (np.cos(np.pi * t / max(total_steps, 1)) + 1.0) / 2.0
