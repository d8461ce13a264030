"""MoCo v3 (Chen, Xie, He 2021, "An Empirical Study of Training Self-Supervised Vision Transformers").

Base encoder = backbone + projector MLP, followed by a predictor MLP; momentum encoder =
EMA of backbone + projector with m rising from 0.99 to 1 on a cosine. Symmetric in-batch
InfoNCE: queries of one view against the keys of the other view gathered from every rank,
target = the sample's own key (label offset rank * N), loss scaled by 2T, T = 0.2.
ResNet-50 defaults: LARS, lr 0.6 * B / 256, weight decay 1e-6, 10 warm-up epochs.
accum_steps = A is GradCache (fastssl.losses.grad_cache): queries and keys of A micro-batches, the
loss over the whole batch; only the queries are replayed (the keys carry no gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.losses import InfoNCELoss, grad_cache_encode
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.models import cosine_momentum, ema_update_, frozen_copy, moco_v3_mlp, sincos_pos_embed_2d
from fastssl.models.backbones import is_vit_name


@dataclass
class MoCoV3Config(MethodConfig):
    name: ClassVar[str] = "mocov3"
    defaults: ClassVar[dict] = dict(backbone="resnet50", image_size=224, epochs=100, batch_size=4096,
                                    base_lr=0.6, weight_decay=1e-6, optimizer="lars", momentum=0.9,
                                    warmup_epochs=10.0, sync_bn=True)
    moco_dim: int = setting(256, "embedding dimension", low=1, high=65536)
    mlp_hidden_dim: int = setting(4096, "hidden width of the projector and predictor", low=1, high=65536)
    projector_layers: int | None = setting(None, "projector layers (none: 2 for a ResNet, 3 for a ViT)",
                                           low=1, high=16)
    moco_momentum: float = setting(0.99, "start of the momentum encoder's cosine ramp to 1", low=0, high=1)
    temperature: float = setting(0.2, "InfoNCE softmax temperature", low=0, low_open=True, high=100)
    freeze_patch_embed: bool = setting(True, "ViT only: the paper's random (frozen) patch projection")


@register
class MoCoV3(Method, config=MoCoV3Config):
    accumulates_itself = True  # GradCache
    # Fashion-MNIST, found by the recipe search in benchmarks/RESULTS.md: the CIFAR ResNet-8 whose
    # features (what kNN sees) are its last stage average-pooled to 3x3 (on clothes, where a part
    # lies matters); training crops of 24 px (26.5% fewer pixels than 28) of at least half the image,
    # kNN on the whole 28-px images (eval_size); brightness and contrast jitter 0.8, no blur
    # (grayscale is a no-op on gray images); 6 epochs.
    presets = {"fashion-mnist": dict(
        backbone="resnet8_pool3", image_size=24, eval_size=28, epochs=6, batch_size=128, optimizer="lars",
        base_lr=1.0, weight_decay=1e-5, warmup_epochs=0.5, mlp_hidden_dim=512, moco_dim=128, sync_bn=False,
        channels_last=True, views={"scale": (0.5, 1.0), "jitter": (0.8, 0.8, 0.2, 0.1), "blur_p": 0.0,
                                   "grayscale_p": 0.0},
    )}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        backbone, feature_dim = backbone_from_config(cfg)
        is_resnet = not is_vit_name(cfg.model.backbone)
        if not is_resnet:
            # the paper's ViT: fixed 2-D sin-cos position embedding, random (frozen) patch projection
            grid = backbone.patch_embed.grid_size[0]
            # no class-token row when the ViT has registers (their position embedding covers the patches only)
            with_cls = not backbone.no_embed_class
            backbone.pos_embed.data.copy_(sincos_pos_embed_2d(feature_dim, grid, cls_token=with_cls)[None])
            backbone.pos_embed.requires_grad_(False)
            if cfg.method.freeze_patch_embed:
                backbone.patch_embed.requires_grad_(False)
        layers = cfg.method.projector_layers or (2 if is_resnet else 3)
        projector = moco_v3_mlp(layers, feature_dim, cfg.method.mlp_hidden_dim, cfg.method.moco_dim)
        self.base_encoder = nn.Sequential(backbone, projector)
        m = cfg.method
        self.predictor = moco_v3_mlp(2, m.moco_dim, m.mlp_hidden_dim, m.moco_dim, last_bn=False)
        self.momentum_encoder = frozen_copy(self.base_encoder)
        # the official contrastive_loss: keys gathered from every rank, target rank * N + i, times 2T
        self.criterion = InfoNCELoss(temperature=m.temperature, normalize=True, gather_distributed=True,
                                     backend=self.backend, scale_by_2t=True)

    def encoder(self) -> nn.Module:
        return self.base_encoder[0]

    def compile_modules(self) -> list[nn.Module]:
        return [self.base_encoder[0], self.momentum_encoder[0]]

    def shard_units(self) -> list[nn.Module]:
        return [self.predictor, self.base_encoder, self.momentum_encoder]

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        return {"teacher_momentum": cosine_momentum(self.cfg.method.moco_momentum, total_steps)}

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x1, x2 = check_views(batch, 2, self.name)[:2]
        micro = self.cfg.dist.accum_steps
        q1, q2 = grad_cache_encode(self._queries, x1, x2, micro_batches=micro, module=self)
        with torch.no_grad():
            k1, k2 = grad_cache_encode(self._keys, x1, x2, micro_batches=micro, module=self)
        return {"loss": self.criterion(q1, k2.to(q1.dtype)) + self.criterion(q2, k1.to(q2.dtype))}

    def _queries(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.predictor(self.base_encoder(x1)), self.predictor(self.base_encoder(x2))

    def _keys(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.momentum_encoder(x1), self.momentum_encoder(x2)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        m = ctx.schedules.get("teacher_momentum", self.cfg.method.moco_momentum)
        ema_update_(self.momentum_encoder, self.base_encoder, float(m))
