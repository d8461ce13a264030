"""A run's folder: choosing a fresh one, refusing to write over another run, preparing it
(config.yaml) and the run's one summary.json.

    OUT/config.yaml     the resolved config          OUT/metrics.jsonl  fastssl.engine.metrics_log
    OUT/summary.json    written once, at the end     OUT/last.pt | last.dcp  fastssl.engine.checkpointer

    OUT/.lock           "<pid> <host>" of the process writing the folder, while it runs

Rank 0 looks and writes; every rank gets the same answer (and the same error)."""

from __future__ import annotations

import datetime
import errno
import json
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastssl.engine.checkpoint import NoSpaceError
from fastssl.engine.config import save_config
from fastssl.engine.run import rank0_value

# The files that make a folder a run: a new run never writes over them unless asked (overwrite).
RUN_FILES = ("last.pt", "last.dcp", "metrics.jsonl", "summary.json", "config.yaml")
SUMMARY = "summary.json"
# Held by the process that writes the folder (rank 0) while it trains: "<pid> <hostname>".
LOCK = ".lock"


def default_run_dir(method: str, root: str | Path = "runs") -> Path:
    """runs/<method>-<UTC date-time>, with a suffix if that folder exists: unique per run."""
    base = Path(root) / f"{method}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def new_run_dir(method: str, *, is_main: bool, world: int) -> Path:
    """default_run_dir chosen by rank 0, the same on every rank."""
    return Path(rank0_value(str(default_run_dir(method)) if is_main else None, world))


class RunFolder:
    """The folder `path` of one run. `is_main`: this process is rank 0 (it looks and writes).

    `check(resume, overwrite)` refuses a fresh run into a folder holding a run unless
    overwrite; `prepare(...)` creates it, deletes RUN_FILES on overwrite and writes
    config.yaml; `write_summary` writes summary.json (its only writer)."""

    def __init__(self, path: str | Path, *, is_main: bool, world: int, log: Callable[[str], None]):
        self.path, self.is_main, self.world, self.log = Path(path), is_main, world, log

    def check(self, *, resume: str | None, overwrite: bool) -> None:
        """ValueError on every rank when a fresh run (resume None) would write over a run."""
        problem = None
        if self.is_main and resume is None and not overwrite:
            existing = [name for name in RUN_FILES if (self.path / name).exists()]
            if existing:
                problem = (f"out: {self.path} already holds a run ({', '.join(existing)}); continue it with "
                           f"--resume auto, or replace it with --overwrite (deletes those files)")
        problem = rank0_value(problem, self.world)
        if problem:
            raise ValueError(problem)

    def check_no_run(self, checkpoint: str) -> None:
        """ValueError when `--resume auto` finds no `checkpoint` but the files of a run: starting
        afresh would replace them."""
        held = [name for name in RUN_FILES if (self.path / name).exists()]
        if held:
            raise ValueError(f"resume: {self.path} holds {', '.join(held)} but no checkpoint to continue "
                             f"from ({checkpoint}); start it afresh with --overwrite (deletes those files), "
                             f"or give another --out")

    def lock(self) -> None:
        """Rank 0: take OUT/.lock, so that a second run on the folder is refused (ValueError on
        every rank, naming the holder) instead of interleaving its writes. A lock whose process
        has ended (its pid is gone on this host) is stale: taken over, with a message. A lock of
        this very process (an earlier Trainer that never finished) is taken over silently."""
        problem = None
        if self.is_main:
            problem = self._take_lock()
        problem = rank0_value(problem, self.world)
        if problem:
            raise ValueError(problem)

    def _take_lock(self) -> str | None:
        self.path.mkdir(parents=True, exist_ok=True)
        path, here = self.path / LOCK, socket.gethostname()
        for _ in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = path.read_text().split() if path.exists() else []
                if len(holder) == 2 and holder[0].isdigit():
                    pid, host = int(holder[0]), holder[1]
                    if host != here or (pid != os.getpid() and process_alive(pid)):
                        return (f"out: {self.path} is in use by another run (process {pid} on {host}, "
                                f"{path}); wait for it to end, or give this run another --out")
                    if pid != os.getpid():
                        self.log(f"out: taking over the lock of process {pid} on {host}, which has ended")
                else:  # a lock left empty by a process killed between creating and writing it
                    self.log(f"out: taking over the unreadable lock {path}")
                path.unlink(missing_ok=True)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(f"{os.getpid()} {here}\n")
            except OSError as e:
                path.unlink(missing_ok=True)
                if e.errno == errno.ENOSPC:  # an answer for every rank, like the other problems
                    return f"{NoSpaceError(path)}; free space there, or write elsewhere (--out)"
                raise
            return None
        return f"out: could not take the lock {path}; another run is starting in {self.path}"

    def unlock(self) -> None:
        """Rank 0: release OUT/.lock if this process holds it."""
        if not self.is_main:
            return
        path = self.path / LOCK
        try:
            if path.read_text().split() == [str(os.getpid()), socket.gethostname()]:
                path.unlink()
        except FileNotFoundError:
            pass

    def prepare(self, cfg, *, overwrite: bool) -> None:
        """Rank 0: create the folder, delete the run files an overwrite replaces, write config.yaml."""
        if not self.is_main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        if overwrite:
            for name in RUN_FILES:
                (self.path / name).unlink(missing_ok=True)
        save_config(cfg, self.path / "config.yaml")

    def write_summary(self, summary: dict[str, Any]) -> None:
        """Rank 0: summary.json, the finished run's record."""
        if self.is_main:
            (self.path / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")


def process_alive(pid: int) -> bool:
    """Whether process `pid` runs on this host (signal 0 checks without sending anything); a
    zombie, ended but not yet reaped by its parent (torchrun), has ended."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):  # no /proc (macOS): signal 0 is the answer
        return True
