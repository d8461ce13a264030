"""The contract between the training engine and a pretraining method.

The engine (fastssl/engine) imports this module, never the methods package. It owns the
loop, the optimizer, the LR / weight-decay schedules, autocast, DDP, checkpoints and logging.
A method owns its networks, its view recipe, its loss and whatever it updates outside the optimizer (EMA
teacher, key queue, DINO center). One file per method in fastssl/methods/.

Per step the engine does:

    ctx = StepContext(step, epoch, steps_per_epoch, total_steps, lr, weight_decay,
                      {name: schedule[step] for name, schedule in method_schedules.items()})
    for each of cfg.dist.accum_steps micro-batches (ctx.micro_step = 0, 1, ...; one, the whole
    batch, for a method that `accumulates_itself`, e.g. GradCache):
        out = model(micro_batch, ctx)  # model = method, DDP(method) or the FSDP-sharded method
        (out["loss"] / accum_steps).backward()  # gradients synchronised on the last one only
    method.before_optimizer_step(ctx)  # e.g. DINO cancels the last layer's gradient in epoch 0
    clip, optimizer.step()
    method.after_optimizer_step(ctx)   # e.g. EMA teacher update, queue push

`batch` is what fastssl.data.build_loader yields:
{"views": [Tensor[B, 3, h, w], ...] in recipe order, "label": Tensor[B], "index": Tensor[B]}.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fastssl.config import MethodConfig, TrainConfig


@dataclass
class StepContext:
    step: int
    epoch: int
    steps_per_epoch: int
    total_steps: int
    lr: float
    weight_decay: float
    schedules: dict[str, float] = field(default_factory=dict)
    micro_step: int = 0            # index of the micro-batch within the optimizer step (accumulation)
    accum_steps: int = 1


class Method(nn.Module):
    """Base class: a subclass names its MethodConfig (the method's own fields, whose `defaults`
    hold the paper's values of the other components' fields) as `class SimCLR(Method,
    config=SimCLRConfig)`, which sets `config_class` and `name` (the config's), and implements
    the hooks. `self.cfg` is the whole TrainConfig; `self.cfg.method` its own part."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Named configurations (flat key -> value), e.g. presets["fashion-mnist"] for 28x28 images on
    # a CPU; for resolve_config(..., preset=...). Between the method's defaults and a YAML file.
    presets: ClassVar[dict[str, dict]] = {}
    # The --data a run without one trains on (a method that needs colour names a colour set).
    default_data: ClassVar[str] = "fashion-mnist"
    # True: the engine hands forward() the rank's whole batch and the method runs cfg.dist.accum_steps
    # micro-batches itself (GradCache, fastssl.losses.grad_cache: the contrastive methods keep the whole
    # batch's negatives); False: the engine splits it.
    accumulates_itself: ClassVar[bool] = False

    def __init_subclass__(cls, config: type[MethodConfig] | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if config is not None:  # the name is written once, in the config
            cls.config_class, cls.name = config, config.name

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def backend(self) -> str:
        """Backend passed to every fastssl op: 'auto' (fused on CUDA) or 'torch' (reference)."""
        return "auto" if self.cfg.model.fused else "torch"

    def recipe(self):
        """The fastssl.data recipe whose views this method consumes: by default the recipe named
        after the method, at the configured image size (fastssl.data.recipes.<name>(size=...))."""
        from fastssl.data import recipes

        recipe = getattr(recipes, self.name, None)
        if recipe is None:
            raise NotImplementedError(f"{type(self).__name__}: fastssl.data.recipes has no {self.name!r} "
                                      "recipe; define its recipe()")
        return recipe(size=self.cfg.data.image_size)

    def encoder(self) -> nn.Module:
        """The backbone whose [B, F] features kNN / linear probe evaluate."""
        raise NotImplementedError

    def compile_modules(self) -> list[nn.Module]:
        """The modules the trainer compiles (in place, nn.Module.compile) when cfg.model.compile is set:
        the networks the training step runs, teachers and momentum encoders included."""
        return [self.encoder()]

    def shard_units(self) -> list[nn.Module]:
        """Submodules that parallel=fsdp shards as units of their own after the transformer
        blocks and before the method itself (children before their parents), e.g. heads."""
        return []

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        """Loss (key "loss", a scalar) and any scalar metrics for logging."""
        raise NotImplementedError

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        """Per-step schedules besides LR and weight decay (teacher momentum, temperature...)."""
        return {}

    def parameter_groups(self) -> list[dict]:
        """Optimizer groups: by default no weight decay on biases and norm parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0, "apply_wd": False}]

    def bind_data(self, source) -> None:
        """Called once with the pretraining source before the sampler, the loader and the
        optimizer are built: a method whose shapes or targets depend on the data (the weak
        method's label table and classifier) fits them here."""

    def build_sampler(self, source, *, rank: int = 0, world_size: int = 1):
        """An index sampler (set_epoch + __iter__, already sharded for this rank) that replaces
        the loader's shuffle, or None for the loader's own (the weak method resamples by label)."""
        return None

    def evaluator(self, base, splits, device: torch.device, *, resize: int | None = None):
        """The run's evaluator: `base` (kNN / linear probe of encoder(), or None) by default; a
        method with more to score (zero-shot, retrieval) wraps it. splits: the data's
        fastssl.data.DataSplits; resize: the side test images are resized to whole (small sets)."""
        return base

    def masking(self):
        """The fastssl.data.masking.BlockMasks whose masks each batch carries
        (build_loader(masking=...)), or None: no masks."""
        return None

    def before_optimizer_step(self, ctx: StepContext) -> None:
        pass

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        pass
