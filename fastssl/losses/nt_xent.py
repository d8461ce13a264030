"""NTXentLoss: SimCLR's normalized-temperature cross-entropy (Chen et al. 2020) over both views,
2N−1 candidates per row, through the fused InfoNCE (`info_nce(…, exclude_self=True)`).

A drop-in for lightly's `lightly.loss.NTXentLoss` (same constructor, `forward(out0, out1)`,
the same empty state dict): with out0, out1 [B, D] the two views' projections,

    z = [out0; out1] (L2-normalized rows),  ℓ_i = −log exp(ẑ_i·ẑ_t(i)/T) / Σ_{k ≠ i} exp(ẑ_i·ẑ_k/T),

t(i) the other view of the same image, averaged over the 2B rows. gather_distributed=True
takes the k over every rank's views (all-gathered with gradient, rank-major), so each rank's
loss is its 2B rows' mean and DDP's gradient averaging gives the loss on the concatenated batch.

Multi-crop (fastssl's extension, `forward(out0, out1, local_crops=[c_1 … c_L])`, each [B, D]):
every local crop's projection is contrasted with each global view's in-batch (InfoNCE with the
crop's rows as queries and one global view's B rows, of every rank when gathered, as keys:
positive = the same image's, negatives = the other images'), and the loss is the mean over the
view pairs, NT-Xent's global pair and the 2L (local, global) pairs:
(NT-Xent + Σ_l Σ_v InfoNCE(c_l, out_v)) / (1 + 2L).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from fastssl.distributed import all_gather_with_grad, get_rank, get_world_size, is_distributed
from fastssl.ops.backend import BACKENDS
from fastssl.ops.info_nce import info_nce
from fastssl.validation import check_bool, check_choice, check_int, check_positive, check_tensor


class NTXentLoss(nn.Module):
    """criterion(out0 [B, D], out1 [B, D]) -> scalar NT-Xent loss (see the module docstring).

    memory_bank_size: lightly's MoCo-style negatives from a memory bank; only 0 (SimCLR) is
    offered here: a memory bank is MoCo v2's queue (`--method mocov2`, or `InfoNCELoss` with a
    `fastssl.queue.KeyQueue`). backend: the kernel path of `fastssl.ops.info_nce`.
    """

    def __init__(self, temperature: float = 0.5, memory_bank_size: int | tuple[int, int] = 0,
                 gather_distributed: bool = False, *, backend: str = "auto") -> None:
        super().__init__()
        self.temperature = check_positive("temperature", temperature)
        # lightly also takes a (num_features, dim) pair
        size = memory_bank_size[0] if isinstance(memory_bank_size, (tuple, list)) else memory_bank_size
        if check_int("memory_bank_size", size) != 0:
            raise ValueError(f"memory_bank_size must be 0 (SimCLR's in-batch negatives), got "
                             f"{memory_bank_size}; for a memory bank use MoCo v2's queue (--method mocov2, "
                             f"or InfoNCELoss with a KeyQueue)")
        self.memory_bank_size = 0
        self.gather_distributed = check_bool("gather_distributed", gather_distributed)
        self.backend = check_choice("backend", backend, BACKENDS)

    def forward(self, out0: torch.Tensor, out1: torch.Tensor,
                local_crops: Sequence[torch.Tensor] = ()) -> torch.Tensor:
        check_tensor("out0", out0, ndim=2)
        for name, out in [("out1", out1)] + [(f"local_crops[{i}]", c) for i, c in enumerate(local_crops)]:
            check_tensor(name, out, ndim=2, device=out0.device, like="out0")
            if out.shape != out0.shape:
                raise ValueError(f"{name} must have out0's shape {tuple(out0.shape)} (one row per image and "
                                 f"view), got {tuple(out.shape)}")
        z = torch.cat([out0, out1.to(out0.dtype)])
        keys, rank = z, 0
        if self.gather_distributed and is_distributed() and get_world_size() > 1:
            keys, rank = all_gather_with_grad(z), get_rank()
        loss = info_nce(z, keys, temperature=self.temperature, normalize=True, label_offset=rank * z.shape[0],
                        exclude_self=True, backend=self.backend)
        if not local_crops:
            return loss
        batch = out0.shape[0]
        # the gathered rows are rank-major [out0; out1] per rank: one global view's rows of every
        # rank are a view on one rank, a copy of world x B rows on several
        per_view = keys.unflatten(0, (keys.shape[0] // z.shape[0], 2, batch))
        for view in range(2):
            view_keys = per_view[:, view].flatten(0, 1)
            for crop in local_crops:
                loss = loss + info_nce(crop.to(z.dtype), view_keys, temperature=self.temperature,
                                       normalize=True, label_offset=rank * batch, backend=self.backend)
        return loss / (1 + 2 * len(local_crops))

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, gather_distributed={self.gather_distributed}"
