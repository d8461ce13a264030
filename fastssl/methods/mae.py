"""MAE (He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

ViT encoder on the 25% kept patches (fastssl.ops.random_masking, which adds the fixed sin-cos
position embedding to the kept patches and writes the class token in the same pass), decoder of
8 blocks of width 512 fed by fastssl.ops.unshuffle_tokens (mask tokens, class token and decoder
position embedding in one pass), per-patch-normalized pixel MSE on the masked patches read from
the images (the model's criterion, fastssl.losses.MAELoss). AdamW (beta2 0.95), lr 1.5e-4 * B / 256,
40 warm-up epochs + cosine, weight decay 0.05.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import check_views
from fastssl.models import MAEEncoder, mae_vit
from fastssl.models.backbones import parse_vit_name


@dataclass
class MAEConfig(MethodConfig):
    name: ClassVar[str] = "mae"
    defaults: ClassVar[dict] = dict(backbone="vit_base_patch16", image_size=224, epochs=800, batch_size=4096,
                                    base_lr=1.5e-4, warmup_epochs=40.0, weight_decay=0.05, optimizer="adamw",
                                    betas=(0.9, 0.95))
    mask_ratio: float = setting(0.75, "fraction of patches masked", low=0, high=1, low_open=True,
                                high_open=True)
    norm_pix_loss: bool = setting(True, "per-patch normalized pixel targets")
    decoder_dim: int = setting(512, "MAE decoder width", low=1, high=65536)
    decoder_depth: int = setting(8, "MAE decoder blocks", low=1, high=256)
    decoder_heads: int = setting(16, "MAE decoder attention heads", low=1, high=1024)


@register
class MAE(Method, config=MAEConfig):
    # Fashion-MNIST at its own 28 px, under 10 minutes on a 2-core CPU: ViT-Tiny (3 blocks) with
    # 4 px patches (49 tokens, 12 kept), a 2-block decoder of width 128, batch 128, 10x the
    # paper's base LR for a short run, 2 epochs.
    presets = {"fashion-mnist": dict(
        backbone="vit_tiny_patch4", image_size=28, vit_depth=3, decoder_dim=128, decoder_depth=2,
        decoder_heads=4, batch_size=128, epochs=2, warmup_epochs=0.2, base_lr=0.0015,
    )}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if cfg.model.vit_reg_tokens:
            raise ValueError(f"vit_reg_tokens: MAE's ViT has no register tokens, got "
                             f"{cfg.model.vit_reg_tokens}; set vit_reg_tokens=0")
        size, patch = parse_vit_name(cfg.model.backbone)
        self.model = mae_vit(size, cfg.data.image_size, patch or 16, depth=cfg.model.vit_depth,
                             decoder_dim=cfg.method.decoder_dim, decoder_depth=cfg.method.decoder_depth,
                             decoder_heads=cfg.method.decoder_heads, norm_pix_loss=cfg.method.norm_pix_loss,
                             backend=self.backend)

    def encoder(self) -> nn.Module:
        return MAEEncoder(self.model)

    def compile_modules(self) -> list[nn.Module]:
        return [self.model]  # encoder on the kept tokens, decoder, criterion (the fused ops are custom ops)

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        imgs = check_views(batch, 1, self.name)[0]
        loss, _, _ = self.model(imgs, self.cfg.method.mask_ratio)
        return {"loss": loss}
