"""Worker processes that end with the process that started them.

A loader's reader workers (DALI's Python workers, torch DataLoader workers) block on queues
from their parent; when the parent is killed outright (SIGKILL, the OOM killer) nothing tells
them to stop, and they would wait forever holding their memory. Each worker calls
`die_with_parent` once when it starts.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
POLL_S = 1.0


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(POLL_S)
    os._exit(1)


def die_with_parent(parent_pid: int) -> str:
    """End this process when `parent_pid` (its parent) ends: on Linux the kernel sends it SIGKILL
    then (prctl PR_SET_PDEATHSIG, set through ctypes); elsewhere, or where prctl fails, a
    daemon thread polls the parent's pid every POLL_S seconds and exits when the process is
    handed to another parent. Exits at once when the parent has already gone. Returns how
    ("prctl" or "watchdog"). The kernel's signal follows the parent thread that started the
    worker, so start workers from a thread that lives as long as they do (fastssl's loaders
    start theirs from the thread that iterates them)."""
    how = "watchdog"
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
            how = "prctl"
    # The parent may have died before prctl took effect: then this process has a new parent.
    if os.getppid() != parent_pid:
        os._exit(1)
    if how == "watchdog":
        threading.Thread(target=_watch, args=(parent_pid,), name="fastssl-parent-watch", daemon=True).start()
    return how
