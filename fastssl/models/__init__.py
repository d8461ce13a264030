"""Backbones, heads, EMA teachers and the MAE model used by fastssl.methods."""

from fastssl.models.backbones import build_backbone
from fastssl.models.ema import cosine_momentum, ema_update_, frozen_copy
from fastssl.models.heads import (
    DINOHead,
    MultiCropWrapper,
    SplitBatchNorm2d,
    moco_v2_head,
    moco_v3_mlp,
    simclr_head,
    split_batch_norm_,
)
from fastssl.models.mae import MAEEncoder, MaskedAutoencoderViT, mae_vit, sincos_pos_embed_2d
from fastssl.models.text import TextTransformer

__all__ = [
    "DINOHead", "MAEEncoder", "MaskedAutoencoderViT", "MultiCropWrapper", "SplitBatchNorm2d",
    "TextTransformer",
    "build_backbone", "cosine_momentum", "ema_update_", "frozen_copy", "mae_vit", "moco_v2_head",
    "moco_v3_mlp", "simclr_head", "sincos_pos_embed_2d", "split_batch_norm_",
]
