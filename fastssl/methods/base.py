"""The contract between the training engine and a pretraining method.

The engine (fastssl/engine) owns the loop, the optimizer, the LR / weight-decay
schedules, autocast, DDP, checkpoints and logging. A method owns its networks,
its view recipe, its loss and whatever it updates outside the optimizer (EMA
teacher, key queue, DINO center). One file per method in fastssl/methods/.

Per step the engine does:

    ctx = StepContext(step, epoch, steps_per_epoch, total_steps, lr, weight_decay,
                      {name: schedule[step] for name, schedule in method_schedules.items()})
    for each of cfg.accum_steps micro-batches (ctx.micro_step = 0, 1, ...):
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
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


@dataclass
class TrainConfig:
    """Fields every method shares. Each method subclasses it with the paper's
    defaults for its own fields (and overrides of these)."""

    method: str = ""               # set by --method
    data: str = "fashion-mnist"    # fashion-mnist or an image folder (set by --data)
    backbone: str = "resnet18"     # resnet8/18/20/50, vit_tiny/small/base_patchN (timm names)
    image_size: int = 224          # training crop size in pixels
    # side of the kNN / linear-probe inputs (None: image_size). CNNs only; larger than the training
    # crops suits random-resized-crop training, whose objects look larger than in whole images
    eval_size: int | None = None
    epochs: int = 100              # length of the run; the LR and other schedules span it
    batch_size: int = 256          # global batch over all processes
    base_lr: float = 0.03          # scaled by batch_size / 256 (see lr_batch_divisor)
    lr_batch_divisor: int = 256    # LR = base_lr * batch_size / lr_batch_divisor
    min_lr: float = 0.0            # end of the cosine LR decay
    warmup_epochs: float = 0.0     # linear LR warm-up from 0 (<= epochs)
    weight_decay: float = 1e-4     # (start of the wd schedule when weight_decay_end is set)
    weight_decay_end: float | None = None  # cosine wd schedule when set (DINO)
    optimizer: str = "sgd"         # sgd | adamw | lars
    momentum: float = 0.9          # SGD / LARS momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW betas
    clip_grad: float | None = None     # global gradient-norm clipping; none: off
    fused: bool = True             # False: every fused op runs its *_ref (for end-to-end speedups)
    compile: bool = False          # torch.compile the networks
    channels_last: bool = False    # NHWC memory format (faster convolutions)
    sync_bn: bool = False          # SyncBatchNorm across GPUs
    data_backend: str = "auto"     # dali | torchvision | auto (dali when installed)
    data_device: str = "auto"      # gpu | cpu | auto
    num_threads: int = 2           # data loading threads / worker processes
    seed: int = 0                  # seeds the model init, the data order and augmentations
    out: str = ""                  # run folder; "": a new runs/<method>-<UTC time>
    checkpoint_every: int = 0      # steps; 0 = only at epoch end
    log_every: int = 10            # steps between metrics.jsonl rows flushed (and NaN checks)
    eval_knn: bool = True          # kNN top-1 of the random init and the trained backbone
    eval_every: float = 1.0        # epochs between kNN checks on a fixed subsample while training; 0 = none
    deterministic: bool = False    # deterministic kernels: same seed and machine -> same losses
    max_steps: int | None = None   # stop early (tests, time-boxed runs)
    max_skipped_fraction: float = 0.001  # bad samples are skipped and counted; beyond this fraction: an error
    dist_timeout_s: float = 1800.0  # how long a collective waits for the slowest rank before failing
    parallel: str = "ddp"          # ddp | fsdp (FSDP2 sharding, ViT methods; see fastssl.engine.parallel)
    activation_checkpointing: bool = False  # recompute each transformer block in the backward
    accum_steps: int = 1           # micro-batches per step, of batch_size / (world * accum_steps) each
    # ViewSpec fields replaced in every view of the method's recipe (e.g. milder crops for small
    # images): views={scale: [0.25, 1], blur_p: 0} in YAML, views="{blur_p: 0}" on the command line
    views: dict[str, Any] = field(default_factory=dict)

    @property
    def eval_side(self) -> int:
        """Side of the evaluation inputs: eval_size, else image_size."""
        return self.eval_size or self.image_size


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
    """Base class: subclasses set `name` and `config_class` and implement the hooks."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    # Named configurations (config-field overrides), e.g. presets["fashion-mnist"] for 32x32
    # images on a CPU; for resolve_config(..., preset=...). Between the defaults and a YAML file.
    presets: ClassVar[dict[str, dict]] = {}

    def __init__(self, cfg: TrainConfig):
        super().__init__()
        self.cfg = cfg

    @property
    def backend(self) -> str:
        """Backend passed to every fastssl op: 'auto' (fused on CUDA) or 'torch' (reference)."""
        return "auto" if self.cfg.fused else "torch"

    def recipe(self):
        """The fastssl.data recipe whose views this method consumes."""
        raise NotImplementedError

    def encoder(self) -> nn.Module:
        """The backbone whose [B, F] features kNN / linear probe evaluate."""
        raise NotImplementedError

    def compile_modules(self) -> list[nn.Module]:
        """The modules the trainer compiles (in place, nn.Module.compile) when cfg.compile is set:
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

    def build_sampler(self, source, *, rank: int = 0, world_size: int = 1):
        """An index sampler (set_epoch + __iter__, already sharded for this rank) that replaces
        the loader's shuffle, or None for the loader's own. The weak method resamples labels."""
        return None

    def before_optimizer_step(self, ctx: StepContext) -> None:
        pass

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        pass
