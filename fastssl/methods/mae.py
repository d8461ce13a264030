"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

ViT encoder on the 25% kept patches (fastssl.ops.random_masking, which adds the fixed sin-cos
position embedding to the kept patches and writes the class token in the same pass), decoder of
8 blocks of width 512 fed by fastssl.ops.unshuffle_tokens (mask tokens, class token and decoder
position embedding in one pass), per-patch-normalized pixel MSE on the masked patches read from
the images (fastssl.ops.mae_loss). AdamW (beta2 0.95), lr 1.5e-4 * B / 256, 40 warm-up epochs + cosine,
weight decay 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fastssl.methods import register
from fastssl.methods._common import check_views
from fastssl.methods.base import Method, StepContext, TrainConfig
from fastssl.models import MAEEncoder, mae_vit
from fastssl.models.backbones import parse_vit_name


@dataclass
class MAEConfig(TrainConfig):
    method: str = "mae"
    backbone: str = "vit_base_patch16"
    image_size: int = 224
    epochs: int = 800
    batch_size: int = 4096
    base_lr: float = 1.5e-4
    warmup_epochs: float = 40.0
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    betas: tuple[float, float] = (0.9, 0.95)
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    decoder_dim: int = 512
    decoder_depth: int = 8
    decoder_heads: int = 16
    vit_depth: int | None = None


@register
class MAE(Method):
    name = "mae"
    config_class = MAEConfig
    # Fashion-MNIST at its own 28 px, under 10 minutes on a 2-core CPU: ViT-Tiny (4 blocks) with
    # 4 px patches (49 tokens, 12 kept), a 2-block decoder of width 128, batch 128, 10x the
    # paper's base LR for a short run, 2 epochs.
    presets = {"fashion-mnist": dict(
        backbone="vit_tiny_patch4", image_size=28, vit_depth=4, decoder_dim=128, decoder_depth=2,
        decoder_heads=4, batch_size=128, epochs=2, warmup_epochs=0.2, base_lr=0.0015,
    )}

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        if not 0.0 < cfg.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {cfg.mask_ratio}")
        size, patch = parse_vit_name(cfg.backbone)
        self.model = mae_vit(size, cfg.image_size, patch or 16, depth=cfg.vit_depth,
                             decoder_dim=cfg.decoder_dim, decoder_depth=cfg.decoder_depth,
                             decoder_heads=cfg.decoder_heads, norm_pix_loss=cfg.norm_pix_loss)

    def recipe(self):
        from fastssl.data import recipes

        return recipes.mae(size=self.cfg.image_size)

    def encoder(self) -> nn.Module:
        return MAEEncoder(self.model)

    def compile_modules(self) -> list[nn.Module]:
        return [self.model]  # encoder on the kept tokens, decoder and loss (the fused ops are custom ops)

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        imgs = check_views(batch, 1, self.name)[0]
        loss, _, mask = self.model(imgs, self.cfg.mask_ratio, backend=self.backend)
        return {"loss": loss}
