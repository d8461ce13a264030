"""ClipLoss: open_clip's CLIP loss module on the fused CLIP op (fastssl.ops.clip_loss).

CLIP (Radford et al. 2021) is symmetric InfoNCE with a learned logit scale t. On W ranks the
features are all-gathered (with or without gradient, as open_clip's gather_features does):

* local_loss=True: this rank's N rows against every rank's W·N rows in both directions, labels
  offset by rank·N (the op's local form: two row-wise sweeps).
* local_loss=False: every rank scores the whole W·N × W·N grid (the op's one-grid form: both
  directions from one sweep). Without gather_with_grad, the gathered copy carries this rank's own
  tensors in its slot, so they keep their gradient.

One process is the one-grid form on its N rows. No [N × W·N] logits buffer exists on the Triton
backend. A logit bias changes nothing (cross-entropy is shift-invariant); its gradient is zero.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.distributed import all_gather_no_grad, all_gather_with_grad, check_process_group
from fastssl.ops.clip_loss import clip_loss
from fastssl.validation import check_bool, check_int


class ClipLoss(nn.Module):
    """Drop-in for open_clip's ClipLoss (Radford et al. 2021) on the fused CLIP op.

    forward(image_features [N, D], text_features [N, D], logit_scale, logit_bias=None,
    output_dict=False) -> the scalar loss (or {"contrastive_loss": loss}); logit_scale is the
    exp'd scale as open_clip passes it (a one-element tensor or a number). With world_size > 1
    every rank passes the same N and the default process group's ranks are `rank` /
    `world_size`. cache_labels is kept for the constructor's sake: the fused loss builds no
    labels. use_horovod=True is refused (torch.distributed does the gathers). backend picks the
    kernel path.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.local_loss = check_bool("local_loss", local_loss)
        self.gather_with_grad = check_bool("gather_with_grad", gather_with_grad)
        self.cache_labels = check_bool("cache_labels", cache_labels)
        self.world_size = check_int("world_size", world_size, low=1)
        self.rank = check_int("rank", rank, low=0, high=self.world_size - 1)
        if check_bool("use_horovod", use_horovod):
            raise ValueError("use_horovod=True is not supported: ClipLoss gathers with torch.distributed; "
                             "launch with torchrun and pass use_horovod=False")
        self.use_horovod = False
        self.backend = backend

    def _gather(self, features: torch.Tensor) -> torch.Tensor:
        """Every rank's rows, rank-major, as open_clip's gather_features builds them."""
        if self.gather_with_grad:
            return all_gather_with_grad(features)
        gathered = all_gather_no_grad(features)
        if self.local_loss:
            return gathered
        parts = list(gathered.chunk(self.world_size))
        parts[self.rank] = features
        return torch.cat(parts)

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        kw = {}
        if self.world_size > 1:
            check_process_group("ClipLoss", self.rank, self.world_size)
            all_images, all_texts = self._gather(image_features), self._gather(text_features)
            if self.local_loss:
                kw = dict(all_image_features=all_images, all_text_features=all_texts,
                          label_offset=self.rank * image_features.shape[0])
            else:
                image_features, text_features = all_images, all_texts
        loss = clip_loss(image_features, text_features, logit_scale, logit_bias, **kw, backend=self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"local_loss={self.local_loss}, gather_with_grad={self.gather_with_grad}, rank={self.rank}, "
                f"world_size={self.world_size}, backend={self.backend!r}")
