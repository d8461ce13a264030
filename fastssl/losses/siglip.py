"""SigLipLoss: open_clip's SigLIP loss module on the fused op, with its distributed forms.

On W ranks, rank r's loss is its images against its own texts (positives on the diagonal) plus
its images against every other rank's texts (all negatives), as open_clip's SigLipLoss
computes it; the text features' gradient sums every rank's loss, the images', scale's and
bias's are the local loss's (DDP then averages them).

* dist_impl "bidir" / "shift": the other ranks' text blocks travel around the ring by neighbour
  exchange (both directions / one direction) and each is consumed by the fused op as it
  arrives. No block is kept for backward: the backward sends the blocks around once more,
  each with an fp32 gradient accumulator that every rank adds its share to (re-running the
  fused forward and backward on the block), and hands each accumulator to its owner at the end.
  Peak memory: two blocks per direction and the accumulators, flat in the number of ranks; the
  price is one more forward pass per remote block and twice the backward's traffic.
* dist_impl "gather" / "reduce": every rank's texts are all-gathered with gradient ([W·N, D])
  and one fused call scores the images against all of them (label offset rank·N).
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.distributed import all_gather_with_grad, check_process_group, exchange, get_rank, get_world_size
from fastssl.ops.siglip_loss import siglip_loss
from fastssl.validation import check_bool, check_choice, check_int

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")


def _ring_routes(world_size: int, dist_impl: str) -> tuple[tuple[int, int], ...]:
    """(direction, hops) of each chain of neighbour exchanges that brings every other rank's block
    to this rank once: "shift" one way around the ring, "bidir" half each way (the odd one right)."""
    if dist_impl == "shift":
        return ((1, world_size - 1),)
    half, odd = divmod(world_size - 1, 2)
    return tuple(route for route in ((1, half + odd), (-1, half)) if route[1] > 0)


def _ring_step(tensors: list, routes: tuple, step: int) -> list[tuple[int, torch.Tensor]]:
    """Move each route's tensor one hop along its direction if the route still has hops left at
    `step`; returns (route index, received tensor) for those that moved."""
    rank, world = get_rank(), get_world_size()
    live = [i for i, (_, hops) in enumerate(routes) if step < hops]
    moved = exchange([(tensors[i], (rank + routes[i][0]) % world, (rank - routes[i][0]) % world)
                      for i in live])
    return list(zip(live, moved))


class _RingTexts(torch.autograd.Function):
    """Σ over the other ranks' text blocks of siglip_loss(image, block, t, b, label_offset=None),
    the blocks streamed by neighbour exchange (see the module docstring)."""

    @staticmethod
    def forward(ctx, image, text, logit_scale, logit_bias, routes, backend):
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.routes, ctx.backend = routes, backend
        loss = torch.zeros((), dtype=torch.promote_types(image.dtype, torch.float32), device=image.device)
        blocks = [text for _ in routes]
        for step in range(max(hops for _, hops in routes)):
            for i, block in _ring_step(blocks, routes, step):
                blocks[i] = block
                loss += siglip_loss(image, block, logit_scale, logit_bias, label_offset=None, backend=backend)
        return loss.to(image.dtype)

    @staticmethod
    def backward(ctx, grad):
        inputs = ctx.saved_tensors  # image, text, logit_scale, logit_bias
        text, routes = inputs[1], ctx.routes
        wanted = [x is not None and need for x, need in zip(inputs, ctx.needs_input_grad)]
        leaves = [None if x is None else x.detach().requires_grad_(need) for x, need in zip(inputs, wanted)]
        acc_dtype = torch.promote_types(text.dtype, torch.float32)
        sums = [None if x is None else torch.zeros(x.shape, dtype=acc_dtype, device=x.device) for x in inputs]
        # each route carries [block, the block's gradient accumulator] stacked in one message
        packets = [torch.stack([text.detach().to(acc_dtype), torch.zeros_like(text, dtype=acc_dtype)])
                   for _ in routes]
        for step in range(max(hops for _, hops in routes)):
            for i, packet in _ring_step(packets, routes, step):
                call = [leaves[0], packet[0].to(text.dtype).requires_grad_(wanted[1]), leaves[2], leaves[3]]
                with torch.enable_grad():
                    loss = siglip_loss(*call, label_offset=None, backend=ctx.backend)
                    needed = [x for x, need in zip(call, wanted) if need]
                    grads = iter(torch.autograd.grad(loss, needed, grad))
                for j in (j for j, need in enumerate(wanted) if need):
                    (packet[1] if j == 1 else sums[j]).add_(next(grads))
                packets[i] = packet
        if wanted[1]:
            # each accumulator holds every rank's share for the block it carries: back to its owner
            rank, world = get_rank(), get_world_size()
            owned = exchange([(packets[i][1], (rank - d * hops) % world, (rank + d * hops) % world)
                              for i, (d, hops) in enumerate(routes)])
            sums[1] = sum(owned)
        grads = [s.to(x.dtype) if need else None for s, x, need in zip(sums, inputs, wanted)]
        return (*grads, None, None)


class SigLipLoss(nn.Module):
    """Drop-in for open_clip's SigLipLoss (Zhai et al. 2023) on the fused op (fastssl.ops.siglip_loss).

    forward(image_features [N, D], text_features [N, D], logit_scale, logit_bias, output_dict=False)
    -> the scalar loss (or {"contrastive_loss": loss}); logit_scale is the exp'd scale as open_clip
    passes it, logit_bias may be None. With world_size > 1 every rank passes the same N and the
    default process group's ranks are `rank` / `world_size`. cache_labels is kept for the
    constructor's sake: the fused loss builds no labels. backend picks the kernel path.
    """

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: str | None = None, *, backend: str = "auto") -> None:
        super().__init__()
        self.cache_labels = check_bool("cache_labels", cache_labels)
        self.world_size = check_int("world_size", world_size, low=1)
        self.rank = check_int("rank", rank, low=0, high=self.world_size - 1)
        self.dist_impl = check_choice("dist_impl", dist_impl or "bidir", DIST_IMPLS)
        self.backend = backend

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        if self.world_size > 1:
            check_process_group("SigLipLoss", self.rank, self.world_size)
        if self.world_size > 1 and self.dist_impl in ("gather", "reduce"):
            texts = all_gather_with_grad(text_features)
            loss = siglip_loss(image_features, texts, logit_scale, logit_bias,
                               label_offset=self.rank * text_features.shape[0], backend=self.backend)
        else:
            loss = siglip_loss(image_features, text_features, logit_scale, logit_bias, backend=self.backend)
        if self.world_size > 1 and self.dist_impl in ("bidir", "shift"):
            scale, bias = (v if isinstance(v, torch.Tensor) or v is None
                           else torch.tensor(float(v), device=image_features.device)
                           for v in (logit_scale, logit_bias))
            loss = loss + _RingTexts.apply(image_features, text_features, scale, bias,
                                           _ring_routes(self.world_size, self.dist_impl), self.backend)
        return {"contrastive_loss": loss} if output_dict else loss

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, world_size={self.world_size}, dist_impl={self.dist_impl!r}, "
                f"backend={self.backend!r}")
