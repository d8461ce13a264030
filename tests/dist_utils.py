"""Run a function in several CPU processes joined by a gloo process group.

Distributed code is tested by comparing what W processes compute on their
shards with what one process computes on the concatenated batch.

The processes start from the fork server of tests/forked.py (torch, timm and fastssl imported
once per test process), not from a fresh interpreter each: a spawn costs ~2 s of import per rank
on the 2-core CPU, a fork from the server ~0.1 s. Each rank takes the caller's environment as it
is at the call, as a spawned one would."""

from __future__ import annotations

import io
import multiprocessing
import os
import socket
import tempfile
from collections.abc import Callable

import forked  # noqa: F401  (the fork server's preload list)
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, env: dict, call: bytes) -> None:
    fn, args = torch.load(io.BytesIO(call), weights_only=False)
    multiprocessing.set_start_method(None, force=True)  # a rank's own workers: the platform's default
    os.environ.clear()
    os.environ.update(env)
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
    """Call fn(rank, world_size, *args) in `world_size` new processes with a
    gloo group initialised; return the results (torch.save-able) by rank.
    `fn` must be defined at module level so the spawned processes can import it."""
    port = _free_port()
    call = io.BytesIO()  # plain pickling: multiprocessing's would pass every tensor as a descriptor
    torch.save((fn, args), call)
    with tempfile.TemporaryDirectory() as out_dir:
        mp.start_processes(
            _worker, args=(world_size, port, out_dir, dict(os.environ), call.getvalue()), nprocs=world_size,
            join=True, start_method="forkserver",
        )
        paths = [os.path.join(out_dir, f"rank{r}.pt") for r in range(world_size)]
        return [torch.load(p, weights_only=False) for p in paths]
