"""torch.distributed helpers: rank/world size that work without a process group,
and an all-gather that carries gradients back to every rank."""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate `x` from every rank along dim 0; backward sums the incoming
    gradients over ranks (all-reduce) and returns this rank's slice, so each
    rank's input receives the gradient of the global loss sum."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each of W ranks -> [W*n, ...] (rank-major); identity when not distributed.

    Every rank must pass the same n. The gradient is exact for a loss that each
    rank computes on the gathered tensor and that the ranks' gradients are
    averaged or summed over afterwards (as DDP does)."""
    if not is_distributed() or get_world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Like all_gather_with_grad, without autograd (keys for a queue, labels)."""
    if not is_distributed() or get_world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_sum_(x: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; no-op without a process group."""
    if is_distributed() and get_world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x
