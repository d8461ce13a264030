"""Stop signals and the agreements ranks reach before acting on one.

`StopSignals` turns SIGINT, SIGTERM and SIGUSR1 into a flag read at step boundaries (a second
SIGINT raises KeyboardInterrupt at once). `RankAgreement` makes every rank act alike on what
one rank saw: a stop signal (agreed one step later, never waiting on the step itself) and the
first non-finite loss, over a CPU gloo group of their own."""

from __future__ import annotations

import datetime
import os
import signal
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from fastssl.engine.run_folder import process_alive

# How gloo and NCCL report a peer whose process ended (a closed or reset connection) or stopped answering.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
              "NCCL communicator was aborted", "Socket Timeout", "timed out")


class PeerLostError(RuntimeError):
    """Another process of the run ended or stopped answering; this one stopped."""


def is_peer_error(e: BaseException) -> bool:
    """Whether `e` is a collective failing because a peer is gone."""
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError)
                                             and any(s in str(e) for s in _PEER_GONE))


# Signals that stop a run cleanly: Ctrl-C, a scheduler's termination, SLURM's preemption warning.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
# Non-finite values by rank order: an all-reduce MIN of 4 * step + kind picks the first bad step.
_NONFINITE = {"nan": 0, "inf": 1, "-inf": 2}
_NONE = 2**62


class StopSignals:
    """A context manager: inside it, STOP_SIGNALS set `received` (the first one's number) instead
    of ending the process; the previous handlers come back on exit. Handlers are installed only
    from the main thread (Python's rule); elsewhere `received` stays None."""

    def __init__(self, log: Callable[[str], None]):
        self.log = log
        self.received: int | None = None
        self._pid: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        self._pid = os.getpid()
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        self._previous = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if os.getpid() != self._pid:  # a forked loader worker: the main process decides
            return
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt("second Ctrl-C: stopped without a checkpoint")
        if self.received is None:
            self.received = signum
            self.log(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                     f"(Ctrl-C again to quit at once)")


class RankAgreement:
    """What the ranks of a run agree on. With world 1 every answer is the local one and no group
    is made; otherwise a gloo group (CPU, `timeout_s`) of its own carries the agreements, so they
    never queue behind the training collectives on the GPU."""

    def __init__(self, world: int, timeout_s: float):
        timeout = datetime.timedelta(seconds=timeout_s)
        self.group = dist.new_group(backend="gloo", timeout=timeout) if world > 1 else None
        self._pending: tuple[Any, torch.Tensor] | None = None
        # (host, pid) of every rank, to name the one that is gone when a collective fails
        self.processes: list[tuple[str, int]] = [(socket.gethostname(), os.getpid())]
        if self.group is not None:
            self.processes = [("", 0)] * world
            dist.all_gather_object(self.processes, (socket.gethostname(), os.getpid()), group=self.group)

    def raise_if_peer_lost(self, error: BaseException, checkpoint: Path | None) -> None:
        """PeerLostError naming the lost rank and the last `checkpoint` when `error` is a collective
        failing because a peer is gone; nothing otherwise."""
        if self.group is not None and is_peer_error(error):
            raise PeerLostError(f"lost contact with {self.lost_peer(error)}; last checkpoint: "
                                f"{checkpoint or 'none written'}; continue with --resume auto once every "
                                f"rank runs") from error

    def lost_peer(self, error: BaseException) -> str:
        """Which rank is gone, for the message after a collective failed with `error`: the ranks
        on this host whose process ended, else what the failure said."""
        here = socket.gethostname()
        ended = [r for r, (host, pid) in enumerate(self.processes)
                 if host == here and pid != os.getpid() and not process_alive(pid)]
        if ended:
            return f"rank {', '.join(map(str, ended))} (peer process ended)"
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"another rank (its process ended or its host is unreachable: {first[:160]})"

    def stop(self, local: int) -> int:
        """The signal (a number, 0 for none) every rank stops on at this step boundary.

        Each call all-reduces (MAX) the local flag asynchronously and returns the reduction
        issued by the call before, which completed long ago: no rank waits on another rank's
        step, and since every rank reads the same reduction at the same step, all stop after
        the same step (one step after the first signal)."""
        if self.group is None:
            return local
        agreed = 0
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            agreed = int(flag.item())
        flag = torch.tensor([local], dtype=torch.int64)
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group, async_op=True), flag)
        return agreed

    def first_nonfinite(self, local: tuple[int, float] | None) -> tuple[int, float] | None:
        """(step, value) of the first non-finite loss any rank saw (the same on every rank), or
        None; `local` is this rank's. A collective: every rank calls it at the same steps."""
        if self.group is None:
            return local
        key = torch.tensor([4 * local[0] + _NONFINITE[str(local[1])] if local else _NONE], dtype=torch.int64)
        dist.all_reduce(key, op=dist.ReduceOp.MIN, group=self.group)
        k = int(key.item())
        return None if k == _NONE else (k // 4, float(list(_NONFINITE)[k % 4]))

    def any(self, local: bool) -> bool:
        """True on every rank when `local` is true on any rank. A collective."""
        if self.group is None:
            return local
        flag = torch.tensor([int(local)], dtype=torch.int64)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def close(self) -> None:
        """Wait for the last stop reduction (every rank issued it), so none is left in flight."""
        if self._pending is not None:
            self._pending[0].wait()
            self._pending = None
