"""The timing harness every `fastssl bench` benchmark uses.

Times each provider (``eager``: the official-repo formula, ``compile``: torch.compile
of it, ``fastssl``: the fused op) on the same inputs in the same process:

* GPU: CUDA events around each call, median of many calls after warm-up, several
  input sets rotated so that caches don't flatter; peak extra memory from the
  allocator; the card's roofline (device-to-device copy GB/s and bf16 matmul
  TFLOP/s) measured in the same run.
* CPU: perf_counter medians. CPU times are only meaningful as ratios between
  providers; the tables say so.

The eager provider is the op's reference (the public op with backend="torch", which runs its
`*_ref`: the official formula, written once in fastssl/ops/).

Output: a markdown table per op (printed, and written to OUT/<op>.md) and a JSON line per row
(OUT/<op>.jsonl) with the machine, date, versions and git SHA (`environment()`); OUT is
`--out`, and `benchmarks/results` of a checkout is where published rows live.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

Inputs = tuple
Provider = Callable[..., object]


@dataclass
class Case:
    """One benchmark row: a shape/dtype setting and the providers to compare.

    make_inputs() builds one input set (called `rotate` times); every provider is
    called as provider(*inputs) and must do the whole timed work (fwd+bwd).
    flops / bytes_moved, when given, turn times into TFLOP/s and GB/s."""

    name: str
    params: dict
    make_inputs: Callable[[], Inputs]
    providers: dict[str, Provider]
    flops: float | None = None
    bytes_moved: float | None = None
    notes: dict = field(default_factory=dict)


def git_sha() -> str | None:
    """The short SHA of the checkout this package was imported from (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=False, cwd=Path(__file__).resolve().parent)
    except OSError:
        return None
    return out.stdout.strip() or None


def environment() -> dict:
    """Where and with what a row was measured: device (GPU name or CPU), versions, git SHA, UTC date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name() if cuda
        else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda if cuda else None,
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


def write_rows(path: Path, rows: Sequence[dict], env: dict | None = None, *, append: bool = False) -> Path:
    """Write one JSON line per row, each carrying `env` (default: `environment()`), replacing the file
    (append: after its rows)."""
    env = environment() if env is None else env
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w") as f:
        for row in rows:
            f.write(json.dumps({**env, **row}) + "\n")
    return path


def publish(name: str, table: str, rows: Sequence[dict], env: dict, out: Path | None) -> None:
    """Print a benchmark's markdown `table`; with `out`, also write it to OUT/<name>.md and its
    rows (each carrying `env`) to OUT/<name>.jsonl."""
    print(table, flush=True)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.md").write_text(table)
        write_rows(out / f"{name}.jsonl", rows, env)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_fn(fn: Callable[[int], object], *, warmup: int, iters: int) -> float:
    """Median milliseconds of fn(i) over `iters` calls after `warmup` calls."""
    for i in range(warmup):
        fn(i)
    _sync()
    times = []
    if torch.cuda.is_available():
        for i in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for i in range(iters):
            t0 = time.perf_counter()
            fn(i)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object]) -> int | None:
    """Bytes allocated at the peak of one call beyond what was live before it."""
    if not torch.cuda.is_available():
        return None
    _sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    _sync()
    return torch.cuda.max_memory_allocated() - base


_ROOFLINE: dict | None = None


def roofline() -> dict:
    """Copy bandwidth (GB/s, bytes read + written) and bf16 matmul TFLOP/s of this card."""
    global _ROOFLINE
    if _ROOFLINE is not None:
        return _ROOFLINE
    if not torch.cuda.is_available():
        _ROOFLINE = {"copy_gbps": None, "bf16_tflops": None}
        return _ROOFLINE
    _ROOFLINE = {"copy_gbps": _copy_gbps(), "bf16_tflops": _bf16_matmul_tflops()}
    torch.cuda.empty_cache()
    return _ROOFLINE


def _copy_gbps() -> float:
    n = 256 * 1024 * 1024  # 1 GiB of fp32, far beyond L2
    src, dst = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
    ms = time_fn(lambda i: dst.copy_(src), warmup=3, iters=20)
    return 2 * n * 4 / ms / 1e6


def _bf16_matmul_tflops() -> float:
    m = 8192
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = time_fn(lambda i: a @ b, warmup=3, iters=20)
    return 2 * m**3 / ms / 1e9


def run_case(case: Case, *, rotate: int, warmup: int, iters: int) -> list[dict]:
    inputs = [case.make_inputs() for _ in range(rotate)]
    rows = []
    for provider, fn in case.providers.items():
        row = {"case": case.name, **case.params, "provider": provider}
        try:
            ms = time_fn(lambda i, fn=fn: fn(*inputs[i % rotate]), warmup=warmup, iters=iters)
            row["ms"] = ms
            extra = peak_extra_bytes(lambda fn=fn: fn(*inputs[0]))
            row["peak_extra_mb"] = None if extra is None else extra / 2**20
            if case.flops is not None:
                row["tflops"] = case.flops / ms / 1e9
            if case.bytes_moved is not None:
                row["gbps"] = case.bytes_moved / ms / 1e6
        except Exception as exc:  # an OOM or a compile failure is a result to report
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        rows.append(row)
    baseline = next((r["ms"] for r in rows if r["provider"] == "eager" and "ms" in r), None)
    for r in rows:
        if baseline is not None and "ms" in r:
            r["speedup_vs_eager"] = baseline / r["ms"]
    return rows


def _fmt(v, digits=3) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def markdown(op: str, rows: Sequence[dict], env: dict, roof: dict) -> str:
    cuda = torch.cuda.is_available()
    measured = {"case", "provider", "ms", "peak_extra_mb", "tflops", "gbps", "speedup_vs_eager", "error"}
    param_keys = [k for k in rows[0] if k not in measured]
    time_col = "ms" if cuda else "ms (CPU, ratios only)"
    cols = ["case", *param_keys, "provider", time_col, "× eager", "peak extra MB"]
    has_tflops = any("tflops" in r for r in rows)
    has_gbps = any("gbps" in r for r in rows)
    if has_tflops:
        cols += ["TFLOP/s", "% bf16 matmul"]
    if has_gbps:
        cols += ["GB/s", "% copy BW"]
    lines = [
        f"### {op}",
        "",
        f"{env['device']} · torch {env['torch']} · triton {env['triton']} · CUDA {env['cuda']} · "
        f"git {env['git_sha']} · {env['date']}",
    ]
    if cuda:
        lines.append(
            f"Measured roofline in this run: copy {roof['copy_gbps']:.0f} GB/s (read+write), "
            f"bf16 matmul {roof['bf16_tflops']:.0f} TFLOP/s."
        )
    else:
        lines.append("CPU run: times are only comparable as ratios within this table.")
    lines += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            cells = [r["case"], *[_fmt(r.get(k)) for k in param_keys], r["provider"], r["error"]]
            cells += [""] * (len(cols) - len(cells))
        else:
            cells = [r["case"], *[_fmt(r.get(k)) for k in param_keys], r["provider"], _fmt(r["ms"]),
                     _fmt(r.get("speedup_vs_eager"), 2), _fmt(r.get("peak_extra_mb"))]
            if has_tflops:
                t = r.get("tflops")
                share = _fmt(100 * t / roof["bf16_tflops"], 2) if t and roof["bf16_tflops"] else "–"
                cells += [_fmt(t), share]
            if has_gbps:
                g = r.get("gbps")
                share = _fmt(100 * g / roof["copy_gbps"], 2) if g and roof["copy_gbps"] else "–"
                cells += [_fmt(g), share]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(description: str, argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", type=Path, default=None, help="folder for <op>.md and <op>.jsonl")
    parser.add_argument("--quick", action="store_true", help="small shapes and few iterations (smoke run)")
    parser.add_argument("--iters", type=int, default=None)
    parser.add_argument("--dry-run", action="store_true",
                        help="list the cases; make no inputs, time nothing (checks the script on a CPU)")
    return parser.parse_args(argv)


def run(op: str, cases: Sequence[Case], args: argparse.Namespace) -> list[dict]:
    """Time all cases, print the markdown table, write .md/.jsonl under args.out. With
    args.dry_run: list the cases (their inputs are not made) and time nothing."""
    if getattr(args, "dry_run", False):
        for case in cases:
            print(f"dry run: {op} {case.name} {case.params} providers={list(case.providers)}")
        return []
    env = environment()
    roof = roofline()
    quick = getattr(args, "quick", False)
    iters = args.iters or (5 if quick else (50 if torch.cuda.is_available() else 10))
    warmup = 2 if quick else (10 if torch.cuda.is_available() else 2)
    rows = []
    for case in cases:
        rows += run_case(case, rotate=2 if quick else 4, warmup=warmup, iters=iters)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    publish(op, markdown(op, rows, env, roof), [{**roof, "op": op, **r} for r in rows], env, args.out)
    return rows


def run_suites(doc: str, suites: dict[str, Callable[[bool, str], list[Case]]],
               argv: Sequence[str] | None = None) -> None:
    """The `main` of a module of op benchmarks (`doc`: its docstring, whose first line is the
    --help text): `run` each op's cases, suites[op](quick, device), on the GPU when there is one."""
    args = parse_args(doc.splitlines()[0], argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for op, cases in suites.items():
        run(op, cases(args.quick, device), args)


def compiled(fn: Provider) -> Provider:
    """torch.compile of the eager formula (the 'compile' provider)."""
    return torch.compile(fn)


def fwd_bwd(loss_fn: Provider) -> Provider:
    """One training step's loss work: the forward, and the gradients of every input that needs
    one (an input the loss does not read gets None, as SigLIP's unused gathered features)."""
    def step(*inputs):
        wrt = [x for x in inputs if x.requires_grad]
        return torch.autograd.grad(loss_fn(*inputs), wrt, allow_unused=True)
    return step


def loss_providers(eager: Provider, fastssl: Provider, *, compiled_eager: Provider | None = None,
                   ) -> dict[str, Provider]:
    """The three providers of a loss op, each run forward and backward: the official formula, its
    torch.compile and the fused op. compiled_eager: one `compiled(eager)` that the caller shares
    across its cases (shapes after the first then compile dynamic); default: a new one."""
    return {"eager": fwd_bwd(eager), "compile": fwd_bwd(compiled_eager or compiled(eager)),
            "fastssl": fwd_bwd(fastssl)}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m fastssl.bench.harness [--require-cuda] [--dry-run]`: print the environment every
    row is recorded with, and the versions of what the GPU checks need (pytest, timm)."""
    parser = argparse.ArgumentParser(description=main.__doc__.split(":")[0])
    parser.add_argument("--require-cuda", action="store_true", help="fail unless a CUDA GPU is visible")
    parser.add_argument("--dry-run", action="store_true", help="print, but do not require the GPU")
    args = parser.parse_args(argv)
    import pytest
    import timm

    env = environment()
    if torch.cuda.is_available():
        env["capability"] = torch.cuda.get_device_capability()
    print(json.dumps({**env, "pytest": pytest.__version__, "timm": timm.__version__}))
    if args.require_cuda and not args.dry_run and not torch.cuda.is_available():
        parser.error("--require-cuda: no CUDA GPU is visible")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


def run_cli(argv: list[str]) -> int:
    """`fastssl ARGV` in this process, exactly as `python -m fastssl.cli` runs it: for the studies
    that time or patch what a command runs without reaching into the CLI's own functions."""
    import runpy

    saved = sys.argv
    sys.argv = ["fastssl", *argv]
    try:
        runpy.run_module("fastssl.cli", run_name="__main__", alter_sys=False)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else int(e.code is not None)
    finally:
        sys.argv = saved
    return 0
