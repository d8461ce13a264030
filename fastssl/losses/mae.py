"""MAELoss: the official MAE `forward_loss(imgs, pred, mask)` call shape on fastssl.ops.mae_loss."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.ops.mae import mae_loss, patchify


class MAELoss(nn.Module):
    """criterion(imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L]) -> scalar loss.

    The official MaskedAutoencoderViT.forward_loss (He et al. 2021): target = patchify(imgs) with
    patch size p (L = (H/p)(W/p) patches, 'nchpwq->nhwpqc' layout), per-patch normalized when
    norm_pix_loss, loss = sum(mask * mean_P (pred - target)^2) / sum(mask). Defaults are the
    official class's (norm_pix_loss=False; the pretraining recipe passes --norm_pix_loss).
    Equals fastssl.ops.mae_loss(pred, patchify(imgs, p), mask, norm_pix_loss=...)."""

    def __init__(self, patch_size: int, norm_pix_loss: bool = False, backend: str = "auto") -> None:
        super().__init__()
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        if not isinstance(norm_pix_loss, bool):
            raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
        self.patch_size, self.norm_pix_loss, self.backend = patch_size, norm_pix_loss, backend

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        target = patchify(imgs, self.patch_size)
        return mae_loss(pred, target, mask, norm_pix_loss=self.norm_pix_loss, backend=self.backend)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix_loss={self.norm_pix_loss}"
