"""The compile gate's call-site scenarios: each method's real training step at its paper
configuration, so the gate compiles the kernel configurations the library itself launches (the
MAE model's D-major patch tokens with class token and position embedding, DINO's forward with the
teacher's column sum, the bf16 queue, ...) and not only those of its shape grid.

Each scenario builds the method on the meta device outside the fake mode (a deep copy of fake
tensors, as a momentum encoder is made, would belong to another fake mode), moves it to fake CUDA
tensors (a key queue becomes bf16 there, as on a card) and runs its forward under bf16 autocast,
switched on directly (torch.autocast refuses without a driver); the gate runs each fused op's
backward itself."""

from __future__ import annotations

import contextlib

from fastssl.bench.step_launches import PAPER as PAPER_STEPS  # (overrides, per-GPU batch, setting)
from fastssl.bench.step_launches import step_batch


@contextlib.contextmanager
def _cuda_autocast_bf16():
    import torch

    saved = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    try:
        yield
    finally:
        torch.set_autocast_enabled("cuda", saved[0])
        torch.set_autocast_dtype("cuda", saved[1])


def method_step(name: str) -> None:
    """One forward of `name`'s training step at its paper configuration on fake CUDA tensors
    (inside the gate's fake_cuda)."""
    import torch
    from torch.utils._python_dispatch import _disable_current_modes

    from fastssl.engine import resolve_config
    from fastssl.method import StepContext
    from fastssl.methods import METHODS

    overrides, batch, _ = PAPER_STEPS[name]
    cls = METHODS[name]
    with _disable_current_modes(), torch.device("meta"):
        method = cls(resolve_config(cls.config_class, overrides=overrides)).to("meta")
    method = method.to("cuda")
    step = step_batch(method, batch, "cuda")
    schedules = {k: float(v[0]) for k, v in method.schedules(total_steps=100, steps_per_epoch=10).items()}
    ctx = StepContext(step=0, epoch=1, steps_per_epoch=10, total_steps=100, lr=0.0, weight_decay=0.0,
                      schedules=schedules)
    with _cuda_autocast_bf16():
        method(step, ctx)


def call_site_scenarios() -> list:
    """(name, callable) per method, named 'step <method> <setting>'."""
    return [(f"step {name} {setting}".replace(", ", " "), lambda name=name: method_step(name))
            for name, (_, _, setting) in PAPER_STEPS.items()]
