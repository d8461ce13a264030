"""Input validation and backend choice shared by every fused op.

Each public op validates at its boundary with these helpers, then asks
`resolve_backend` which implementation runs. The choice is explicit: "torch" is
the reference, "triton" the fused kernel, "auto" picks the kernel on CUDA tensors
and the reference elsewhere. Nothing is swapped silently.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    HAS_TRITON = True
except ImportError:  # macOS / Windows wheels of torch ship no triton
    HAS_TRITON = False

BACKENDS = ("auto", "triton", "torch")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def triton_interpreting() -> bool:
    """True when Triton runs kernels on the CPU (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _interpreter_dot_is_exact(dtype: torch.dtype) -> bool:
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
        if not _interpreter_dot_is_exact(dtype):
            raise NotImplementedError(
                f"{op}: backend='triton' on {dtype} CPU tensors under TRITON_INTERPRET=1 is not supported: this "
                f"Triton's interpreter computes tl.dot on {dtype} tiles wrongly. Use float32/float16 inputs, "
                f"backend='torch', or a GPU."
            )


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """Return "triton" or "torch" for `backend` given the op's input tensors."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if (on_cuda and HAS_TRITON) else "torch"
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' needs the triton package, which is not installed")
        if not on_cuda and not triton_interpreting():
            raise ValueError(
                "backend='triton' got CPU tensors; Triton kernels run on CPU tensors only under "
                "TRITON_INTERPRET=1 (set before fastssl is imported). Use backend='torch' or 'auto'."
            )
    return backend


def check_tensor(
    name: str,
    value: object,
    *,
    ndim: int | Iterable[int] | None = None,
    dtypes: Iterable[torch.dtype] | None = FLOAT_DTYPES,
    device: torch.device | None = None,
    like: str | None = None,
    nonempty: bool = True,
) -> torch.Tensor:
    """Raise a TypeError/ValueError naming `name` unless `value` fits; return it."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if value.ndim not in allowed:
            want = " or ".join(f"{d}-D" for d in allowed)
            raise ValueError(f"{name} must be {want}, got shape {tuple(value.shape)}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if value.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise TypeError(f"{name} must have dtype in ({names}), got {value.dtype}")
    if device is not None and value.device != device:
        raise ValueError(f"{name} must be on {device}{f' like {like}' if like else ''}, got {value.device}")
    if nonempty and value.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(value.shape)}")
    return value


def check_same_dtype(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """All tensors share one dtype, or a TypeError lists each one's."""
    if len({t.dtype for t in tensors}) > 1:
        got = ", ".join(f"{n}={t.dtype}" for n, t in zip(names, tensors))
        raise TypeError(f"{', '.join(names)} must share one dtype, got {got}")


def check_positive(name: str, value: float) -> float:
    """A finite number > 0, or a ValueError naming `name`."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)
