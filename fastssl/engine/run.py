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
from torch.distributed.constants import default_pg_timeout

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


class RejoinError(RuntimeError):
    """A worker that torchrun restarted could not join the process group."""


def _attempt_join(restart: int, timeout: datetime.timedelta | None) -> dict[str, Any]:
    """init_process_group's arguments for a worker that torchrun restarted (attempt `restart`)
    into the rendezvous store of the attempts before.

    torchrun's static rendezvous (--master-port) keeps one TCPStore for every attempt and has the
    workers join through it, as its c10d rendezvous does unless TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1.
    torch's env:// join expects a fresh store per attempt: in the kept one, a restarted worker reads
    its peers' addresses of the failed attempt and cannot connect ("Connection refused", or gloo's
    "Connect timeout" minutes later). So a restarted worker joins under a prefix of its attempt,
    which every rank shares as long as the nodes restart together (one node always does)."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                          timeout=timeout or default_pg_timeout)
    return {"store": dist.PrefixStore(f"fastssl/restart-{restart}", store),
            "rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}


def init_distributed(timeout_s: float | None = None) -> tuple[int, int, torch.device]:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK in the
    environment): NCCL with one GPU per process, gloo on CPU. Returns (rank, world, device).
    timeout_s: how long a collective may wait for the slowest rank before the group fails
    (None: torch's default). A group that is already initialised (tests) is used as is.
    A worker that torchrun restarted joins through a namespace of its attempt (_attempt_join);
    when it cannot, RejoinError says so in one line with the launch whose every attempt has a
    store of its own."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    if not is_distributed() and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        shared = restart > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        try:
            joined = _attempt_join(restart, timeout) if shared else {}
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout, **joined)
        except Exception as e:
            if not shared:
                raise
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise RejoinError(f"torchrun restart {restart}: could not rejoin the other processes ({first}); "
                              f"the nodes may have restarted out of step in torchrun's shared store; "
                              f"relaunch with --resume auto as TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun "
                              f"--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID (docs/scale.md), "
                              f"which gives every attempt a store of its own") from e
    return get_rank(), get_world_size(), torch.device("cuda", local_rank) if cuda else torch.device("cpu")


def torchrun_restart(resume: str | None, overwrite: bool, *, out,
                     log: Callable[[str], None]) -> tuple[str | None, bool]:
    """(resume, overwrite) of a run under torchrun: a worker it restarted (TORCHELASTIC_RESTART_COUNT
    > 0) continues OUT's checkpoint ("auto")."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    if restart and resume is None:
        log(f"torchrun restart {restart}: resuming from {out}'s checkpoint when present")
        return "auto", False
    return resume, overwrite


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
    """`evaluator` on the method's encoder in eval mode (the method's mode comes back after); on the
    method itself when the evaluator's `takes_method` is set (zero-shot needs both towers).

    Every rank calls the evaluator: a distributed one (the CLI's) extracts each rank's shard,
    so no rank waits in a collective, past its timeout, while rank 0 does all the work. Under
    parallel=fsdp each rank evaluates a full copy gathered from the shards: a sharded forward
    would make every batch a collective, and the ranks' shares may differ by a batch."""
    from fastssl.engine.parallel import unsharded_copy

    method = unsharded_copy(method, device)
    was_training = method.training
    method.eval()
    with torch.no_grad(), torch.autocast(**autocast):
        result = evaluator(method if getattr(evaluator, "takes_method", False) else method.encoder())
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
