"""MoCo v2 (Chen, Fan, Girshick, He 2020, "Improved Baselines with Momentum Contrastive Learning").

Query encoder = backbone + 2-layer MLP head; key encoder = its momentum (EMA) copy, m = 0.999;
a KeyQueue of 65,536 normalized keys gathered across ranks; InfoNCE with T = 0.2 over
[positive key, queue]. SGD, lr 0.03 * B / 256, cosine schedule, weight decay 1e-4.

Shuffling BN (paper sec. 3.3, on by default): under DDP the key batch is gathered, permuted
across all ranks, encoded, and un-permuted (fastssl.distributed.batch_shuffle, as the official
code does), so a key's BatchNorm statistics come from other samples than its query's. In one
process, bn_splits > 1 gives both encoders BatchNorm statistics per sub-batch and the shuffle
is local (the official CIFAR demo's single-GPU version).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

import fastssl
from fastssl.config import MethodConfig, setting
from fastssl.distributed import batch_shuffle, batch_unshuffle, get_world_size
from fastssl.losses import InfoNCELoss
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import SGD, backbone_from_config, check_views
from fastssl.models import ema_update_, frozen_copy, moco_v2_head
from fastssl.models.heads import split_batch_norm_


@dataclass
class MoCoV2Config(MethodConfig):
    name: ClassVar[str] = "mocov2"
    defaults: ClassVar[dict] = dict(SGD, backbone="resnet50", image_size=224, epochs=200, batch_size=256,
                                    base_lr=0.03, weight_decay=1e-4)
    moco_dim: int = setting(128, "embedding (key) dimension", low=1, high=65536)
    mlp_hidden_dim: int = setting(2048, "hidden width of the projection MLP", low=1, high=65536)
    queue_size: int = setting(65536, "negatives kept in the key queue", low=1, high=1 << 24)
    moco_momentum: float = setting(0.999, "momentum of the key encoder's EMA", low=0, high=1)
    temperature: float = setting(0.2, "InfoNCE softmax temperature", low=0, low_open=True, high=100)
    symmetric: bool = setting(False, "also contrast (view 2 -> view 1) and push both key sets")
    bn_splits: int = setting(1, "> 1: BatchNorm statistics per sub-batch in both encoders and a local key "
                                "shuffle (shuffling BN in one process)", low=1, high=4096)
    shuffle_bn: bool = setting(True, "permute the key batch (across ranks under DDP) before the key encoder")


@register
class MoCoV2(Method, config=MoCoV2Config):
    # Fashion-MNIST at its own 28 px, under 10 minutes on a 2-core CPU: the CIFAR ResNet-8, the
    # official MoCo CIFAR-10 demo's changes (K = 4096, m = 0.99, T = 0.1, symmetric loss, wd 5e-4,
    # BN in 8 splits), batch 128, the demo's milder views, 3 epochs (README: what it printed).
    presets = {"fashion-mnist": dict(
        backbone="resnet8", image_size=28, batch_size=128, epochs=3, base_lr=0.06, weight_decay=5e-4,
        queue_size=4096, moco_momentum=0.99, temperature=0.1, symmetric=True, mlp_hidden_dim=512, bn_splits=8,
        channels_last=True, views={"scale": (0.25, 1.0), "blur_p": 0.0, "grayscale_p": 0.0},
    )}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        backbone, feature_dim = backbone_from_config(cfg)
        if cfg.method.bn_splits > 1:
            split_batch_norm_(backbone, cfg.method.bn_splits)
        head = moco_v2_head(feature_dim, cfg.method.mlp_hidden_dim, cfg.method.moco_dim)
        self.encoder_q = nn.Sequential(backbone, head)
        self.encoder_k = frozen_copy(self.encoder_q)
        # the queue stores L2-normalized keys (info_nce uses queue rows as given), in the training
        # dtype of the device the method is moved to
        self.queue = fastssl.KeyQueue(cfg.method.queue_size, cfg.method.moco_dim, normalize=True)
        self.criterion = InfoNCELoss(temperature=cfg.method.temperature, normalize=True, backend=self.backend)
        self._keys: torch.Tensor | None = None

    def encoder(self) -> nn.Module:
        return self.encoder_q[0]

    def compile_modules(self) -> list[nn.Module]:
        return [self.encoder_q[0], self.encoder_k[0]]

    def _loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        # The queue is stored in the training dtype (bf16 on CUDA, where autocast makes q bf16;
        # fp32 on the CPU), so this is the buffer itself, not a per-step copy of K x dim.
        return self.criterion(q, k.to(q.dtype), self.queue.keys.to(q.dtype))

    @torch.no_grad()
    def _keys_of(self, x: torch.Tensor) -> torch.Tensor:
        synced = any(isinstance(m, nn.SyncBatchNorm) for m in self.encoder_k.modules())
        m = self.cfg.method
        if not m.shuffle_bn or synced or (get_world_size() == 1 and m.bn_splits <= 1):
            return self.encoder_k(x)
        # a key and its query fall into different BN batches (He et al. 2020, sec. 3.3)
        x_shuffled, inverse = batch_shuffle(x)
        return batch_unshuffle(self.encoder_k(x_shuffled), inverse)

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x1, x2 = check_views(batch, 2, self.name)[:2]
        q1 = self.encoder_q(x1)
        k2 = self._keys_of(x2)
        if not self.cfg.method.symmetric:
            self._hold_keys(k2.detach(), ctx)
            return {"loss": self._loss(q1, k2)}
        q2 = self.encoder_q(x2)
        k1 = self._keys_of(x1)
        self._hold_keys(torch.cat([k2, k1]).detach(), ctx)
        return {"loss": 0.5 * (self._loss(q1, k2) + self._loss(q2, k1))}

    def _hold_keys(self, keys: torch.Tensor, ctx: StepContext) -> None:
        # with gradient accumulation every micro-batch contrasts against the same queue and the
        # keys of all micro-batches are pushed together after the optimizer step
        held = self._keys
        self._keys = keys if ctx.micro_step == 0 or held is None else torch.cat([held, keys])

    def parameter_groups(self) -> list[dict]:
        # the official MoCo applies weight decay to every parameter, BN and biases included
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        # EMA after step t equals the official EMA at the start of step t+1 (same query weights)
        ema_update_(self.encoder_k, self.encoder_q, self.cfg.method.moco_momentum)
        if self._keys is not None:
            self.queue.push(self._keys, gather=True)
            self._keys = None
