"""MAELoss: the official MAE `forward_loss(imgs, pred, mask)` call shape on fastssl.ops.mae_loss."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.ops.backend import BACKENDS
from fastssl.ops.mae import mae_loss
from fastssl.validation import check_bool, check_choice, check_int


class MAELoss(nn.Module):
    """criterion(imgs [N, C, H, W], pred [N, L, p*p*C], mask [N, L]) -> scalar loss.

    The official MaskedAutoencoderViT.forward_loss (He et al. 2021): target = patchify(imgs) with
    patch size p (L = (H/p)(W/p) patches, 'nchpwq->nhwpqc' layout), per-patch normalized when
    norm_pix_loss, loss = sum(mask * mean_P (pred - target)^2) / sum(mask). Defaults are the
    official class's (norm_pix_loss=False; the pretraining recipe passes --norm_pix_loss).
    The op reads the target from imgs in the patchify layout (no patchified copy):
    fastssl.ops.mae_loss(pred, imgs, mask, patch_size=p, norm_pix_loss=...).

    Extra keyword option: with_cls_token (pred [N, 1 + L, p*p*C] with the decoder's class-token
    row, which is skipped without a slice). backend is fixed here."""

    def __init__(self, patch_size: int, norm_pix_loss: bool = False, backend: str = "auto", *,
                 with_cls_token: bool = False) -> None:
        super().__init__()
        self.patch_size = check_int("patch_size", patch_size, low=1)
        self.norm_pix_loss = check_bool("norm_pix_loss", norm_pix_loss)
        self.with_cls_token = check_bool("with_cls_token", with_cls_token)
        self.backend = check_choice("backend", backend, BACKENDS)

    def forward(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return mae_loss(pred, imgs, mask, norm_pix_loss=self.norm_pix_loss, patch_size=self.patch_size,
                        with_cls_token=self.with_cls_token, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"patch_size={self.patch_size}, norm_pix_loss={self.norm_pix_loss}, "
                f"with_cls_token={self.with_cls_token}")
