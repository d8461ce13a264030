"""Fused ops: Triton kernels with a pure-PyTorch reference (`*_ref`) each."""

from fastssl.ops.dino_loss import dino_loss, dino_loss_ref, dino_update_center_, soft_cross_entropy
from fastssl.ops.info_nce import info_nce, info_nce_ref
from fastssl.ops.mae import mae_loss, patchify, random_masking, unpatchify, unshuffle_tokens

__all__ = [
    "dino_loss", "dino_loss_ref", "dino_update_center_", "info_nce", "info_nce_ref", "mae_loss",
    "patchify", "random_masking", "soft_cross_entropy", "unpatchify", "unshuffle_tokens",
]
