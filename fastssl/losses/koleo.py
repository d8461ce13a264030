"""The KoLeo regulariser (Kozachenko-Leonenko entropy estimate; Sablayrolles et al. 2019, as DINOv2
uses it), and KoLeoLoss, a drop-in for DINOv2's module.

For B vectors x_i, normalised u_i = x_i / max(||x_i||, eps), each takes its nearest neighbour by
inner product with the diagonal excluded, n(i) = argmax_{j != i} <u_i, u_j>, and

    loss = -1/B * sum_i log(||u_i - u_{n(i)} + eps||_2 + eps)

(the distance as torch's PairwiseDistance computes it, eps inside the norm). Computed in float32
(float64 for float64 input) with autocast off: in half precision eps = 1e-8 rounds to 0 and two
equal vectors give log(0). With eps inside the norm, two equal vectors are at distance
eps * sqrt(D), so the loss and its gradient stay finite for duplicates and batches of 2.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn

from fastssl.distributed import all_gather_with_grad, get_rank, get_world_size
from fastssl.validation import check_bool, check_positive, check_tensor


def _nearest_neighbours(u: Tensor, others: Tensor, self_offset: int) -> Tensor:
    """argmax_j <u_i, others_j> over j != self_offset + i (the row of u_i itself in `others`)."""
    dots = u @ others.t()
    rows = torch.arange(u.shape[0], device=u.device)
    dots[rows, rows + self_offset] = float("-inf")
    return dots.argmax(dim=1)


def koleo_loss(x: Tensor, eps: float = 1e-8, *, distributed: bool = False) -> Tensor:
    """The KoLeo loss (module docstring) of x [B, D], B >= 2; a float32 scalar (float64 for float64).

    distributed=True: the nearest neighbours are searched in the batch gathered from every rank
    (all ranks pass the same B), and the loss is the mean over this rank's rows; the ranks' losses
    average to the loss of the gathered batch, and the gradients, averaged over ranks as DDP does,
    to its gradient."""
    check_tensor("x", x, ndim=2)
    if x.shape[0] < 2:
        raise ValueError(f"x must have at least 2 rows (each row's nearest other row), got shape "
                         f"{tuple(x.shape)}")
    eps = check_positive("eps", eps)
    distributed = check_bool("distributed", distributed)
    # meta tensors (the step-launch count) have no autocast to switch off
    autocast_off = (torch.autocast(device_type=x.device.type, enabled=False)
                    if torch.amp.is_autocast_available(x.device.type) else contextlib.nullcontext())
    with autocast_off:
        u = nn.functional.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), p=2, dim=-1, eps=eps)
        others, offset = u, 0
        if distributed and get_world_size() > 1:
            others, offset = all_gather_with_grad(u), get_rank() * u.shape[0]
        with torch.no_grad():
            neighbours = _nearest_neighbours(u, others, offset)
        distances = nn.functional.pairwise_distance(u, others[neighbours], p=2, eps=eps)
        return -torch.log(distances + eps).mean()


class KoLeoLoss(nn.Module):
    """DINOv2's KoLeoLoss: ``KoLeoLoss()``, ``loss = koleo(student_output [B, D], eps=1e-8)``; no
    state (state_dict() is empty, as the official's). `pairwise_NNs_inner(x)` gives the nearest
    neighbour indices of L2-normalised rows. Keyword option: distributed (see `koleo_loss`)."""

    def __init__(self, *, distributed: bool = False):
        super().__init__()
        self.distributed = check_bool("distributed", distributed)
        self.pdist = nn.PairwiseDistance(2, eps=1e-8)

    @torch.no_grad()
    def pairwise_NNs_inner(self, x: Tensor) -> Tensor:  # noqa: N802 (the official name)
        """Index of each row's nearest other row by inner product [B]."""
        return _nearest_neighbours(x, x, 0)

    def forward(self, student_output: Tensor, eps: float = 1e-8) -> Tensor:
        return koleo_loss(student_output, eps, distributed=self.distributed)
