"""Every error a `fastssl` command can meet, as one line (what, where, how to fix) and an exit
status: 2 for what the user or the machine can fix (a mistake, a full disk, too little memory,
a damaged checkpoint, a lost peer), 1 for a run that stopped on NaN/inf and for a bug, which
names its type and points at --debug for the traceback."""

from __future__ import annotations

import errno

import torch

# What to do about an OSError, by errno; the rest say what the system said.
_OS_HINTS = {
    errno.EACCES: "check the path's permissions, or write elsewhere (--out)",
    errno.EROFS: "the file system is read-only: write elsewhere (--out)",
    errno.EDQUOT: "the disk quota is used up: free space, or write elsewhere (--out)",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) or lower num_threads",
}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


def _os_error(e: OSError) -> str:
    from fastssl.engine.checkpoint import NoSpaceError

    if isinstance(e, NoSpaceError):
        return f"{e}; free space there, or write elsewhere (--out)"
    if e.errno is None:  # raised by fastssl with its own one-line message (e.g. WordNet missing)
        return str(e)
    where = f" while writing {e.filename}" if e.filename else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on device{where}; free space there, or write elsewhere (--out)"
    what = f"{e.strerror or _first_line(e)}" + (f": {e.filename}" if e.filename else "")
    hint = _OS_HINTS.get(e.errno)
    return what + (f"; {hint}" if hint else "")


def _dcp_error(e: BaseException) -> BaseException | None:
    """The first rank's error inside DCP's CheckpointException (a BaseException, not an Exception),
    or None when `e` is none."""
    from torch.distributed.checkpoint.api import CheckpointException

    if not isinstance(e, CheckpointException):
        return None
    return next((pair[0] for pair in e.failures.values()), e)


def reportable(e: BaseException) -> bool:
    """Whether `report` speaks for `e`: an Exception, or DCP's CheckpointException (a
    BaseException); SystemExit and the like pass through."""
    return isinstance(e, Exception) or _dcp_error(e) is not None


def report(e: BaseException) -> tuple[int, str]:
    """(exit status, the one line after "fastssl CMD: ") of an error a command raised."""
    from fastssl.engine import NonFiniteLossError
    from fastssl.engine.run import RejoinError
    from fastssl.engine.signals import PeerLostError, is_peer_error

    if isinstance(e, NonFiniteLossError):
        return 1, f"stopped: {e}"
    if isinstance(e, (ValueError, TypeError, PeerLostError, RejoinError)):
        return 2, f"error: {e}"
    if isinstance(e, OSError):
        return 2, f"error: {_os_error(e)}"
    if isinstance(e, torch.OutOfMemoryError):
        return 2, ("error: out of GPU memory; lower batch_size or image_size, or raise accum_steps "
                   f"(micro-batches per step) ({_first_line(e)})")
    if isinstance(e, MemoryError):
        return 2, ("error: out of host memory; lower batch_size, num_threads or the data held in memory, "
                   "or check the config's sizes (fastssl train --help lists their ranges)")
    if isinstance(e, OverflowError):
        return 2, (f"error: a number too large to use ({_first_line(e)}); check the config's values "
                   f"(fastssl train --help lists their ranges)")
    inner = _dcp_error(e)
    if inner is not None:
        return 2, (f"error: a sharded checkpoint could not be read or written ({_first_line(inner)}); "
                   f"check its folder's files and free space")
    if is_peer_error(e):
        return 2, (f"error: lost contact with another process of the run ({_first_line(e)}); restart the "
                   f"run with --resume auto once every process runs")
    return 1, f"unexpected {type(e).__name__}: {_first_line(e)} (--debug shows the traceback)"
