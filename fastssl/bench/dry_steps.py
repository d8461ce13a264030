"""`python -m fastssl.bench.dry_steps FILE`: the dry run of benchmarks/gpu_check.sh, every step's
Python entry in its dry form, run in this one interpreter (torch and fastssl are imported once,
not once per step).

FILE holds one record per step, written by the script: NUL-separated fields NAME, LIMIT, then
the command from the Python interpreter on (`PY -m pytest ... --collect-only`, `PY -m
fastssl.X ... --dry-run`, `PY setup.py --name`). Each step's line, `NAME dry-run rc=R (Ts)`, goes to
stdout, its output to stderr (the script's log). A pytest selection that collects nothing gets
rc=5: it would let the real step pass without checking anything."""

import contextlib
import io
import re
import runpy
import sys
import time
from pathlib import Path


def read_steps(path: Path) -> list[tuple[str, list[str]]]:
    """The (name, command) records of FILE."""
    fields = path.read_bytes().decode().split("\0")
    steps, i = [], 0
    while i + 1 < len(fields):
        name, count = fields[i], int(fields[i + 1])
        steps.append((name, fields[i + 2:i + 2 + count]))
        i += 2 + count
    return steps


def _run_entry(args: list[str]) -> int:
    """Run `-m MODULE ARGS` or `SCRIPT ARGS` as `python` would, in this process; its exit code."""
    module = args[1] if args[0] == "-m" else None
    argv = args[1:] if module else args
    saved = sys.argv
    sys.argv = [module or argv[0], *argv[1:]] if module else list(argv)
    try:
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as stop:
        code = stop.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    finally:
        sys.argv = saved
    return 0


def run_step(command: list[str]) -> tuple[int, str]:
    """One step's dry form, (exit code, output); command[0] is the interpreter and is not used."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            rc = _run_entry(command[1:])
        except Exception as err:  # a step that raises fails; the others still run
            print(f"{type(err).__name__}: {err}")
            rc = 1
    text = out.getvalue()
    if rc == 0 and command[1:3] == ["-m", "pytest"] and not re.search(r"^\d+(/\d+)? tests? collected", text,
                                                                      re.M):
        rc = 5
    return rc, text


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fastssl.bench.dry_steps FILE", file=sys.stderr)
        return 2
    failed = 0
    for name, command in read_steps(Path(args[0])):
        t0 = time.monotonic()
        rc, text = run_step(command)
        print(text, file=sys.stderr, flush=True)
        print(f"{name} dry-run rc={rc} ({time.monotonic() - t0:.0f}s)", flush=True)
        failed |= rc != 0
    return int(failed)


if __name__ == "__main__":
    raise SystemExit(main())
