"""Atomic checkpoints and the RNG state that makes a resumed run repeat an uninterrupted one.

Checkpoints hold tensors and plain Python values only, and are read with
`torch.load(weights_only=True)`: loading a file never runs code from it."""

from __future__ import annotations

import errno
import os
import pickle
import random
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

# What every fastssl checkpoint holds (Trainer.save); a file without them was not written by fastssl.
REQUIRED_KEYS = ("method", "model", "optimizer", "step", "steps_per_epoch", "batch_size", "config")
# Checkpoints written before RNG states were stored as tensors hold numpy's state as an array;
# a numpy array is rebuilt by exactly these (allow-listed for weights_only; they run nothing else).
NUMPY_ARRAY_GLOBALS = [np.ndarray(0).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


class NoSpaceError(OSError):
    """The disk filled up while writing `filename`; `kept` says what is still intact."""

    def __init__(self, path: str | Path, kept: str = ""):
        super().__init__(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.kept = kept

    def __str__(self) -> str:
        kept = f"; {self.kept}" if self.kept else ""
        return f"no space left on device while writing {self.filename}{kept}"


class _RecordingWriter:
    """A file's writes for torch.save, remembering the OSError of a failed one: torch reports
    it only as "unexpected pos", which never says the disk is full."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def _raise_os_error(error: OSError | None, path: Path, cause: BaseException) -> None:
    """NoSpaceError for a full disk, the OSError itself otherwise; nothing when `error` is None."""
    if error is None:
        return
    if error.errno == errno.ENOSPC:
        raise NoSpaceError(path) from cause
    raise error from cause


def write_text_atomic(path: str | Path, text: str) -> None:
    """`text` into `path` through a temp file renamed over it: a full disk or a kill mid-write
    leaves the previous file whole and no temp file behind (NoSpaceError names `path`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as e:
        _raise_os_error(e, path, e)
    finally:
        tmp.unlink(missing_ok=True)


def _temp_name(path: Path) -> str:
    return f".{path.name}.tmp."


def remove_stale_temp(path: str | Path) -> list[Path]:
    """Delete the temporary files a killed save_atomic(…, path) left next to `path`; returns them."""
    path = Path(path)
    stale = sorted(path.parent.glob(_temp_name(path) + "*")) if path.parent.is_dir() else []
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new entry in `directory` durable (POSIX needs the directory fsynced)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """torch.save to a temp file in the same directory, fsync, rename over `path`, fsync the
    directory: a crash mid-write leaves the previous checkpoint intact (rename is atomic on
    POSIX), and a power loss after return cannot lose the rename (the directory entry is on disk).
    A full disk raises NoSpaceError naming `path`.
    Temp files of earlier, killed saves are removed afterwards."""
    path = Path(path)
    tmp = path.with_name(f"{_temp_name(path)}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            try:
                torch.save(state, writer)
                f.flush()
                os.fsync(f.fileno())
            except (OSError, RuntimeError) as e:
                # Taken off the writer: its traceback holds the writer, whose frames hold the caller's
                # (the Trainer, the loader's workers), a cycle that would outlive the process's exit.
                error, writer.error = writer.error, None
                _raise_os_error(error or (e if isinstance(e, OSError) else None), path, e)
                raise
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()
    remove_stale_temp(path)


def load_checkpoint(path: str | Path, method: str | None = None, *,
                    required: tuple[str, ...] = REQUIRED_KEYS) -> dict[str, Any]:
    """Read a checkpoint written by fastssl's Trainer with `torch.load(weights_only=True)`.
    `required`: the keys it must hold (a sharded checkpoint's meta.pt holds all but the model
    and optimizer, which are in its shards).

    Raises ValueError naming the path and what the file is when it is missing, unreadable
    (truncated, not a torch file), holds objects other than tensors and plain values (never
    unpickled: that would run the file's code), lacks fastssl's keys, or (with `method`) was
    written by another method."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint: expected an existing file, got {str(path)!r}")
    with open(path, "rb") as f:
        head = f.read(2)
    # torch.save writes a zip archive (a raw pickle, protocol >= 2, in its legacy format)
    if not zipfile.is_zipfile(path) and not (len(head) == 2 and head[0] == 0x80):
        what = "a damaged or truncated zip archive" if head == b"PK" else "neither a zip archive nor a pickle"
        raise ValueError(f"checkpoint {str(path)!r}: not a readable torch checkpoint ({what}; fastssl reads "
                         f"the last.pt that fastssl train writes)")
    try:
        with warnings.catch_warnings():  # a raw pickle's protocol warning: the error below says it all
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(NUMPY_ARRAY_GLOBALS):
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "weights_only" in str(e):
            raise ValueError(f"checkpoint {str(path)!r}: not a fastssl checkpoint (it holds Python objects "
                             f"other than tensors and plain values; fastssl never unpickles those)") from e
        raise ValueError(f"checkpoint {str(path)!r}: not a readable torch checkpoint ({e})") from e
    except Exception as e:  # torch.load's errors on a damaged file vary (RuntimeError, KeyError, EOFError...)
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {str(path)!r}: not a readable torch checkpoint (truncated, or not "
                         f"written by torch.save: {first})") from e
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {str(path)!r}: not a fastssl checkpoint (a {type(state).__name__}, "
                         f"not a dict of training state)")
    missing = [k for k in required if k not in state]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r}: not a fastssl checkpoint (no {', '.join(missing)}; "
                         f"fastssl eval/--resume read the last.pt of a fastssl train run)")
    if method is not None and state["method"] != method:
        raise ValueError(f"checkpoint {str(path)!r}: a {state['method']} checkpoint, but this run's method "
                         f"is {method}")
    return state


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from, as tensors and plain values (so that
    checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gauss": float(cached_gauss)},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n, p = state["numpy"], state["python"]
    if isinstance(n, dict):  # tuples: a checkpoint from before RNG states were stored as tensors
        n = (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gauss"])
        p = (p["version"], tuple(p["internal"]), p["gauss_next"])
    np.random.set_state(n)
    random.setstate(p)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
