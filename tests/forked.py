"""New processes for the tests, forked from a server that imported torch, timm and fastssl once.

A fresh interpreter spends seconds of CPU importing torch, torchvision, timm, DALI and fastssl
before a CLI command or a gloo rank does anything (`fastssl train --help`: 5.5 s user time on
the 2-core CPU). multiprocessing's fork server imports them once per test process (it starts no thread,
so forking it is safe) and each new process is a fork of it: its own pid, signals, file
descriptors, environment, working directory and exit status, as a fresh `python -m ...` has.

`run_module(module, args, ...)` runs `python -m module args` that way, `run_code(code, args,
...)` runs `python -c code args`; both return what subprocess.run would. Commands whose start-up
itself is under test (torchrun, Popen-style interaction with a running process) use real
interpreters."""

from __future__ import annotations

import atexit
import multiprocessing
import os
import runpy
import signal
import subprocess
import sys
import tempfile
import traceback

PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp",
           "torchvision", "timm", "fastssl", "fastssl.engine", "fastssl.methods", "fastssl.losses",
           "fastssl.cli"]
multiprocessing.set_forkserver_preload(PRELOAD)
CONTEXT = multiprocessing.get_context("forkserver")


def exit_status(body) -> int:
    """What `python` exits with after running body(): SystemExit's code, 1 after printing an
    uncaught exception's traceback, death by SIGINT (-SIGINT here) after KeyboardInterrupt's."""
    try:
        body()
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            return stop.code or 0
        print(stop.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        traceback.print_exc()
        return -signal.SIGINT
    except BaseException:
        traceback.print_exc()
        return 1
    return 0


def _child(module: str | None, code: str | None, args: list[str], env: dict, cwd: str | None, out: str,
           err: str) -> None:
    multiprocessing.set_start_method(None, force=True)  # the command's own workers: the platform's default
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        with open(path, "w") as f:
            os.dup2(f.fileno(), fd)
    import torch

    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", "0") or 0) or torch.get_num_threads())
    if module is not None:
        sys.argv = [module, *args]
        sys.modules.pop(module, None)  # run as __main__, a copy of its own, as `python -m` does
        body = lambda: runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["-c", *args]
        body = lambda: exec(compile(code, "<string>", "exec"), {"__name__": "__main__"})
    status = exit_status(body)
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:  # as python does after KeyboardInterrupt: die by the signal
        signal.signal(-status, signal.SIG_DFL)
        os.kill(os.getpid(), -status)
    os._exit(status)


def _run(module, code, args, env, cwd, timeout):
    args = [str(a) for a in args]
    cmd = [sys.executable, *(["-m", module] if module else ["-c", code]), *args]
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "out"), os.path.join(tmp, "err")
        env = dict(os.environ if env is None else env)
        proc = CONTEXT.Process(target=_child, args=(module, code, args, env, cwd and str(cwd), out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(cmd, timeout)
        with open(out) as o, open(err) as e:
            return subprocess.CompletedProcess(cmd, proc.exitcode, o.read(), e.read())


def run_module(module: str, args=(), *, env: dict | None = None, cwd=None, timeout: float = 300):
    """`python -m module args` in a forked process: a subprocess.CompletedProcess with text
    stdout and stderr (subprocess.TimeoutExpired past `timeout` seconds, the process killed)."""
    return _run(module, None, args, env, cwd, timeout)


def run_code(code: str, args=(), *, env: dict | None = None, cwd=None, timeout: float = 300):
    """`python -c code args` in a forked process, as run_module."""
    return _run(None, code, args, env, cwd, timeout)
