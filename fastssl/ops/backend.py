"""Which implementation of a fused op runs: the explicit backend choice every op shares.

Each public op validates its inputs (fastssl.validation), then asks `resolve_backend` which
implementation runs: "torch" is the reference, "triton" the fused kernel, "auto" picks the
kernel on CUDA tensors and the reference elsewhere. Nothing is swapped silently.

`modeled_gpu(sms)` lets the launchers run on meta tensors as on a GPU with `sms`
multiprocessors (the traffic model records their launches instead of running them).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS / Windows wheels of torch ship no triton
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")

_modeled_sms: int | None = None  # set inside modeled_gpu()


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1), outside modeled_gpu()."""
    return _modeled_sms is None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def multiprocessor_count(device: torch.device) -> int | None:
    """The SM count the launchers size their grids by: the CUDA device's (or the modeled GPU's);
    None on the interpreter."""
    if _modeled_sms is not None:
        return _modeled_sms
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return None


@contextlib.contextmanager
def modeled_gpu(sms: int) -> Iterator[None]:
    """Inside: backend='triton' accepts meta tensors, and the launchers pick the tiles and grids of
    a GPU with `sms` multiprocessors (GPU tiles, not the interpreter's)."""
    global _modeled_sms
    saved, _modeled_sms = _modeled_sms, sms
    try:
        yield
    finally:
        _modeled_sms = saved


@functools.cache
def interpreter_dot_is_exact(dtype: torch.dtype) -> bool:
    """Whether the interpreter's tl.dot multiplies `dtype` tiles as numbers: some Triton
    versions (3.8 among them) multiply bf16 tiles as their raw 16-bit storage. Probed once
    with a 16x16 all-ones product, whose every entry is 16."""
    import triton.language as tl

    @triton.jit
    def dot_probe(a_ptr, out_ptr):
        idx = tl.arange(0, 16)[:, None] * 16 + tl.arange(0, 16)[None, :]
        a = tl.load(a_ptr + idx)
        tl.store(out_ptr + idx, tl.dot(a, a))

    a = torch.ones(16, 16, dtype=dtype)
    out = torch.empty(16, 16, dtype=torch.float32)
    dot_probe[(1,)](a, out)
    return bool((out == 16).all())


def check_interpreter_dot(op: str, *tensors: torch.Tensor) -> None:
    """Raise before a kernel with tl.dot runs on CPU tensors under TRITON_INTERPRET=1 in a dtype
    the interpreter's dot gets wrong (it would return a number, not the answer)."""
    if not triton_interpreting():
        return
    for dtype in {t.dtype for t in tensors if t.device.type == "cpu" and t.dtype in (torch.float16, torch.bfloat16)}:
        if not interpreter_dot_is_exact(dtype):
            raise NotImplementedError(
                f"{op}: backend='triton' on {dtype} CPU tensors under TRITON_INTERPRET=1 is not supported: this "
                f"Triton's interpreter computes tl.dot on {dtype} tiles wrongly. Use float32/float16 inputs, "
                f"backend='torch', or a GPU."
            )


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for `backend` given the op's input tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_gpu = all(t.is_cuda or (_modeled_sms is not None and t.is_meta) for t in tensors)
    if backend == "auto":
        return "triton" if (on_gpu and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not on_gpu and not triton_interpreting():
            raise ValueError(
                "backend='triton' got CPU tensors; Triton kernels run on CPU tensors only under "
                "TRITON_INTERPRET=1 (set before fastssl is imported). Use backend='torch' or 'auto'."
            )
    return backend


KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def resolve_kernel_backend(op: str, backend: str, *tensors: torch.Tensor) -> str:
    """resolve_backend for an op whose kernels take float32, float16 and bfloat16 tensors: float64
    (e.g. gradcheck) runs the reference under "auto" and is refused by "triton" with a TypeError
    naming `op`; a kernel bound for the interpreter passes check_interpreter_dot first."""
    resolved = resolve_backend(backend, *tensors)
    if resolved == "triton" and any(t.dtype not in KERNEL_DTYPES for t in tensors):
        if backend != "auto":
            got = ", ".join(sorted({str(t.dtype) for t in tensors}))
            raise TypeError(f"{op}: backend='triton' takes float32, float16 or bfloat16 tensors, got {got}; "
                            f"backend='auto' or 'torch' runs the reference in float64")
        resolved = "torch"  # float64: the reference, which computes in it
    if resolved == "triton":
        check_interpreter_dot(op, *tensors)
    return resolved
