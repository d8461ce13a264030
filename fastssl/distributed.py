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


@torch.no_grad()
def batch_shuffle(x: torch.Tensor,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo's shuffling BN across ranks (He et al. 2020, sec. 3.3): gather [n, ...] from every
    rank, permute the [W*n, ...] batch with one permutation (drawn on rank 0 from `generator`,
    or the default generator of x's device, and broadcast, so every rank agrees), and return
    this rank's n rows of it with the inverse permutation for `batch_unshuffle`.

    A key encoder's BatchNorm then sees, on each rank, samples whose queries were normalized
    on other ranks, so BN statistics cannot leak which key is the positive. Without a process
    group the permutation is local (useful with BatchNorm over sub-batches). No host sync."""
    world, rank = get_world_size(), get_rank()
    x_all = all_gather_no_grad(x)
    perm = torch.randperm(x_all.shape[0], device=x.device, generator=generator)
    if world > 1:
        dist.broadcast(perm, src=0)
    return x_all[perm.view(world, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle(y: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """Undo `batch_shuffle` on its output's image y [n, ...]: this rank's rows, in the order of
    the x it passed to batch_shuffle."""
    world, rank = get_world_size(), get_rank()
    if inverse.shape[0] != world * y.shape[0]:
        raise ValueError(f"inverse: expected {world} * {y.shape[0]} entries (world size * rows of y), "
                         f"got {inverse.shape[0]}")
    return all_gather_no_grad(y)[inverse.view(world, -1)[rank]]


def comm_device() -> torch.device:
    """Where the default group's collectives take their tensors: the current GPU under NCCL,
    else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def all_gather_rows(x: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    """[n_r, ...] on rank r -> [sum_r n_r, ...] (rank-major) on every rank, on x's device; the
    ranks' n_r may differ (shards of a dataset). Sent in chunks of `chunk_rows` rows on the
    device the backend needs (CUDA for NCCL), so a large feature bank never sits on a GPU whole.
    Identity when not distributed."""
    if not is_distributed() or get_world_size() == 1:
        return x
    world = get_world_size()
    comm = comm_device()
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([x.shape[0]], dtype=torch.int64, device=comm))
    sizes = [int(s.item()) for s in sizes]
    parts: list[list[torch.Tensor]] = [[] for _ in range(world)]
    for start in range(0, max(sizes), chunk_rows):
        rows = min(chunk_rows, max(sizes) - start)
        piece = torch.zeros((rows, *x.shape[1:]), dtype=x.dtype, device=comm)
        mine = x[start:start + rows]
        piece[:mine.shape[0]] = mine.to(comm)
        gathered = [torch.empty_like(piece) for _ in range(world)]
        dist.all_gather(gathered, piece)
        for r, g in enumerate(gathered):
            parts[r].append(g[:max(0, min(rows, sizes[r] - start))].to(x.device))
    return torch.cat([p for rank_parts in parts for p in rank_parts])


def exchange(transfers: list[tuple[torch.Tensor, int, int]]) -> list[torch.Tensor]:
    """Point-to-point exchanges posted together: for each (tensor, dst, src), send `tensor` to rank
    dst and receive a tensor of its shape and dtype from rank src. Returns the received tensors in
    order; no autograd. Every rank must post the matching transfers (a ring shift, a neighbour swap)."""
    received = [torch.empty_like(t, memory_format=torch.contiguous_format) for t, _, _ in transfers]
    ops = [dist.P2POp(dist.isend, t.contiguous(), dst) for t, dst, _ in transfers]
    ops += [dist.P2POp(dist.irecv, r, src) for r, (_, _, src) in zip(received, transfers)]
    for request in dist.batch_isend_irecv(ops):
        request.wait()
    return received


def check_process_group(owner: str, rank: int, world_size: int) -> None:
    """Raise unless the default process group has this rank and size (a module told its rank and
    world size at construction, as open_clip's losses are, must run in that group)."""
    if not is_distributed() or (get_rank(), get_world_size()) != (rank, world_size):
        raise RuntimeError(f"{owner}(rank={rank}, world_size={world_size}) needs the default process group "
                           f"to have that rank and size; init torch.distributed first (got rank {get_rank()} "
                           f"of {get_world_size()})")
