"""Kernel launches of one training step per method, fused against eager, counted without a GPU.

Each method is built at its paper configuration on the meta device (shapes only, no memory) and
runs one step's forward and backward on meta views of its recipe at the per-GPU batch, under a
DispatchCounter with Triton launches recorded instead of run (as the traffic model walks a
fused op): eager = every aten op that moves data (each a CUDA kernel launch on a GPU, a cuDNN
convolution counted as one), fused = those plus the Triton launches. fp32, no autocast (its
casts are left out on both sides); the optimizer and the EMA / queue updates, alike on both paths,
are left out. Meta rather than fake CUDA tensors: the autograd engine needs a CUDA device to run a
backward on fake CUDA tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fastssl.bench.counter import DispatchCounter, kernel_launches
from fastssl.bench.traffic import _fused_on_meta
from fastssl.engine import resolve_config
from fastssl.engine.flops import mask_shapes
from fastssl.method import StepContext
from fastssl.methods import METHODS

# method -> (config overrides, per-GPU batch, what the paper trains)
PAPER = {
    "mocov2": ({"backbone": "resnet50", "image_size": 224}, 256, "ResNet-50, K=65,536"),
    "mocov3": ({"backbone": "vit_base_patch16", "image_size": 224}, 256, "ViT-B/16, 256 of 4,096"),
    "simclr": ({"backbone": "resnet50", "image_size": 224}, 256, "ResNet-50, 256 of 4,096"),
    "dino": ({"backbone": "vit_small_patch16", "image_size": 224, "local_crop_size": 96, "n_local_crops": 10},
             64, "ViT-S/16, 2x224 + 10x96, K=65,536"),
    "mae": ({"backbone": "vit_large_patch16", "image_size": 224}, 64, "ViT-L/16, class token"),
    "rotnet": ({}, 128, "ResNet-18 (no fused op)"),
    "dinov2": ({"backbone": "vit_small_patch14", "image_size": 224, "local_crop_size": 98,
                "n_local_crops": 8}, 64, "ViT-S/14, 2x224 + 8x98, K=65,536, Sinkhorn-Knopp"),
}


@dataclass
class StepLaunches:
    method: str
    setting: str
    batch: int
    eager: int            # aten ops of the reference step
    fused_aten: int       # aten ops around the kernels on the fused path
    fused_triton: int     # Triton launches
    kernels: tuple        # the Triton kernels launched

    @property
    def fused(self) -> int:
        return self.fused_aten + self.fused_triton


def step_batch(method, batch: int, device: str) -> dict:
    """A step's batch of `batch` images as shapes on `device` (meta, or fake CUDA): the recipe's views,
    labels, indices and, for a method that masks, its masks' keys."""
    views = [torch.empty(batch, 3, s, s, device=device) for s in method.recipe().view_sizes]
    return {"views": views, "label": torch.zeros(batch, dtype=torch.long, device=device),
            "index": torch.arange(batch, device=device), **mask_shapes(method, batch, device)}


def _count(name: str, overrides: dict, batch: int, fused: bool) -> tuple[int, list]:
    cls = METHODS[name]
    cfg = resolve_config(cls.config_class, overrides={**overrides, "fused": fused})
    with torch.device("meta"):
        method = cls(cfg).to("meta")  # .to: modules that pick their own device (the key queue)
    step = step_batch(method, batch, "meta")
    schedules = {k: float(v[0]) for k, v in method.schedules(total_steps=100, steps_per_epoch=10).items()}
    ctx = StepContext(step=0, epoch=1, steps_per_epoch=10, total_steps=100, lr=0.0, weight_decay=0.0,
                      schedules=schedules)
    with _fused_on_meta(), kernel_launches() as launches, DispatchCounter() as counter:
        method(step, ctx)["loss"].backward()
    return counter.kernels, launches


def count(name: str) -> StepLaunches:
    """One method's step at its paper configuration, fused and eager."""
    overrides, batch, setting = PAPER[name]
    eager, stray = _count(name, overrides, batch, fused=False)
    if stray:
        raise RuntimeError(f"{name} with fused=False launched {sorted({x.name for x in stray})}")
    aten, launches = _count(name, overrides, batch, fused=True)
    return StepLaunches(name, setting, batch, eager, aten, len(launches),
                        tuple(sorted({launch.name for launch in launches})))


def table(rows: list[StepLaunches]) -> str:
    lines = ["| method | setting | per-GPU batch | launches eager | launches fused (aten + Triton) | "
             "Triton kernels |", "|---|---|---|---|---|---|"]
    for r in rows:
        kernels = ", ".join(k.strip("_") for k in r.kernels) or "-"
        lines.append(f"| {r.method} | {r.setting} | {r.batch} | {r.eager:,} | {r.fused:,} "
                     f"({r.fused_aten:,} + {r.fused_triton}) | {kernels} |")
    return "\n".join(lines)


def main() -> list[StepLaunches]:
    rows = [count(name) for name in PAPER if name in METHODS]
    print("Kernel launches per training step (forward + backward, meta tensors, fp32; optimizer and "
          "EMA/queue updates left out)")
    print(table(rows))
    return rows
