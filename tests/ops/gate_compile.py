"""The compile gate's compile: a recorded launch bound by the JIT's own binder and compiled by
triton.compile for a GPUTarget (ttir -> ... -> cubin, the last stage by the ptxas bundled with
Triton, whose -v log gives registers and spills; shared memory from Triton's metadata), memoized
by Triton's own cache key and the gate's version."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import gate_dots  # beside this file
import triton
import triton.language as tl
from gate_capture import Launch


def bind(launch: Launch, target):
    """(ASTSource, options) exactly as JITFunction.run builds them for this launch."""
    from triton import knobs
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(target)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    if hasattr(knobs.compilation, "instrumentation_mode"):  # newer JITs pass it to the binder
        kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound_args, specialization, options
    )
    return ASTSource(fn, signature, constexprs, attrs), options, backend


def compile_key(launch: Launch, target) -> str:
    """Triton's own cache key of this compile (source, specialization, target, options, version)."""
    from triton.runtime.cache import get_cache_key

    src, options, backend = bind(launch, target)
    options = backend.parse_options(dict(options.__dict__, **src.parse_options()))
    return hashlib.sha256(get_cache_key(src, backend, options, {}).encode()).hexdigest()


@contextlib.contextmanager
def captured_fds():
    """Everything written to fds 1 and 2 (ptxas -v prints there)."""
    out = {}
    with tempfile.TemporaryFile() as tmp:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(tmp.fileno(), 1)
        os.dup2(tmp.fileno(), 2)
        try:
            yield out
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
            tmp.seek(0)
            out["text"] = tmp.read().decode(errors="replace")


PTXAS_REGS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
TENSOR_CORE_PTX = {
    90: re.compile(r"\bwgmma\."),
    80: re.compile(r"\bmma\.sync"),
    89: re.compile(r"\bmma\.sync"),
    100: re.compile(r"\btcgen05\.mma|\bmma\.sync"),
}


def compile_one(launch: Launch, cap: int) -> dict:
    """Compile for sm_<cap>: {ok, error, regs, spills, smem, tensor_cores, seconds}."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", cap, 32)
    res = dict(ok=False, error="", regs=None, spills=None, smem=None, tensor_cores=None, dots={})
    t0 = time.time()
    try:
        with captured_fds() as log:
            src, options, _ = bind(launch, target)
            knobs.compilation.always_compile = True  # a Triton cache hit would skip ptxas and its log
            kernel = triton.compile(src, target=target, options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result of the gate
        lines = f"{type(exc).__name__}: {exc}".splitlines() + log.get("text", "").splitlines()
        res["error"] = "\n".join(ln for ln in lines if ln.strip())[:3000]
    else:
        text = log["text"]
        regs, spills = PTXAS_REGS.search(text), PTXAS_SPILLS.search(text)
        tensor_cores = bool(TENSOR_CORE_PTX[cap].search(kernel.asm["ptx"]))
        res.update(
            ok=True,
            smem=kernel.metadata.shared,
            regs=int(regs.group(1)) if regs else None,
            spills=max(map(int, spills.groups())) if spills else None,
            tensor_cores=tensor_cores,
            dots=gate_dots.dot_verdicts(launch.fn, kernel.asm["ttgir"], tensor_cores),
        )
        if res["regs"] is None:
            res.update(ok=False, error="no ptxas -v report in the compile's output:\n" + text[-2000:])
    res["seconds"] = round(time.time() - t0, 2)
    return res


@functools.cache
def gate_version() -> str:
    """A hash of what turns a compile into a verdict (the binder, the compile and its log's
    parsing, the tensor-core patterns): a changed gate does not reuse its old verdicts."""
    import inspect

    logic = [inspect.getsource(f) for f in (bind, compile_key, compile_one)] + [inspect.getsource(gate_dots)]
    logic += [PTXAS_REGS.pattern, PTXAS_SPILLS.pattern]
    logic += [f"{cap}:{pattern.pattern}" for cap, pattern in TENSOR_CORE_PTX.items()]
    return hashlib.sha256("\n".join(logic).encode()).hexdigest()[:16]


def cached_compile(launch: Launch, cap: int, cache_dir: Path) -> tuple[dict, bool]:
    """compile_one, memoized in cache_dir by Triton's cache key and the gate's version;
    (result, was_cached)."""
    from triton.backends.compiler import GPUTarget

    path = cache_dir / f"{compile_key(launch, GPUTarget('cuda', cap, 32))}-{gate_version()}.json"
    if path.is_file():
        return json.loads(path.read_text()), True
    res = compile_one(launch, cap)
    if res["ok"]:  # failures are recompiled (and reported) every run
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(res))
        tmp.replace(path)
    return res, False


def target_supported(cap: int) -> str:
    """'' when the installed Triton (and its ptxas) compiles for sm_<cap>, else why not."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    try:
        with captured_fds():
            triton.compile(ASTSource(_probe, {"x_ptr": "*fp32"}, {}, {}), target=GPUTarget("cuda", cap, 32))
    except Exception as exc:  # noqa: BLE001 - the reason is the report
        return f"triton {triton.__version__} cannot compile for sm_{cap}: {str(exc).splitlines()[0][:300]}"
    return ""


@triton.jit
def _probe(x_ptr):
    tl.store(x_ptr, tl.load(x_ptr) + 1.0)
