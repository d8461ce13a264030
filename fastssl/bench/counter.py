"""Count what a region of PyTorch code dispatches: every aten op, with the bytes it reads and writes.

`DispatchCounter` is a TorchDispatchMode. fastssl's custom ops are entered, so the ops their
launchers dispatch (a hidden `.contiguous()`, a cast, a reduction) are recorded like any other;
a Triton kernel launch itself dispatches nothing on a GPU, and under TRITON_INTERPRET=1 the
interpreter's own host copies are kept out with `interpreted_kernels_uncounted()`.

Per op: bytes = distinct elements of each tensor input (a stride-0 dimension is read once) plus
each output, times the element size; views and allocations (`empty`, `new_empty`) move nothing
and launch nothing. The counter also follows every storage the region allocates until it is
freed: `peak_bytes` is the most memory the region held at once beyond what existed before.

`kernel_launches()` records Triton launches (kernel name and bound arguments) instead of running
them, so a fused path can be walked on meta tensors; `interpreted_traffic()` records, under
TRITON_INTERPRET=1, the distinct addresses each launch loads and stores.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry

# ops that allocate without touching memory, or only rebind storage
_FREE = {
    "empty",
    "empty_like",
    "new_empty",
    "empty_strided",
    "new_empty_strided",
    "set_",
    "lift_fresh",
    "_local_scalar_dense",
    "detach",
    "alias",
    "sym_size",
    "sym_stride",
    "sym_numel",
}
# ops that copy an existing tensor's values into new or existing memory
# ops whose tensor inputs give only a shape/dtype (factories), or whose first argument is only
# written (copy_ into it, fill it): those inputs are not read
_SHAPE_ONLY = {"new_zeros", "new_ones", "new_full", "zeros_like", "ones_like", "full_like", "rand_like",
               "randn_like"}
_WRITE_ONLY_SELF = {"copy_", "fill_", "zero_", "uniform_", "normal_", "random_", "bernoulli_"}
COPY_OPS = {
    "copy_",
    "clone",
    "contiguous",
    "to",
    "reshape",
    "_to_copy",
    "slice_backward",
    "select_backward",
    "slice_scatter",
    "select_scatter",
    "as_strided_scatter",
    "_copy_from",
    "_copy_from_and_resize",
}


@dataclass
class OpRecord:
    """One dispatched aten op: its name (overload dropped), bytes read and written, largest output
    numel, and its FLOPs as torch.utils.flop_counter counts them (matmul-like ops; 0 for the rest)."""

    name: str
    bytes_read: int
    bytes_written: int
    out_numel: int
    flops: int = 0

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
        return all(
            any(o.shape == t.shape and o.stride() == t.stride() and o.dtype == t.dtype for t in ins)
            for o in outs
        )
    return all(_storage(o) in in_storages for o in outs)


def _read_inputs(name: str, args: tuple, ins: list[torch.Tensor]) -> list[torch.Tensor]:
    if name in _SHAPE_ONLY:
        return []
    if name in _WRITE_ONLY_SELF and args and isinstance(args[0], torch.Tensor):
        return [t for t in ins if t is not args[0]]
    return ins


class DispatchCounter(TorchDispatchMode):
    """Records every aten op dispatched inside `with DispatchCounter() as c:` in `c.records`."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[OpRecord] = []
        self.live_bytes = 0
        self.peak_bytes = 0
        self._seen: weakref.WeakSet = weakref.WeakSet()

    def _track(self, outs: list[torch.Tensor], ins: list[torch.Tensor]) -> None:
        """Count each new storage from allocation until Python frees it."""
        in_storages = {id(t.untyped_storage()) for t in ins}
        for t in outs:
            storage = t.untyped_storage()
            if id(storage) in in_storages or storage in self._seen:
                continue
            self._seen.add(storage)
            size = storage.nbytes()
            self.live_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            weakref.finalize(storage, self._free, size)

    def _free(self, size: int) -> None:
        self.live_bytes -= size

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
        self._track(outs, ins)
        if name in _FREE or _is_view(func, ins, outs):
            return out
        count_flops = flop_registry.get(func.overloadpacket)
        self.records.append(
            OpRecord(
                name,
                sum(distinct_bytes(t) for t in _read_inputs(name, args, ins)),
                sum(t.numel() * t.element_size() for t in outs),
                max((t.numel() for t in outs), default=0),
                int(count_flops(*args, **kwargs, out_val=out)) if count_flops else 0,
            )
        )
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


def _python_fn(kernel):
    """The @triton.jit function under a JIT, interpreted or autotuned kernel."""
    while hasattr(kernel, "fn"):
        kernel = kernel.fn
    return kernel


@dataclass(frozen=True)
class TensorInfo:
    """What a traffic formula needs of a kernel argument, without holding the tensor (a held
    gradient would make autograd copy it instead of taking it)."""

    shape: tuple
    strides: tuple
    itemsize: int

    def numel(self) -> int:
        return math.prod(self.shape)

    def element_size(self) -> int:
        return self.itemsize

    def stride(self, dim: int | None = None):
        return self.strides if dim is None else self.strides[dim]


def _bind(fn, args: tuple, kwargs: dict) -> dict:
    params = inspect.signature(fn).parameters
    bound = (
        inspect.signature(fn)
        .bind_partial(*args, **{k: v for k, v in kwargs.items() if k in params})
        .arguments
    )
    return {
        k: TensorInfo(tuple(v.shape), v.stride(), v.element_size()) if isinstance(v, torch.Tensor) else v
        for k, v in bound.items()
    }


@dataclass
class Launch:
    """One Triton launch: the kernel's name and its bound arguments; read/written bytes when measured."""

    name: str
    args: dict
    bytes_read: int = 0
    bytes_written: int = 0
    grid: object = field(default=None, repr=False)


@contextlib.contextmanager
def kernel_launches():
    """Record every Triton launch in the yielded list instead of running it (its outputs stay
    as allocated): for walking a fused path on meta tensors."""
    from triton.runtime.jit import KernelInterface

    launches: list[Launch] = []
    original = KernelInterface.__getitem__

    def getitem(self, grid):
        fn = _python_fn(self)
        return lambda *args, **kwargs: launches.append(
            Launch(fn.__name__, _bind(fn, args, kwargs), grid=grid)
        )

    KernelInterface.__getitem__ = getitem
    try:
        yield launches
    finally:
        KernelInterface.__getitem__ = original


@contextlib.contextmanager
def interpreted_traffic():
    """Under TRITON_INTERPRET=1: run the kernels and record, per launch, the distinct addresses
    loaded and stored (masked-off lanes excluded), in bytes, in the yielded list."""
    import numpy as np
    from triton.runtime import interpreter

    launches: list[Launch] = []
    current: dict = {}
    builder = interpreter.InterpreterBuilder
    original = (interpreter.GridExecutor.__call__, builder.create_masked_load, builder.create_masked_store)

    def note(kind, ptrs, mask):
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = np.broadcast_to(ptrs.data, mask.data.shape)[mask.data.astype(bool)]
        for a in np.unique(addresses):
            current[kind][int(a)] = size

    def load(self, ptrs, mask, other, *rest):
        note("read", ptrs, mask)
        return original[1](self, ptrs, mask, other, *rest)

    def store(self, ptrs, value, mask, *rest):
        note("written", ptrs, mask)
        return original[2](self, ptrs, value, mask, *rest)

    def call(self, *args, **kwargs):
        current.clear()
        current.update(read={}, written={})
        out = original[0](self, *args, **kwargs)
        launches.append(
            Launch(
                self.fn.__name__,
                _bind(self.fn, args, kwargs),
                sum(current["read"].values()),
                sum(current["written"].values()),
            )
        )
        return out

    interpreter.GridExecutor.__call__ = call
    builder.create_masked_load, builder.create_masked_store = load, store
    try:
        yield launches
    finally:
        interpreter.GridExecutor.__call__ = original[0]
        builder.create_masked_load, builder.create_masked_store = original[1], original[2]
