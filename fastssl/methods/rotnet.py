"""RotNet (Gidaris, Singh, Komodakis 2018, "Unsupervised Representation Learning by Predicting
Image Rotations"): a 4-way classifier on the backbone predicts which of 0, 90, 180, 270 degrees
each view was rotated by. SGD (Nesterov), lr 0.1 for batch 128, weight decay 5e-4.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.losses import rotation_loss
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import SGD, backbone_from_config, check_views

ROTATIONS = 4


@dataclass
class RotNetConfig(MethodConfig):
    name: ClassVar[str] = "rotnet"
    defaults: ClassVar[dict] = dict(SGD, backbone="resnet18", image_size=32, epochs=100, batch_size=128,
                                    base_lr=0.1, lr_batch_divisor=128, weight_decay=5e-4)
    head_hidden_dim: int = setting(0, "0: a linear 4-way head; > 0: Linear-BN-ReLU-Linear of this width",
                                   low=0, high=65536)


@register
class RotNet(Method, config=RotNetConfig):
    # Fashion-MNIST at its own 28 px, under 10 minutes on a 2-core CPU: the CIFAR ResNet-8, crops
    # of at least half the image (a small crop of a garment hides which way is up), 3 epochs.
    presets = {"fashion-mnist": dict(backbone="resnet8", image_size=28, batch_size=128, epochs=3,
                                     channels_last=True, views={"scale": (0.5, 1.0)})}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        self.backbone, feature_dim = backbone_from_config(cfg)
        hidden = cfg.method.head_hidden_dim
        self.head = (
            nn.Linear(feature_dim, ROTATIONS) if hidden <= 0 else nn.Sequential(
                nn.Linear(feature_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                nn.Linear(hidden, ROTATIONS))
        )

    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        # the rotnet recipe yields the 4 rotations in order: view r is rotated by r * 90 degrees
        views = check_views(batch, ROTATIONS, self.name)[:ROTATIONS]
        logits = self.head(self.backbone(torch.cat(views)))
        loss, accuracy = rotation_loss(logits, ROTATIONS)
        return {"loss": loss, "rotation_accuracy": accuracy}
