"""Run a function in several CPU processes joined by a gloo process group.

Distributed code is tested by comparing what W processes compute on their
shards with what one process computes on the concatenated batch."""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def run_gloo(fn: Callable, world_size: int = 2, *args) -> list:
    """Call fn(rank, world_size, *args) in `world_size` spawned processes with a
    gloo group initialised; return the results (torch.save-able) by rank.
    `fn` must be defined at module level so the spawned processes can import it."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(world_size, port, out_dir, fn, args), nprocs=world_size, join=True,
            start_method="spawn",
        )
        paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
        return [torch.load(p, weights_only=False) for p in paths]
