"""Instance discrimination's NCE loss (Wu, Xiong, Yu, Lin 2018, "Unsupervised Feature Learning
via Non-Parametric Instance Discrimination", eqs. 4-8).

With features f (L2-normalised) and bank rows v, P(i | v) = exp(v . f_i / tau) / Z_i, the
partition Z_i ≈ Z = N * E_j[exp(v_j . f_i / tau)] estimated once, from the first batch, by
Monte Carlo over the sampled rows and then held fixed (eq. 8). Noise P_n = 1 / N (uniform), m noise
samples per data sample, h(i, v) = P(i | v) / (P(i | v) + m P_n):

    J = -E[log h(i, v_i)] - m E_{v'}[log(1 - h(i, v'))]

summed over the positive and the m sampled negatives per example, averaged over the batch."""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.validation import check_int, check_positive, check_tensor

EPS = 1e-7  # keeps the logs finite, as the official NCECriterion does


def nce_partition(scores: Tensor, temperature: float, bank_size: int) -> Tensor:
    """Z = N * mean(exp(scores / tau)) over every score of the batch (positives and negatives)."""
    return torch.exp(scores.detach().float() / temperature).mean() * bank_size


def nce_loss(scores: Tensor, temperature: float, partition: Tensor, bank_size: int) -> Tensor:
    """scores [B, 1 + m]: column 0 = v_i . f_i, columns 1.. = the m sampled rows . f_i ->
    the NCE loss J above (a scalar)."""
    check_tensor("scores", scores, ndim=2)
    temperature = check_positive("temperature", temperature)
    bank_size = check_int("bank_size", bank_size, low=1)
    m = scores.shape[1] - 1
    if m < 1:
        raise ValueError(f"scores must hold the positive and at least one negative per row, "
                         f"got {tuple(scores.shape)}")
    p = torch.exp(scores.float() / temperature) / partition
    noise = m / bank_size
    log_pos = torch.log(p[:, 0] / (p[:, 0] + noise + EPS))
    log_neg = torch.log(noise / (p[:, 1:] + noise + EPS))
    return -(log_pos.sum() + log_neg.sum()) / scores.shape[0]


__all__ = ["nce_loss", "nce_partition"]
