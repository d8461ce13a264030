"""Count what a region of PyTorch code dispatches: every aten op, with the bytes it reads and writes.

`DispatchCounter` is a TorchDispatchMode. fastssl's custom ops are entered, so the ops their
launchers dispatch (a hidden `.contiguous()`, a cast, a reduction) are recorded like any other;
a Triton kernel launch itself dispatches nothing on a GPU, and under TRITON_INTERPRET=1 the
interpreter's own host copies are kept out with `interpreted_kernels_uncounted()`.

Per op: bytes = distinct elements of each tensor input (a stride-0 dimension is read once) plus
each output, times the element size; views and allocations (`empty`, `new_empty`) move nothing
and launch nothing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves

# ops that allocate without touching memory, or only rebind storage
_FREE = {"empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "set_", "lift_fresh",
         "_local_scalar_dense", "detach", "alias", "sym_size", "sym_stride", "sym_numel"}
# ops that copy an existing tensor's values into new or existing memory
COPY_OPS = {"copy_", "clone", "contiguous", "to", "reshape", "_to_copy", "slice_backward", "select_backward",
            "slice_scatter", "select_scatter", "as_strided_scatter", "_copy_from", "_copy_from_and_resize"}


@dataclass
class OpRecord:
    """One dispatched aten op: its name (overload dropped), bytes read and written, largest output numel."""

    name: str
    bytes_read: int
    bytes_written: int
    out_numel: int

    @property
    def is_copy(self) -> bool:
        return self.name in COPY_OPS


def distinct_bytes(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a tensor addresses (stride-0 dimensions count once)."""
    return math.prod(s for s, st in zip(t.shape, t.stride()) if st != 0) * t.element_size()


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # meta and fake tensors have no data
        return None


def _is_view(func, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> bool:
    """A view op, or one that may alias (contiguous, reshape, to) and did: it moved nothing.
    On meta tensors, where storage can't be compared, a may-alias op is a view when it returns
    an input's shape and strides."""
    returns = func._schema.returns
    if not returns or not all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return False
    if func.overloadpacket.__name__ not in COPY_OPS:
        return True
    in_storages = {_storage(t) for t in ins}
    if None in in_storages:
        return all(any(o.shape == t.shape and o.stride() == t.stride() and o.dtype == t.dtype for t in ins)
                   for o in outs)
    return all(_storage(o) in in_storages for o in outs)


class DispatchCounter(TorchDispatchMode):
    """Records every aten op dispatched inside `with DispatchCounter() as c:` in `c.records`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastssl":
            from torch._library.custom_ops import _maybe_get_opdef

            opdef = _maybe_get_opdef(func._schema.name)
            if opdef is not None:  # run the implementation under this mode, so its ops are seen
                with self:
                    return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        ins = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        if name in _FREE or _is_view(func, ins, outs):
            return out
        self.records.append(OpRecord(name, sum(distinct_bytes(t) for t in ins),
                                     sum(t.numel() * t.element_size() for t in outs),
                                     max((t.numel() for t in outs), default=0)))
        return out

    @property
    def kernels(self) -> int:
        return len(self.records)

    @property
    def bytes(self) -> int:
        return sum(r.bytes_read + r.bytes_written for r in self.records)

    def copies(self, min_numel: int) -> list[OpRecord]:
        """The copy ops whose output has at least `min_numel` elements."""
        return [r for r in self.records if r.is_copy and r.out_numel >= min_numel]


@contextlib.contextmanager
def interpreted_kernels_uncounted():
    """Under TRITON_INTERPRET=1, keep the interpreter's host copies of a kernel's arguments out of any
    active dispatch mode (a GPU launch dispatches no aten op). A no-op where Triton is absent."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    original = interpreter.GridExecutor.__call__

    def call(self, *args, **kwargs):
        with _disable_current_modes():
            return original(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = call
    try:
        yield
    finally:
        interpreter.GridExecutor.__call__ = original
