"""DINOv3's Gram anchoring loss (Siméoni et al. 2025), and GramLoss, a drop-in for DINOv3's module.

For patch features X_s (student) and X_t (the Gram teacher, an earlier frozen checkpoint), each
[N, D] per image, rows L2-normalised (apply_norm), the Gram matrices G = X X^T [N, N] are compared:

    loss = mean over images and entries (i, j) of (G_s[i, j] - G_t[i, j])^2

with negative similarities set to 0 in both matrices first (remove_neg), or only where the
teacher's is negative, the student's then only where both are (remove_only_teacher_neg).
img_level=False forms one Gram matrix over all B * N patches of the batch instead. Computed in
float32 (float64 for float64 input).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastssl.validation import check_bool, check_tensor


def gram_loss(output_feats: Tensor, target_feats: Tensor, *, apply_norm: bool = True, img_level: bool = True,
              remove_neg: bool = True, remove_only_teacher_neg: bool = False) -> Tensor:
    """The Gram anchoring loss of the module docstring; output_feats, target_feats [B, N, D] (or
    [B * N, D] with img_level=False). Gradient flows to both inputs, as in DINOv3 (whose Gram
    teacher is frozen)."""
    check_tensor("output_feats", output_feats, ndim=3 if img_level else (2, 3))
    check_tensor("target_feats", target_feats, ndim=3 if img_level else (2, 3), device=output_feats.device,
                 like="output_feats")
    if output_feats.shape != target_feats.shape:
        raise ValueError(f"output_feats and target_feats must have one shape, got "
                         f"{tuple(output_feats.shape)} and {tuple(target_feats.shape)}")
    if remove_neg and remove_only_teacher_neg:
        raise ValueError("remove_neg and remove_only_teacher_neg exclude each other, got both True")
    sims = []
    for feats in (output_feats, target_feats):
        feats = feats.to(torch.promote_types(feats.dtype, torch.float32))
        if apply_norm:
            feats = nn.functional.normalize(feats, dim=-1)
        if not img_level and feats.ndim == 3:
            feats = feats.flatten(0, 1)
        sims.append(feats @ feats.transpose(-1, -2))
    student_sim, target_sim = sims
    if remove_neg:
        student_sim, target_sim = student_sim.clamp(min=0), target_sim.clamp(min=0)
    elif remove_only_teacher_neg:
        student_sim = torch.where((student_sim < 0) & (target_sim < 0), 0.0, student_sim)
        target_sim = target_sim.clamp(min=0)
    return (student_sim - target_sim).pow(2).mean()


class GramLoss(nn.Module):
    """DINOv3's GramLoss: ``GramLoss(apply_norm=True, img_level=True, remove_neg=True,
    remove_only_teacher_neg=False)``, ``loss = gram(output_feats, target_feats, img_level=True)``;
    no state. The constructor's img_level is kept for the official signature; forward's decides."""

    def __init__(self, apply_norm: bool = True, img_level: bool = True, remove_neg: bool = True,
                 remove_only_teacher_neg: bool = False):
        super().__init__()
        self.apply_norm = check_bool("apply_norm", apply_norm)
        self.img_level = check_bool("img_level", img_level)
        self.remove_neg = check_bool("remove_neg", remove_neg)
        self.remove_only_teacher_neg = check_bool("remove_only_teacher_neg", remove_only_teacher_neg)
        if self.remove_neg and self.remove_only_teacher_neg:
            raise ValueError("remove_neg and remove_only_teacher_neg exclude each other, got both True")

    def forward(self, output_feats: Tensor, target_feats: Tensor, img_level: bool = True) -> Tensor:
        return gram_loss(output_feats, target_feats, apply_norm=self.apply_norm, img_level=img_level,
                         remove_neg=self.remove_neg, remove_only_teacher_neg=self.remove_only_teacher_neg)
