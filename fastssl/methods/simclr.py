"""SimCLR (Chen, Kornblith, Norouzi, Hinton 2020, "A Simple Framework for Contrastive Learning of
Visual Representations").

Encoder = backbone + projection head g (Linear-BN-ReLU-Linear-BN); both views of a batch go
through it as one batch (as the official code concatenates them), and the NT-Xent loss contrasts
each of the 2N projections with the other 2N−1 of every rank (`fastssl.losses.NTXentLoss` over the
fused InfoNCE): target = the other view of the same image. No momentum encoder, no predictor.
accum_steps = A is GradCache (fastssl.losses.grad_cache): A micro-batches (both views of each one
through the encoder together) whose projections are contrasted as one batch's.
ResNet-50 on ImageNet (the paper's 100-epoch setting): batch 4096, LARS, lr 0.3 × B / 256,
weight decay 1e-6, 10 warm-up epochs then cosine, T = 0.1, 128-d output of a 2048-wide head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastssl.config import MethodConfig, setting
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


@register
class SimCLR(Method, config=SimCLRConfig):
    accumulates_itself = True  # GradCache
    presets = {
        "imagenet": dict(_PAPER, temperature=0.1, proj_hidden_dim=2048, proj_dim=128),
        # The demo's network, crops and views (MoCo v3's preset) with the recipe lightly-train's SimCLR
        # uses on it: SGD lr 0.15 at batch 128 (momentum 0.9, weight decay 1e-4), 10% warm-up then
        # cosine, T = 0.1, for 8 epochs (`python -m fastssl.bench.time_to_accuracy --method simclr`
        # times it: RESULTS' time-to-accuracy rows).
        "fashion-mnist": dict(
            backbone="resnet8_pool3", image_size=24, eval_size=28, epochs=8, batch_size=128, optimizer="sgd",
            base_lr=0.3, momentum=0.9, weight_decay=1e-4, warmup_epochs=0.8, proj_hidden_dim=512,
            proj_dim=128, temperature=0.1, sync_bn=False, channels_last=True,
            views={"scale": (0.5, 1.0), "jitter": (0.8, 0.8, 0.2, 0.1), "blur_p": 0.0, "grayscale_p": 0.0},
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

        return recipes.mocov3(size=self.cfg.data.image_size)

    def encoder(self) -> nn.Module:
        return self.encoder_q[0]

    def shard_units(self) -> list[nn.Module]:
        return [self.encoder_q[1]]

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x1, x2 = check_views(batch, 2, self.name)[:2]
        micro = self.cfg.dist.accum_steps
        z1, z2 = grad_cache_encode(self._project, x1, x2, micro_batches=micro, module=self)
        return {"loss": self.criterion(z1, z2)}

    def _project(self, x1: torch.Tensor, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder_q(torch.cat([x1, x2]))  # one batch of both views, as the official code
        return z[: x1.shape[0]], z[x1.shape[0]:]
