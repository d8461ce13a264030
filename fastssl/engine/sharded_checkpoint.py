"""Sharded checkpoints (parallel=fsdp) with torch.distributed.checkpoint (DCP).

Layout of a run directory OUT:

    OUT/step-00001200/          one complete checkpoint: every rank's shards of the model and
        __0_0.distcp ...        optimizer state (written by all ranks in parallel), DCP's
        .metadata               .metadata, and meta.pt (step, RNG of every rank, config...)
        meta.pt
    OUT/last.dcp -> step-00001200   symlink to the newest complete checkpoint

Atomicity: the ranks write into OUT/.step-<N>.tmp (DCP fsyncs each file), rank 0 adds meta.pt,
fsyncs the directory, renames it to step-<N>, then replaces the last.dcp symlink in one
rename and fsyncs OUT; older step directories are deleted only after that. A process killed
at any point leaves last.dcp naming a complete checkpoint (at worst a stale .tmp directory,
removed by the next save).

Asynchronous saves (`save_sharded_async`) stage the state to CPU memory, write the shards in
DCP's background thread and publish the same way once the write completes: training goes on
meanwhile, and last.dcp names the previous complete checkpoint until the new one is published.

Resharding: DCP stores each tensor's global shape and the offsets of the pieces, so a
checkpoint written by W ranks loads on any number of ranks, one included (a plain,
unsharded model), through `get_state_dict` / `set_state_dict`, which key model and optimizer
state by parameter name.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from fastssl.distributed import get_rank, is_distributed
from fastssl.engine.checkpoint import REQUIRED_KEYS, NoSpaceError, fsync_dir, load_checkpoint

LATEST = "last.dcp"
META = "meta.pt"


def _barrier() -> None:
    if is_distributed():
        dist.barrier()


def _full_disk(error: BaseException) -> bool:
    """Whether `error`, or a rank's error inside DCP's CheckpointException, is the disk filling up
    (torch.save reports a failed write as "unexpected pos", with the OSError as its context)."""
    pending = [error]
    if isinstance(error, CheckpointException):
        pending += [pair[0] for pair in error.failures.values()]
    while pending:
        e = pending.pop()
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        pending += [c for c in (e.__cause__, e.__context__) if c is not None]
    return False


@contextlib.contextmanager
def _no_space_named(out: Path, tmp: Path) -> Iterator[None]:
    """A save that fails writing (DCP raises on every rank once each rank's writes have ended; an
    OSError on rank 0 writing meta.pt) has its unfinished `tmp` removed by rank 0, and a full disk
    raises NoSpaceError naming OUT/last.dcp, which still names the previous complete checkpoint."""
    try:
        yield
    except BaseException as e:
        if get_rank() == 0 and isinstance(e, (CheckpointException, OSError)):
            shutil.rmtree(tmp, ignore_errors=True)
        if _full_disk(e):
            raise NoSpaceError(out / LATEST) from e
        raise


def _write_meta(directory: Path, meta: dict[str, Any]) -> None:
    buffer = io.BytesIO()  # a failed write then raises the OSError itself, not torch.save's "unexpected pos"
    torch.save(meta, buffer)
    with open(directory / META, "wb") as f:
        f.write(buffer.getbuffer())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)


def _publish(tmp: Path, final: Path, out: Path) -> None:
    """tmp -> final, then last.dcp -> final: each step one atomic rename, each made durable."""
    if final.exists():  # the same step saved again (e.g. a resumed run's last step)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(out)
    link = out / f".{LATEST}.tmp"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(final.name)
    os.replace(link, out / LATEST)
    fsync_dir(out)


def _begin(out: Path, step: int) -> tuple[Path, Path]:
    """Rank 0 sweeps what killed saves left and makes the temp directory; all ranks then
    agree. Returns (temp directory, final directory)."""
    final = out / f"step-{step:08d}"
    tmp = out / f".{final.name}.tmp"
    if get_rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".step-*.tmp"):  # left by a save that was killed
            shutil.rmtree(stale)
        tmp.mkdir()
    _barrier()
    return tmp, final


def _complete(tmp: Path, final: Path, out: Path, meta: dict[str, Any]) -> None:
    """Rank 0, once every rank's shards and DCP's .metadata are in `tmp`: meta.pt, publish,
    then delete the older step directories."""
    _write_meta(tmp, meta)
    _publish(tmp, final, out)
    for old in out.glob("step-*"):
        if old.is_dir() and old.name != final.name:
            shutil.rmtree(old)


def save_sharded(out: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                 meta: dict[str, Any]) -> Path:
    """Collective (every rank calls it): write OUT/step-<step> and point OUT/last.dcp at it.

    model: the (FSDP-sharded or plain) method; optimizer: its optimizer; meta: small picklable
    state that rank 0 stores beside the shards (read back by `read_meta`). Returns the path."""
    out = Path(out)
    tmp, final = _begin(out, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    with _no_space_named(out, tmp):
        dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp,
                 no_dist=not is_distributed())
        if get_rank() == 0:
            _complete(tmp, final, out, meta)
    _barrier()
    return final


class AsyncSave:
    """A sharded save under way in DCP's writer thread. Rank 0 publishes it from that thread as
    soon as DCP's future completes (DCP gathers every rank's write results to rank 0 before
    writing .metadata, so rank 0's completion means all shards are on disk); until then
    last.dcp names the previous checkpoint. `wait()` blocks until it is published (rank 0) or
    written (other ranks) and raises what the save raised."""

    def __init__(self, future, tmp: Path, final: Path, out: Path, meta: dict[str, Any]):
        self.future, self.tmp, self.final, self.out, self.error = future, tmp, final, out, None
        self.published = threading.Event()
        if get_rank() == 0:
            def publish(done) -> None:
                try:
                    if done.exception() is None:
                        _complete(tmp, final, out, meta)
                except BaseException as e:  # re-raised by wait(), on the training thread
                    self.error = e
                finally:
                    self.published.set()
            future.add_done_callback(publish)
        else:
            self.published.set()

    def wait(self) -> Path:
        with _no_space_named(self.out, self.tmp):
            self.future.result()
            self.published.wait()
            if self.error is not None:
                raise self.error
        return self.final


def save_sharded_async(out: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                       meta: dict[str, Any], process_group=None) -> AsyncSave:
    """Collective: like `save_sharded`, but returns once the state is staged (copied to CPU
    memory, so training may change the parameters at once); the shards are written by
    `dcp.async_save`'s thread. `process_group`: a group of its own for the writer thread's
    collectives (they must not interleave with training's on the default group)."""
    out = Path(out)
    tmp, final = _begin(out, step)
    model_state, optim_state = get_state_dict(model, optimizer)
    future = dcp.async_save({"model": model_state, "optimizer": optim_state}, checkpoint_id=tmp,
                            process_group=process_group, no_dist=not is_distributed())
    return AsyncSave(future, tmp, final, out, meta)


def is_sharded_checkpoint(path: str | Path) -> bool:
    """True for a DCP checkpoint directory (or the last.dcp link to one)."""
    path = Path(path)
    return path.is_dir() and (path / ".metadata").is_file() and (path / META).is_file()


def check_shards(path: str | Path) -> None:
    """ValueError naming the checkpoint and the file when a shard file its .metadata lists is
    missing or shorter than the pieces stored in it (a copy cut short, a lost file): found
    before any rank starts loading, instead of a failure deep inside DCP."""
    path = Path(path)
    try:
        metadata = dcp.FileSystemReader(str(path)).read_metadata()
    except Exception as e:  # DCP's errors on a damaged .metadata vary (pickle, EOF, ...)
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {str(path)!r}: its .metadata is unreadable ({first}); the checkpoint "
                         f"is damaged: copy the whole folder again") from e
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        shard = path / name
        if not shard.is_file():
            raise ValueError(f"checkpoint {str(path)!r}: shard file {name} is missing; the checkpoint is "
                             f"incomplete: copy the whole folder again")
        if shard.stat().st_size < size:
            raise ValueError(f"checkpoint {str(path)!r}: shard file {name} is truncated "
                             f"({shard.stat().st_size} of {size} bytes); the checkpoint is damaged: copy the "
                             f"whole folder again")


def read_meta(path: str | Path) -> dict[str, Any]:
    """The meta dict stored with a sharded checkpoint (no tensors are loaded), once its shard
    files are checked (check_shards)."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"checkpoint: expected a sharded checkpoint directory (with .metadata and {META}), "
                         f"got {str(path)!r}")
    check_shards(path)
    # the model and optimizer live in the shards, not in meta.pt
    meta_keys = tuple(k for k in REQUIRED_KEYS if k not in ("model", "optimizer"))
    return load_checkpoint(path / META, required=meta_keys)


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Collective: load the model (and optimizer) state of a sharded checkpoint in place, on
    any number of ranks; every rank reads the pieces of its own shards."""
    path = Path(path)
    if not is_sharded_checkpoint(path):
        raise ValueError(f"checkpoint: expected a sharded checkpoint directory (with .metadata and {META}), "
                         f"got {str(path)!r}")
    if optimizer is None:
        state = {"model": model.state_dict()}
        dcp.load(state, checkpoint_id=path, no_dist=not is_distributed())
        model.load_state_dict(state["model"])
        return
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=path, no_dist=not is_distributed())
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
