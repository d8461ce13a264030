"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations").

Encoder = backbone + projection head g (Linear-BN-ReLU-Linear-BN); both views of a batch go
through it as one batch (as the official code concatenates them), and the NT-Xent loss contrasts
each of the 2N projections with the other 2N−1 of every rank (`fastssl.losses.NTXentLoss` over the
fused InfoNCE): target = the other view of the same image. No momentum encoder, no predictor.
n_local_crops > 0 adds multi-crop (Caron et al. 2020, "SwAV", which applies it to SimCLR too):
small crops through the same encoder (one batch of them), each contrasted with each global view
(NTXentLoss' local_crops).
accum_steps = A is GradCache (fastssl.losses.grad_cache): A micro-batches (all views of each one
through the encoder) whose projections are contrasted as one batch's.
ResNet-50 on ImageNet (the paper's 100-epoch setting): batch 4096, LARS, lr 0.3 × B / 256,
weight decay 1e-6, 10 warm-up epochs then cosine, T = 0.1, 128-d output of a 2048-wide head.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import nn

from fastssl.config import MAX_SIDE, MethodConfig, setting
from fastssl.losses import NTXentLoss, grad_cache_encode
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.models import simclr_head

_PAPER = dict(backbone="resnet50", image_size=224, epochs=100, batch_size=4096, base_lr=0.3,
              weight_decay=1e-6, optimizer="lars", momentum=0.9, warmup_epochs=10.0, sync_bn=True)


@dataclass
class SimCLRConfig(MethodConfig):
    name: ClassVar[str] = "simclr"
    defaults: ClassVar[dict] = _PAPER
    temperature: float = setting(0.1, "NT-Xent softmax temperature", low=0, low_open=True, high=100)
    proj_hidden_dim: int = setting(2048, "hidden width of the projection head", low=1, high=65536)
    proj_dim: int = setting(128, "output dimension of the projection head", low=1, high=65536)
    proj_layers: int = setting(2, "Linear layers of the projection head (2: SimCLR, 3: SimCLR v2)", low=2,
                               high=16)
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "the global views' random resized crop area range",
                                              low=0, low_open=True, high=1)
    n_local_crops: int = setting(0, "small (local) crops beside the 2 global views (0: plain SimCLR)", low=0,
                                 high=64)
    local_crop_size: int = setting(96, "local crop size in pixels", low=1, high=MAX_SIDE)
    local_crop_scale: tuple[float, float] = setting((0.05, 0.4), "the local crops' random resized crop area "
                                                    "range", low=0, low_open=True, high=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if low > high:
                raise ValueError(f"{name} must be (min, max) with min <= max, got {getattr(self, name)}")


@register
class SimCLR(Method, config=SimCLRConfig):
    accumulates_itself = True  # GradCache
    presets = {
        "imagenet": dict(_PAPER, temperature=0.1, proj_hidden_dim=2048, proj_dim=128),
        # The demo (`make demo`), found by the race search in benchmarks/RESULTS.md: the CIFAR
        # ResNet-8 whose features are its last stage pooled to 3x3, trained on 20-px crops of at
        # least half the image (31% fewer pixels than 24: 8 epochs in the time of 6), kNN on the
        # whole 28-px images; brightness and contrast jitter 0.8 on every view, no blur; SGD lr
        # 0.15 at batch 128 (momentum 0.9, weight decay 1e-4), 10% warm-up then cosine, T = 0.1.
        "fashion-mnist": dict(
            backbone="resnet8_pool3", image_size=20, eval_size=28, epochs=8, batch_size=128, optimizer="sgd",
            base_lr=0.3, momentum=0.9, weight_decay=1e-4, warmup_epochs=0.8, proj_hidden_dim=512,
            proj_dim=128, temperature=0.1, sync_bn=False, channels_last=True, crop_scale=(0.5, 1.0),
            views={"jitter": (0.8, 0.8, 0.2, 0.1), "jitter_p": 1.0, "blur_p": 0.0, "grayscale_p": 0.0},
        ),
    }

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        backbone, feature_dim = backbone_from_config(cfg)
        m = cfg.method
        self.encoder_q = nn.Sequential(backbone, simclr_head(feature_dim, m.proj_hidden_dim, m.proj_dim,
                                                             num_layers=m.proj_layers))
        self.criterion = NTXentLoss(temperature=m.temperature, gather_distributed=True, backend=self.backend)

    def recipe(self):
        from fastssl.data import recipes

        m = self.cfg.method
        views = recipes.mocov3(size=self.cfg.data.image_size, scale=m.crop_scale).views
        local = replace(views[0], size=m.local_crop_size, scale=m.local_crop_scale, blur_p=0.5)
        return recipes.Recipe(self.name, views + [replace(local) for _ in range(m.n_local_crops)])

    def encoder(self) -> nn.Module:
        return self.encoder_q[0]

    def shard_units(self) -> list[nn.Module]:
        return [self.encoder_q[1]]

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        count = 2 + self.cfg.method.n_local_crops
        views = check_views(batch, count, self.name)[:count]
        z = grad_cache_encode(self._project, *views, micro_batches=self.cfg.dist.accum_steps, module=self)
        return {"loss": self.criterion(z[0], z[1], local_crops=z[2:])}

    def _project(self, x1: torch.Tensor, x2: torch.Tensor, *local: torch.Tensor) -> tuple[torch.Tensor, ...]:
        z = self.encoder_q(torch.cat([x1, x2]))  # one batch of both views, as the official code
        out = (z[: x1.shape[0]], z[x1.shape[0]:])
        if local:  # the local crops' own batch (another size)
            out += self.encoder_q(torch.cat(local)).chunk(len(local))
        return out
