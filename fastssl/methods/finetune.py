"""Supervised fine-tuning of a pre-trained backbone as a method the engine's Trainer runs.

The recipe of MAE / BEiT fine-tuning (He et al. 2022, appendix A.1): AdamW, layer-wise LR
decay (each ViT block's LR is layer_decay times the next one's; CNNs decay per stage), warm-up
then cosine (the engine's schedules), label smoothing, optional mixup / cutmix (timm's Mixup),
drop-path (model.drop_path_rate, ViTs) and an optional EMA of the weights, which is then what
is evaluated. The step is cross-entropy on batch["label"], so DDP, FSDP, accumulation,
checkpoints and exact resumption are the Trainer's.

Not in the METHODS registry: the network comes from a pre-trained run
(fastssl.finetune builds it), not from the config alone."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import MethodConfig, TrainConfig, setting
from fastssl.distributed import get_rank
from fastssl.method import Method, StepContext
from fastssl.models.ema import ema_update_, frozen_copy

INITS = ("pretrained", "random")


@dataclass
class FinetuneConfig(MethodConfig):
    """The fine-tuning method's own fields; `defaults` is MAE's fine-tuning recipe (ViT-B:
    AdamW, base LR 1e-3 per 256 images x batch 1024, weight decay 0.05, 5 warm-up of 100
    epochs, layer decay 0.75 (0.65 for ViT-B in the paper), label smoothing 0.1)."""

    name: ClassVar[str] = "finetune"
    defaults: ClassVar[dict] = dict(optimizer="adamw", base_lr=1e-3, weight_decay=0.05, warmup_epochs=5.0,
                                    epochs=100, batch_size=1024, min_lr=1e-6, eval_every=0.0)

    pretrained: str = setting("", "the pre-trained run (folder or checkpoint) whose backbone is fine-tuned")
    init: str = setting("pretrained", "pretrained: the run's weights; random: the same network from "
                                      "random init (the baseline)", choices=INITS)
    pretrain_size: int = setting(0, "the pre-training image size (set from the run)", low=0, high=4096)
    num_classes: int = setting(0, "classes of the new head (set from the data)", low=0, high=1 << 20)
    layer_decay: float = setting(0.75, "layer-wise LR decay: block i's LR is layer_decay^(depth + 1 - i) "
                                       "x the LR (ViT blocks, CNN stages)", low=0, low_open=True, high=1)
    label_smoothing: float = setting(0.1, "label smoothing of the targets", low=0, high=1, high_open=True)
    mixup_alpha: float = setting(0.0, "mixup Beta(alpha, alpha); 0: off", low=0, high=100)
    cutmix_alpha: float = setting(0.0, "cutmix Beta(alpha, alpha); 0: off", low=0, high=100)
    mix_prob: float = setting(1.0, "probability that a batch is mixed (mixup or cutmix on)", low=0, high=1)
    ema_decay: float = setting(0.0, "EMA of the weights (evaluated instead of them); 0: off", low=0, high=1,
                               high_open=True)

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


_VIT_BLOCK = re.compile(r"^blocks\.(\d+)\.")
_CNN_STAGE = re.compile(r"^(?:layer(\d+)|stages\.(\d+))\.")


def layer_id(name: str, num_layers: int, *, vit: bool) -> int:
    """The layer of a backbone parameter for layer-wise LR decay (BEiT's numbering): 0 for
    the embedding (ViT: cls token, position embedding, patch embedding; CNN: the stem),
    i + 1 for ViT block i, k for torchvision's layerk, k + 1 for a CIFAR ResNet's stages.k,
    `num_layers` for the rest (the final norm)."""
    if vit:
        if name.startswith(("cls_token", "pos_embed", "patch_embed", "reg_token")):
            return 0
        match = _VIT_BLOCK.match(name)
        return int(match.group(1)) + 1 if match else num_layers
    match = _CNN_STAGE.match(name)
    if match:
        return int(match.group(1)) if match.group(1) else int(match.group(2)) + 1
    return 0 if name.startswith(("conv1", "bn1", "stem")) else num_layers


def backbone_layers(backbone: nn.Module, *, vit: bool) -> int:
    """The head's layer id: one past the deepest block / stage."""
    if vit:
        return len(backbone.blocks) + 1
    ids = [layer_id(n, 0, vit=False) for n, _ in backbone.named_parameters()]
    return max(ids) + 1


class Finetune(Method, config=FinetuneConfig):
    """A backbone (built and loaded by fastssl.finetune) with a new linear head of
    cfg.method.num_classes outputs, trained with cross-entropy."""

    def __init__(self, cfg: TrainConfig, backbone: nn.Module, feature_dim: int, *, vit: bool):
        super().__init__(cfg)
        m = cfg.method
        if m.num_classes < 2:
            raise ValueError(f"num_classes: expected >= 2 classes in the data, got {m.num_classes}")
        head = nn.Linear(feature_dim, m.num_classes)
        nn.init.trunc_normal_(head.weight, std=2e-5)  # MAE's head init: the start is a uniform guess
        nn.init.zeros_(head.bias)
        self.net = nn.Sequential(backbone, head)
        self.vit = vit
        self.num_layers = backbone_layers(backbone, vit=vit)
        self.ema = frozen_copy(self.net) if m.ema_decay > 0 else None
        self.mixup = None
        if m.mixing:
            from timm.data import Mixup

            self.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.mix_prob,
                               label_smoothing=m.label_smoothing, num_classes=m.num_classes)

    def encoder(self) -> nn.Module:
        """The classifier evaluated (its EMA when ema_decay > 0): [B, 3, H, W] -> logits."""
        return self.ema if self.ema is not None else self.net

    def compile_modules(self) -> list[nn.Module]:
        return [self.net]

    def lr_scale(self, name: str) -> float:
        """layer_decay ** (head layer - this parameter's layer); 1 for the head."""
        if name.startswith("1."):
            return 1.0
        layer = layer_id(name.removeprefix("0."), self.num_layers, vit=self.vit)
        return self.cfg.method.layer_decay ** (self.num_layers - layer)

    def parameter_groups(self) -> list[dict]:
        """One group per (layer, decay or not): lr_scale from lr_scale(), no weight decay on
        biases, norms and the ViT's tokens and position embedding."""
        groups: dict[tuple[float, bool], dict] = {}
        for name, p in self.net.named_parameters():
            if not p.requires_grad:
                continue
            no_decay = p.ndim <= 1 or name.endswith((".bias", "cls_token", "pos_embed"))
            key = (self.lr_scale(name), no_decay)
            group = groups.setdefault(key, {"params": [], "names": [], "lr_scale": key[0]}
                                      | ({"weight_decay": 0.0, "apply_wd": False} if no_decay else {}))
            group["params"].append(p)
            group["names"].append(name)
        return list(groups.values())

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        x, y = batch["views"][0], batch["label"].long()
        if self.mixup is not None:
            x, soft = self._mix(x, y, ctx)
            logits = self.net(x)
            loss = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
            return {"loss": loss}
        logits = self.net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.method.label_smoothing)
        return {"loss": loss, "train_top1": (logits.argmax(1) == y).float().mean()}

    def _mix(self, x: torch.Tensor, y: torch.Tensor, ctx: StepContext) -> tuple[torch.Tensor, torch.Tensor]:
        """timm's Mixup, whose draws (numpy's global RNG) are seeded by (seed, step, micro-batch,
        rank): a resumed run mixes as the uninterrupted one, whatever else drew from numpy."""
        state = np.random.get_state()
        np.random.seed([self.cfg.run.seed, ctx.step, ctx.micro_step, get_rank()])
        try:
            return self.mixup(x, y)
        finally:
            np.random.set_state(state)

    @torch.no_grad()
    def after_optimizer_step(self, ctx: StepContext) -> None:
        if self.ema is None:
            return
        ema_update_(self.ema, self.net, self.cfg.method.ema_decay)
        # BatchNorm statistics follow the trained network (timm's ModelEma averages them; a copy is
        # the same at the decays used and keeps a fresh EMA's statistics from being the pre-training's).
        for t, s in zip(self.ema.buffers(), self.net.buffers()):
            t.copy_(s)
