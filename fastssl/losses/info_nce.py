"""InfoNCELoss: the MoCo v2 / v3 contrastive loss as a module, with cross-GPU key gathering."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.distributed import (
    all_gather_no_grad,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    is_distributed,
)
from fastssl.ops.backend import BACKENDS
from fastssl.ops.info_nce import info_nce
from fastssl.validation import check_bool, check_choice, check_positive


class InfoNCELoss(nn.Module):
    """criterion(query [N, D], key [N, D], queue [K, D] | None) -> loss (see fastssl.ops.info_nce).

    gather_distributed=True (in-batch form only, MoCo v3): keys are all-gathered from every
    rank, [W·N, D] rank-major (with gradient when key requires one: a momentum encoder's keys
    are gathered without), and row i's target is key rank·N + i. Every rank
    must pass the same N. The gather's backward all-reduces the key gradients, so with DDP's
    gradient averaging each rank's query and key receive the gradient of the mean of the
    ranks' losses, which equals the loss on the concatenated batch.

    scale_by_2t=True multiplies the loss by 2 * temperature, as MoCo v3's contrastive_loss does
    (Chen, Xie, He 2021): with gather_distributed=True it then equals the official
    `nn.CrossEntropyLoss()(q @ concat_all_gather(k).T / T, arange(N) + N * rank) * 2 * T`.

    With a queue (MoCo v2): criterion(query, key, queue) contrasts each query with its own key
    and the queue's rows, which are used as given and get no gradient. backend is fixed here.
    """

    def __init__(self, temperature: float = 0.2, normalize: bool = True, gather_distributed: bool = False,
                 reduction: str = "mean", backend: str = "auto", *, scale_by_2t: bool = False) -> None:
        super().__init__()
        self.scale_by_2t = check_bool("scale_by_2t", scale_by_2t)
        self.temperature = check_positive("temperature", temperature)
        self.normalize = check_bool("normalize", normalize)
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.reduction = reduction
        self.backend = check_choice("backend", backend, BACKENDS)

    def forward(
        self, query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None
    ) -> torch.Tensor:
        label_offset = 0
        if self.gather_distributed and is_distributed() and get_world_size() > 1:
            if queue is not None:
                raise ValueError("gather_distributed=True applies to the in-batch form (queue=None); "
                                 "got a queue, whose keys are local by design (MoCo v2)")
            if not isinstance(key, torch.Tensor) or not isinstance(query, torch.Tensor):
                raise TypeError(f"query and key must be torch.Tensors, got {type(query).__name__} "
                                f"and {type(key).__name__}")
            if key.shape[0] != query.shape[0]:
                raise ValueError(f"gather_distributed=True needs one key per query on each rank, got "
                                 f"query {tuple(query.shape)} and key {tuple(key.shape)}")
            key = all_gather_with_grad(key) if key.requires_grad else all_gather_no_grad(key)
            label_offset = get_rank() * query.shape[0]
        loss = info_nce(query, key, queue, temperature=self.temperature, normalize=self.normalize,
                        label_offset=label_offset, reduction=self.reduction, backend=self.backend)
        return loss * (2 * self.temperature) if self.scale_by_2t else loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"gather_distributed={self.gather_distributed}, reduction={self.reduction!r}, "
                f"scale_by_2t={self.scale_by_2t}")
