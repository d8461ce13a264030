"""Where a run executes, decided once per process for the CLI and the Python API alike: the
process group, this process's device, and the split of the global batch over the ranks.

    run = init_run(cfg)          # joins torchrun's group (if any), checks the batch split
    loader = build_loader(..., batch_size=run.batch_per_rank, shard_id=run.rank, num_shards=run.world)
    Trainer(method, loader, run=run).fit()

A Trainer given no `run` calls init_run itself, so the group is joined in one place either way."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fastssl.distributed import get_rank, get_world_size, is_distributed


@dataclass(frozen=True)
class RunContext:
    """This process's place in the run: rank and world size of the group, the device it trains
    on, and the global batch (every rank's share together) with this rank's share of it."""

    rank: int
    world: int
    device: torch.device
    batch_size: int

    @property
    def batch_per_rank(self) -> int:
        return self.batch_size // self.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK in the
    environment): NCCL with one GPU per process, gloo on CPU. Returns (rank, world, device).
    timeout_s: how long a collective may wait for the slowest rank before the group fails
    (None: torch's default). A group that is already initialised (tests) is used as is."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not is_distributed() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
    return get_rank(), get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def global_batch_size(cfg) -> int:
    """The run's global batch, every rank's share together: the one reading of it from the config."""
    return cfg.data.batch_size


def init_run(cfg) -> RunContext:
    """Join the process group (cfg.dist.dist_timeout_s) and set both batch fields of cfg.data for
    this world size (the global batch and each rank's share, the one not given derived from the
    other: TrainConfig.for_world), checking that each share splits into cfg.dist.accum_steps
    equal micro-batches."""
    rank, world, device = init_distributed(cfg.dist.dist_timeout_s)
    cfg.data = cfg.for_world(world).data
    return RunContext(rank=rank, world=world, device=device, batch_size=global_batch_size(cfg))


def rank0_value(value: Any, world: int) -> Any:
    """rank 0's `value` on every rank (a one-off broadcast, never per step)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def epoch_batches(loader: Iterable, epoch: int, skip: int) -> Iterator:
    """The batches of `epoch` from its batch `skip` on (a mid-epoch resume): a fastssl Loader
    starts there and reads nothing before; another loader, deterministic per (seed, epoch),
    is iterated past the batches consumed."""
    from fastssl.data.loader import Loader

    if isinstance(loader, Loader):
        loader.set_epoch(epoch, start=skip)
        return iter(loader)
    if hasattr(loader, "set_epoch"):
        loader.set_epoch(epoch)
    batches = iter(loader)
    for _ in range(skip):
        next(batches)
    return batches


def evaluate(method: nn.Module, evaluator: Callable[[nn.Module], dict[str, float]], device: torch.device,
             autocast: dict[str, Any]) -> dict[str, float]:
    """`evaluator` on the method's encoder in eval mode (the method's mode comes back after).

    Every rank calls the evaluator: a distributed one (the CLI's) extracts each rank's shard,
    so no rank waits in a collective, past its timeout, while rank 0 does all the work. Under
    parallel=fsdp each rank evaluates a full copy gathered from the shards: a sharded forward
    would make every batch a collective, and the ranks' shares may differ by a batch."""
    from fastssl.engine.parallel import unsharded_copy

    method = unsharded_copy(method, device)
    was_training = method.training
    method.eval()
    with torch.no_grad(), torch.autocast(**autocast):
        result = evaluator(method.encoder())
    method.train(was_training)
    return result


def device_name(device: torch.device, world: int) -> str:
    """The device of a run for its summary: the GPU's name, or the CPU's threads, times the ranks."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} x{world}"
    return f"cpu ({torch.get_num_threads()} threads) x{world}"


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """With `enabled`, deterministic kernels (warn-only where torch has none) and no cuDNN
    autotuning inside the block; the process's settings come back afterwards."""
    if not enabled:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled(), torch.backends.cudnn.benchmark)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
