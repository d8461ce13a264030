"""Optimizers: SGD, AdamW (torch's) and LARS (You et al. 2017, in MoCo v3's form)."""

from __future__ import annotations

import torch

from fastssl.config import TrainConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and a layer-wise trust ratio, as in MoCo v3's `optimizer.py`:
    for a weight matrix (ndim > 1) d = g + wd * w, d *= eta * ||w|| / ||d|| (1 when a
    norm is 0); m = mu * m + d; w -= lr * m. Biases and norm parameters (ndim <= 1)
    get neither weight decay nor the trust ratio."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1 or trust_coefficient <= 0:
            raise ValueError(f"LARS: expected lr >= 0, weight_decay >= 0, 0 <= momentum < 1, "
                             f"trust_coefficient > 0; got {lr}, {weight_decay}, {momentum}, "
                             f"{trust_coefficient}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    w_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    one = torch.ones_like(w_norm)
                    trust = group["trust_coefficient"] * w_norm / d_norm
                    q = torch.where((w_norm > 0) & (d_norm > 0), trust, one)
                    d = d.mul(q)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                mu = state["momentum_buffer"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


def build_optimizer(cfg: TrainConfig, param_groups: list[dict]) -> torch.optim.Optimizer:
    """cfg.optim.optimizer in {sgd, adamw, lars}. LR and weight decay are set every step from the
    schedules (groups with apply_wd=False keep weight_decay 0); extra group keys are kept."""
    o = cfg.optim
    name = o.optimizer
    # The schedule sets lr / weight_decay before each step; 0 here avoids a misleading first value.
    groups = [dict(g, lr=0.0) | ({} if "weight_decay" in g else {"weight_decay": o.weight_decay})
              for g in param_groups]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=0.0, betas=tuple(o.betas), weight_decay=o.weight_decay)
    return LARS(groups, lr=0.0, momentum=o.momentum, weight_decay=o.weight_decay)  # the config's last choice
