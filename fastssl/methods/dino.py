"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Student = backbone + DINO head over all crops (2 global + n local, one backbone pass per crop
resolution); teacher = EMA of the student (momentum 0.996 -> 1, cosine) over the 2 global
crops only, without gradient. fastssl.losses.DINOLoss: centered, sharpened teacher softmax
(teacher temperature warm-up, center momentum 0.9, all-reduced) against the student's
log-softmax. The head's last layer is frozen during the first epoch. AdamW, lr 5e-4 * B / 256
with 10 warm-up epochs, weight decay 0.04 -> 0.4 (cosine), gradient clipping 3.0 (per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.methods.base import Method, StepContext, TrainConfig
from fastssl.models import DINOHead, MultiCropWrapper, cosine_momentum, ema_update_

N_GLOBAL = 2


@dataclass
class DINOConfig(TrainConfig):
    method: str = "dino"
    backbone: str = "vit_small_patch16"
    image_size: int = 224                 # global crop size
    epochs: int = 100
    batch_size: int = 1024
    base_lr: float = 0.0005
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    optimizer: str = "adamw"
    clip_grad: float | None = None        # the engine's global-norm clipping: off, DINO clips per tensor
    clip_grad_per_param: float | None = 3.0  # official DINO: each parameter's gradient norm <= 3.0
    drop_path_rate: float = 0.1           # student only; the teacher has none
    out_dim: int = 65536
    head_hidden_dim: int = 2048
    bottleneck_dim: int = 256
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    local_crops: int = 10
    local_size: int = 96
    teacher_momentum: float = 0.996       # start of the cosine ramp to 1
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 0
    student_temp: float = 0.1
    center_momentum: float = 0.9
    teacher_centering: str = "center"     # center | sinkhorn_knopp
    freeze_last_layer_epochs: int = 1
    vit_depth: int | None = None


@register
class DINO(Method):
    name = "dino"
    config_class = DINOConfig
    # Fashion-MNIST at its own 28 px, under 10 minutes on a 2-core CPU: the CIFAR ResNet-8 (a
    # 4-block ViT-Tiny learns less in that time: README), 2 global crops of 28 px and 4 local
    # crops of 14 px, 1024 prototypes, batch 128, a short warm-up and teacher momentum 0.99.
    presets = {"fashion-mnist": dict(
        backbone="resnet8", channels_last=True, image_size=28, local_size=14, local_crops=4,
        batch_size=128, epochs=4, warmup_epochs=0.2, base_lr=0.001, out_dim=1024, head_hidden_dim=512,
        drop_path_rate=0.0, teacher_momentum=0.99, warmup_teacher_temp=0.04, teacher_temp=0.04,
    )}

    def __init__(self, cfg: DINOConfig):
        super().__init__(cfg)
        self.student = self._network(cfg, cfg.drop_path_rate)
        # built without stochastic depth (as the official teacher), then given the student's weights
        self.teacher = self._network(cfg, 0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        from fastssl.losses import DINOLoss  # imported here: the fused loss is a separate module

        self.criterion = DINOLoss(
            cfg.out_dim, N_GLOBAL + cfg.local_crops, cfg.warmup_teacher_temp, cfg.teacher_temp,
            cfg.warmup_teacher_temp_epochs, cfg.epochs, student_temp=cfg.student_temp,
            center_momentum=cfg.center_momentum, teacher_centering=cfg.teacher_centering,
            backend=self.backend,
        )

    @staticmethod
    def _network(cfg: DINOConfig, drop_path_rate: float) -> MultiCropWrapper:
        backbone, feature_dim = backbone_from_config(replace(cfg, drop_path_rate=drop_path_rate))
        head = DINOHead(feature_dim, cfg.out_dim, cfg.head_hidden_dim, cfg.bottleneck_dim,
                        use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer)
        return MultiCropWrapper(backbone, head)

    def recipe(self):
        from fastssl.data import recipes

        return recipes.dino(global_size=self.cfg.image_size, local_size=self.cfg.local_size,
                            n_local=self.cfg.local_crops)

    def encoder(self) -> nn.Module:
        # the teacher is the better network to evaluate (the paper's kNN uses it)
        return self.teacher.backbone

    def compile_modules(self) -> list[nn.Module]:
        return [self.student.backbone, self.teacher.backbone]

    def shard_units(self) -> list[nn.Module]:
        # the 65,536-prototype heads are the largest single tensors: each its own FSDP unit
        return [self.student.head, self.teacher.head, self.student, self.teacher]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        # the official per-epoch teacher temperature, held for every step of its epoch
        per_epoch = self.criterion.teacher_temp_schedule
        epochs = np.minimum(np.arange(total_steps) // steps_per_epoch, len(per_epoch) - 1)
        return {"teacher_momentum": cosine_momentum(self.cfg.teacher_momentum, total_steps),
                "teacher_temp": per_epoch[epochs]}

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        n_crops = N_GLOBAL + self.cfg.local_crops
        crops = check_views(batch, n_crops, self.name)
        if len(crops) != n_crops:
            raise ValueError(f"dino: expected {n_crops} views (2 global + "
                             f"local_crops={self.cfg.local_crops}), got {len(crops)}")
        with torch.no_grad():
            teacher_out = self.teacher(crops[:N_GLOBAL])
        student_out = self.student(crops)
        # with gradient accumulation the center moves once per optimizer step, on all micro-batches' rows
        # the engine passes the step's temperature (schedules()); a call without it takes its epoch's
        temp = ctx.schedules.get("teacher_temp")
        if temp is None:
            temp = self.criterion.teacher_temp_at(ctx.epoch)
        loss = self.criterion(student_out, teacher_out, teacher_temp=float(temp),
                              update_center=ctx.accum_steps == 1)
        return {"loss": loss}

    @torch.no_grad()
    def before_optimizer_step(self, ctx: StepContext) -> None:
        clip = self.cfg.clip_grad_per_param
        if clip:
            # official DINO's clip_gradients: every tensor on its own, scale = clip / (norm + 1e-6)
            # when that is < 1; foreach launches and no host sync
            grads = [p.grad for p in self.student.parameters() if p.grad is not None]
            norms = torch._foreach_norm(grads)
            torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
        # the official recipe keeps the prototypes fixed in the first epoch(s) for stability
        if ctx.epoch < self.cfg.freeze_last_layer_epochs:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        m = ctx.schedules.get("teacher_momentum", self.cfg.teacher_momentum)
        ema_update_(self.teacher, self.student, float(m))
        self.criterion.commit_center_update()
