"""RotNet's loss: 4-way rotation classification (Gidaris et al. 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl.validation import check_int, check_tensor


def rotation_loss(logits: Tensor, n_rotations: int = 4) -> tuple[Tensor, Tensor]:
    """logits [n_rotations * B, n_rotations], rotation-major (rows [r*B, (r+1)*B) are the images
    rotated by r * 360/n_rotations degrees) -> (cross-entropy against r in float32, accuracy)."""
    n_rotations = check_int("n_rotations", n_rotations, low=2)
    check_tensor("logits", logits, ndim=2)
    if logits.shape[1] != n_rotations or logits.shape[0] % n_rotations:
        raise ValueError(f"logits must be [n_rotations * B, n_rotations] with n_rotations={n_rotations}, "
                         f"got {tuple(logits.shape)}")
    target = torch.arange(n_rotations, device=logits.device).repeat_interleave(logits.shape[0] // n_rotations)
    loss = F.cross_entropy(logits.float(), target)
    accuracy = (logits.argmax(dim=1) == target).float().mean()
    return loss, accuracy.detach()
