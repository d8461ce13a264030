"""A run's checkpoints behind one interface, in either on-disk format:

- plain (parallel=ddp): RUN/last.pt, one file rank 0 writes atomically (fastssl.engine.checkpoint);
- sharded (parallel=fsdp or hsdp): RUN/last.dcp -> step-<N>/, every rank writing its shards through
  torch.distributed.checkpoint (fastssl.engine.sharded_checkpoint).

`make_checkpointer` picks the writer by the parallel mode; `read_checkpoint` reads either
format whatever the mode (a sharded checkpoint loads on any number of ranks)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fastssl.engine import sharded_checkpoint
from fastssl.engine.checkpoint import load_checkpoint, remove_stale_temp, save_atomic

PLAIN = "last.pt"
SHARDED = sharded_checkpoint.LATEST


@dataclass
class Checkpoint:
    """A checkpoint read from `path`: its `state` (a sharded one's meta: model and optimizer
    stay in the shards until `load_into`) and its format."""

    path: Path
    state: dict[str, Any]
    sharded: bool

    def load_into(self, method: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        """Model and optimizer state into the run's `method` (unwrapped), `model` (as wrapped for
        training: DDP or FSDP) and `optimizer` (None: the model alone). Raises what torch raises
        on a mismatch."""
        if self.sharded:  # written by any number of ranks, resharded to this run's
            sharded_checkpoint.load_sharded(self.path, model, optimizer)
        else:
            method.load_state_dict(self.state["model"])
            if optimizer is not None:
                optimizer.load_state_dict(self.state["optimizer"])


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's shard on this rank (FSDP), a plain tensor as is."""
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite(method: nn.Module, optimizer: torch.optim.Optimizer) -> str | None:
    """The name of the first tensor of what a checkpoint holds (parameters, buffers such as
    BatchNorm running stats, EMA centres and queues, optimizer state) with a NaN or inf in
    this rank's part of it, or None. One host sync for all of them."""
    named = [(f"model {k}", t) for k, t in method.state_dict().items()]
    named += [(f"optimizer state {i} {k}", t) for i, state in optimizer.state_dict()["state"].items()
              for k, t in state.items()]
    named = [(name, _local(t)) for name, t in named if torch.is_tensor(t) and t.is_floating_point()]
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all().to(named[0][1].device) for _, t in named]).tolist()
    return next((name for (name, _), ok in zip(named, finite) if not ok), None)


def read_checkpoint(path: str | Path, method: str | None = None) -> Checkpoint:
    """A plain file or a sharded directory; ValueError naming the path when it is neither,
    or (with `method`) when another method wrote it."""
    path = Path(path)
    if sharded_checkpoint.is_sharded_checkpoint(path):
        state = sharded_checkpoint.read_meta(path)
        if method is not None and state["method"] != method:
            raise ValueError(f"checkpoint {str(path)!r}: a {state['method']} checkpoint, but this run's "
                             f"method is {method}")
        return Checkpoint(path, state, sharded=True)
    return Checkpoint(path, load_checkpoint(path, method=method), sharded=False)


class Checkpointer:
    """Writes the checkpoints of the run in `run_dir` and finds its latest one. A plain
    checkpointer writes last.pt from rank 0 (`is_main`); a sharded one is a collective, and
    with `async_save` returns once the state is staged, writing and publishing it in the
    background (one save in flight: the next save, and `wait()`, wait for it)."""

    def __init__(self, run_dir: str | Path, *, sharded: bool, is_main: bool, world: int,
                 async_save: bool = False):
        self.run_dir, self.sharded, self.is_main, self.world = Path(run_dir), sharded, is_main, world
        self.path = self.run_dir / (SHARDED if sharded else PLAIN)
        self.async_save = async_save and sharded
        self._pending: sharded_checkpoint.AsyncSave | None = None
        self._group = None  # the writer thread's own process group (made at the first async save)

    def latest(self) -> Path | None:
        """The run's checkpoint to resume from, or None when it has none. ValueError when the
        folder holds only the other format: resuming it in this mode would start afresh over it."""
        if self.path.exists():
            return self.path
        other = self.run_dir / (PLAIN if self.sharded else SHARDED)
        if other.exists():
            mode, needed = ("fsdp / hsdp", "ddp") if self.sharded else ("ddp", "fsdp or hsdp")
            raise ValueError(f"resume: {self.run_dir} holds {other.name}, written with parallel={needed}, "
                             f"and no {self.path.name} (parallel={mode}); resume it with parallel={needed}")
        return None

    def remove_stale(self) -> list[Path]:
        """Delete what killed saves left (rank 0); returns the files removed. A sharded save
        also sweeps its stale directories itself."""
        return remove_stale_temp(self.path) if self.is_main else []

    def save(self, *, step: int, method: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
             meta: dict[str, Any]) -> None:
        """Publish a checkpoint of `step`: plain, {"model", "optimizer"} | meta from rank 0;
        sharded, every rank's shards of `model` and `optimizer` with `meta` (+ world_size)."""
        if self.async_save:
            self.wait()
            if self._group is None and self.world > 1:
                self._group = torch.distributed.new_group(backend="gloo")
            self._pending = sharded_checkpoint.save_sharded_async(
                self.run_dir, step, model, optimizer, meta | {"world_size": self.world}, self._group)
        elif self.sharded:
            sharded_checkpoint.save_sharded(self.run_dir, step, model, optimizer,
                                            meta | {"world_size": self.world})
        elif self.is_main:
            save_atomic({"model": method.state_dict(), "optimizer": optimizer.state_dict()} | meta, self.path)


    def wait(self) -> None:
        """Block until the save in flight (if any) is published; raises what it raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()


def make_checkpointer(parallel: str, run_dir: str | Path, *, is_main: bool, world: int,
                      async_save: bool = False) -> Checkpointer:
    """The checkpointer of a parallel mode: sharded for "fsdp" and "hsdp" (in the background
    with `async_save`), plain otherwise."""
    return Checkpointer(run_dir, sharded=parallel in ("fsdp", "hsdp"), is_main=is_main, world=world,
                        async_save=async_save)
