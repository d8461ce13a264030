"""DINO (Caron et al. 2021, "Emerging Properties in Self-Supervised Vision Transformers").

Student = backbone + DINO head over all crops (2 global + n local, one backbone pass per crop
resolution); teacher = EMA of the student (momentum 0.996 -> 1, cosine) over the 2 global
crops only, without gradient. fastssl.losses.DINOLoss: centered, sharpened teacher softmax
(teacher temperature warm-up, center momentum 0.9, all-reduced) against the student's
log-softmax. The head's last layer is frozen during the first epoch. AdamW, lr 5e-4 * B / 256
with 10 warm-up epochs, weight decay 0.04 -> 0.4 (cosine), gradient clipping 3.0 (per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fastssl.config import MAX_EPOCHS, MAX_SIDE, MethodConfig, setting
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.models import DINOHead, MultiCropWrapper, cosine_momentum, ema_update_

N_GLOBAL = 2
CENTERINGS = ("center", "sinkhorn_knopp")


@dataclass
class DINOConfig(MethodConfig):
    name: ClassVar[str] = "dino"
    # clip_grad off: DINO clips each tensor on its own (clip_grad_per_param)
    defaults: ClassVar[dict] = dict(
        backbone="vit_small_patch16", image_size=224, epochs=100, batch_size=1024, base_lr=0.0005,
        min_lr=1e-6, warmup_epochs=10.0, weight_decay=0.04, weight_decay_end=0.4, optimizer="adamw",
        clip_grad=None, drop_path_rate=0.1)
    clip_grad_per_param: float | None = setting(
        3.0, "each parameter's gradient norm clipped to this (official DINO; none: off)", low=0,
        low_open=True, high=1e9)
    out_dim: int = setting(65536, "number of DINO prototypes", low=1, high=1 << 20)
    head_hidden_dim: int = setting(2048, "hidden width of the head", low=1, high=65536)
    bottleneck_dim: int = setting(256, "head width before the prototypes", low=1, high=65536)
    use_bn_in_head: bool = setting(False, "BatchNorm in the head MLP")
    norm_last_layer: bool = setting(True, "weight-normalized last layer")
    n_local_crops: int = setting(10, "number of small (local) crops", low=0, high=64)
    local_crop_size: int = setting(96, "local crop size in pixels", low=1, high=MAX_SIDE)
    teacher_momentum: float = setting(0.996, "start of the teacher EMA's cosine ramp to 1", low=0, high=1)
    warmup_teacher_temp: float = setting(0.04, "teacher temperature at start", low=0, low_open=True, high=100)
    teacher_temp: float = setting(0.04, "teacher temperature after warm-up", low=0, low_open=True, high=100)
    warmup_teacher_temp_epochs: int = setting(0, "epochs of the teacher temperature warm-up", low=0,
                                              high=MAX_EPOCHS)
    student_temp: float = setting(0.1, "student softmax temperature", low=0, low_open=True, high=100)
    center_momentum: float = setting(0.9, "EMA of the teacher center", low=0, high=1)
    teacher_centering: str = setting("center", "how teacher outputs are centred", choices=CENTERINGS)
    freeze_last_layer_epochs: int = setting(1, "epochs the head's last layer stays frozen", low=0,
                                            high=MAX_EPOCHS)


@register
class DINO(Method, config=DINOConfig):
    # Fashion-MNIST under 10 minutes on a 2-core CPU: the CIFAR ResNet-8 (a 4-block ViT-Tiny
    # learns less in that time: README), 2 global crops of 20 px and 4 local crops of 10 px
    # (half the pixels of 28 and 14 px, so 4 epochs fit; evaluated at the images' own 28 px),
    # 1024 prototypes, batch 128, a short warm-up and teacher momentum 0.99.
    presets = {"fashion-mnist": dict(
        backbone="resnet8", channels_last=True, image_size=20, eval_size=28, local_crop_size=10,
        n_local_crops=4, batch_size=128, epochs=4, warmup_epochs=0.2, base_lr=0.001, out_dim=1024,
        head_hidden_dim=512, drop_path_rate=0.0, teacher_momentum=0.99, warmup_teacher_temp=0.04,
        teacher_temp=0.04,
    )}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.student = self._network(cfg, cfg.model.drop_path_rate)
        # built without stochastic depth (as the official teacher), then given the student's weights
        self.teacher = self._network(cfg, 0.0)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        from fastssl.losses import DINOLoss  # imported here: the fused loss is a separate module

        m = cfg.method
        self.criterion = DINOLoss(
            m.out_dim, N_GLOBAL + m.n_local_crops, m.warmup_teacher_temp, m.teacher_temp,
            m.warmup_teacher_temp_epochs, cfg.optim.epochs, student_temp=m.student_temp,
            center_momentum=m.center_momentum, teacher_centering=m.teacher_centering,
            backend=self.backend,
        )

    @staticmethod
    def _network(cfg: TrainConfig, drop_path_rate: float) -> MultiCropWrapper:
        backbone, feature_dim = backbone_from_config(cfg, drop_path_rate=drop_path_rate)
        m = cfg.method
        head = DINOHead(feature_dim, m.out_dim, m.head_hidden_dim, m.bottleneck_dim,
                        use_bn=m.use_bn_in_head, norm_last_layer=m.norm_last_layer)
        return MultiCropWrapper(backbone, head)

    def recipe(self):
        from fastssl.data import recipes

        m = self.cfg.method
        return recipes.dino(global_size=self.cfg.data.image_size, local_crop_size=m.local_crop_size,
                            n_local_crops=m.n_local_crops)

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
        return {"teacher_momentum": cosine_momentum(self.cfg.method.teacher_momentum, total_steps),
                "teacher_temp": per_epoch[epochs]}

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        n_crops = N_GLOBAL + self.cfg.method.n_local_crops
        crops = check_views(batch, n_crops, self.name)
        if len(crops) != n_crops:
            raise ValueError(f"dino: expected {n_crops} views (2 global + "
                             f"n_local_crops={self.cfg.method.n_local_crops}), got {len(crops)}")
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
        clip = self.cfg.method.clip_grad_per_param
        if clip:
            # official DINO's clip_gradients: every tensor on its own, scale = clip / (norm + 1e-6)
            # when that is < 1; foreach launches and no host sync
            grads = [p.grad for p in self.student.parameters() if p.grad is not None]
            norms = torch._foreach_norm(grads)
            torch._foreach_mul_(grads, [torch.clamp(clip / (n + 1e-6), max=1.0) for n in norms])
        # the official recipe keeps the prototypes fixed in the first epoch(s) for stability
        if ctx.epoch < self.cfg.method.freeze_last_layer_epochs:
            for p in self.student.head.last_layer.parameters():
                p.grad = None

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        m = ctx.schedules.get("teacher_momentum", self.cfg.method.teacher_momentum)
        ema_update_(self.teacher, self.student, float(m))
        self.criterion.commit_center_update()
