"""KeyQueue: the MoCo negative-key queue (He et al., "Momentum Contrast for Unsupervised
Visual Representation Learning", CVPR 2020), as a ring buffer whose pointer never leaves
the device.

The official code (and solo-learn, lightly, VISSL, mmselfsup) enqueues with
`ptr = int(self.queue_ptr); queue[:, ptr:ptr + n] = keys.T`, a device-to-host sync per
step, and needs the queue size to be a multiple of the batch. KeyQueue.push is one kernel
(torch.ops.fastssl.queue_push_, csrc/) that writes the rows, casts and optionally
L2-normalizes them, and advances the pointer in device memory; any n >= 1 works.
`queue_push_ref` states the same push in PyTorch; it is the test oracle and the path taken on
a CUDA device the built extension has no image for (with a warning, once per device).
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from fastssl import _ext
from fastssl.distributed import all_gather_no_grad
from fastssl.validation import check_bool, check_float_dtype, check_int, check_tensor

_ext.load()


@torch.library.register_fake("fastssl::queue_push_")
def _queue_push_fake(queue, ptr, arrivals, keys, normalize) -> None:
    # Mutates its inputs in place and returns nothing: lets torch.compile trace push().
    return None


def has_kernel_image(capability: tuple[int, int], images: Sequence[str]) -> bool:
    """Whether a CUDA binary holding `images` (cuobjdump's names: "sm_80", "sm_90a",
    "compute_100") runs on a device of compute `capability` (major, minor), by CUDA's
    compatibility rules: SASS sm_XY runs on X.Z for Z >= Y (same major; sm_XYa only on X.Y);
    PTX compute_XY is JIT-compiled by the driver for any capability >= X.Y (compute_XYa only
    for X.Y, compute_XYf only within major X)."""
    major, minor = capability
    for image in images:
        match = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", image)
        if match is None:
            raise ValueError(f"images must be names like 'sm_80' or 'compute_100', got {image!r}")
        kind, img_major, img_minor, suffix = match[1], int(match[2]), int(match[3]), match[4]
        if suffix == "a":
            runs = (major, minor) == (img_major, img_minor)
        elif kind == "sm" or suffix == "f":
            runs = major == img_major and minor >= img_minor
        else:
            runs = (major, minor) >= (img_major, img_minor)
        if runs:
            return True
    return False


def extension_cuda_images() -> tuple[str, ...]:
    """The CUDA images compiled into the loaded extension (empty for a CPU-only build)."""
    return tuple(sorted(i for i in torch.ops.fastssl.cuda_images().split(",") if i))


_KERNEL_RUNS_ON: dict[torch.device, bool] = {}


@torch.compiler.assume_constant_result
def kernel_runs_on(device: torch.device) -> bool:
    """Whether the loaded extension's kernels (KeyQueue's push, MemoryBank's update) can run on
    `device`. Decided once per device, before any launch: a missing image would otherwise fail
    every call. Where not, both take their PyTorch paths, with one warning per device."""
    if device.type != "cuda":
        return True
    if device not in _KERNEL_RUNS_ON:
        capability = torch.cuda.get_device_capability(device)
        images = extension_cuda_images()
        _KERNEL_RUNS_ON[device] = has_kernel_image(capability, images)
        if not _KERNEL_RUNS_ON[device]:
            warnings.warn(
                f"{device} (sm_{capability[0]}{capability[1]}): the fastssl extension has no kernel image "
                f"for it (built for {', '.join(images) or 'CPU only'}); KeyQueue and MemoryBank use their "
                "PyTorch paths (queue_push_ref, memory_bank_update_ref) instead. Rebuild on this machine, "
                "or with TORCH_CUDA_ARCH_LIST naming it, for the kernels.",
                RuntimeWarning, stacklevel=3,
            )
    return _KERNEL_RUNS_ON[device]


def queue_push_ref(queue: torch.Tensor, ptr: torch.Tensor, keys: torch.Tensor, normalize: bool) -> None:
    """KeyQueue.push in PyTorch, in place: queue [size, dim], ptr [1] int64, keys [n, dim].

    Row r of keys (the last `size` rows when n > size) goes to slot (ptr + r) % size, L2-normalized
    when `normalize` (F.normalize, eps 1e-12) in fp32 (fp64 for fp64 keys) and cast to queue's
    dtype through fp32; then ptr = (ptr + n) % size. No host sync (ptr stays on its device)."""
    size, n = queue.shape[0], keys.shape[0]
    start = max(0, n - size)
    rows = keys[start:].to(torch.promote_types(keys.dtype, torch.float32))
    if normalize:
        rows = nn.functional.normalize(rows, dim=1)
    if queue.dtype in (torch.float16, torch.bfloat16):
        rows = rows.to(torch.float32)
    slots = (ptr + torch.arange(start, n, device=queue.device)) % size
    queue.index_copy_(0, slots, rows.to(queue.dtype))
    ptr.copy_((ptr + n) % size)


def _training_dtype(device: torch.device | str) -> torch.dtype:
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class RowTable(nn.Module):
    """What KeyQueue and MemoryBank share: a [size, dim] floating buffer of rows, named ROWS (its
    state-dict key), that an op of the extension writes in place."""

    ROWS: ClassVar[str]

    @property
    def rows(self) -> torch.Tensor:
        return getattr(self, self.ROWS)

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.rows.dtype

    def _incoming(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """x [n, dim] on the table's device, checked; a copy when it shares the table's storage
        (the kernel must read every incoming row before it writes any)."""
        what = f"the {type(self).__name__}"
        check_tensor(name, x, ndim=2, device=self.rows.device, like=what)
        if x.shape[1] != self.dim:
            raise ValueError(f"{name} must have {self.dim} columns ({what}'s dim), got shape "
                             f"{tuple(x.shape)}")
        # Checked eagerly only (dynamo cannot trace data_ptr). Under torch.compile, passing a view
        # of the table itself is unsupported: inductor's re-inplacing reads rows already overwritten.
        if torch.compiler.is_compiling():
            return x
        return x.clone() if x.untyped_storage().data_ptr() == self.rows.untyped_storage().data_ptr() else x

    def _check_saved_rows(self, state_dict: dict, prefix: str) -> None:
        """Refuse saved rows that are not floating or not [size, dim], before nn.Module copies anything."""
        key = prefix + self.ROWS
        rows = state_dict.get(key)
        if rows is None:
            return
        if not isinstance(rows, torch.Tensor) or not rows.is_floating_point():
            raise TypeError(f"state_dict[{key!r}] must be a floating tensor, got "
                            f"{getattr(rows, 'dtype', type(rows).__name__)}")
        if tuple(rows.shape) != tuple(self.rows.shape):
            raise ValueError(f"state_dict[{key!r}] must have shape {tuple(self.rows.shape)} (size, dim), "
                             f"got {tuple(rows.shape)}")


class KeyQueue(RowTable):
    """A ring of `size` keys of `dim` features (MoCo's queue of negatives).

    Buffers (saved by state_dict, moved by .to()): `keys` [size, dim] in `dtype`, initially
    random unit vectors, and `ptr` [1] int64, the slot the next pushed row goes to. Row
    order in `keys` is the ring's, not time order (irrelevant for a set of negatives).

    dtype=None (default) stores the training dtype of the queue's device: bfloat16 on CUDA
    (what bf16 autocast gives the query, so info_nce reads the queue as stored, with no cast
    pass), float32 elsewhere; it is chosen again when the queue moves to another device type.
    An explicit dtype (the argument, or a later cast such as .double()) stays. device=None: the
    default device (torch.get_default_device(); meta inside `with torch.device("meta")`).

    The official MoCo queue is the transpose, [dim, K] with a column per key: see from_official.

    push(keys [n, dim]) is exactly pushing its rows one at a time: row i goes to slot
    (ptr + i) % size and ptr becomes (ptr + n) % size, for any n >= 1 (with n > size the
    last `size` rows survive). `normalize=True` stores keys / max(||keys||_2, 1e-12) per
    row (F.normalize). Keys of another floating dtype are cast to `dtype` in the kernel.
    """

    ROWS = "keys"
    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        check_int("size", size, low=1)
        check_int("dim", dim, low=1)
        device = torch.get_default_device() if device is None else torch.device(device)
        self._auto_dtype = dtype is None
        if dtype is None:
            dtype = _training_dtype(device)
        check_float_dtype("dtype", dtype)
        self.normalize = check_bool("normalize", normalize)
        # Random unit rows like the official init (normalize(randn)); drawn in fp32 at
        # least so the rows are unit to the precision of `dtype`.
        draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        init = nn.functional.normalize(torch.randn(size, dim, device=device, dtype=draw_dtype), dim=1)
        self.register_buffer("keys", init.to(dtype))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.int64, device=device))
        # Scratch counter of the CUDA kernel (its last block advances ptr); zero between pushes.
        self.register_buffer("_arrivals", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    @classmethod
    def from_official(
        cls, queue: torch.Tensor, queue_ptr: torch.Tensor, *, normalize: bool = False,
        dtype: torch.dtype | None = None,
    ) -> KeyQueue:
        """A KeyQueue holding an official MoCo (v1/v2) queue: `queue` [dim, K], one key per column
        (its `self.queue` buffer, "module.queue" in a checkpoint), and `queue_ptr` [1] int64, the next
        column written. keys = queue.T and ptr = queue_ptr, on queue's device; so pushing the same
        batches afterwards gives keys == official queue.T (the official enqueue writes columns
        [ptr, ptr + n) and advances ptr by n mod K). The official code pushes normalized keys, hence
        normalize=False; dtype as in the constructor (None: the device's training dtype)."""
        check_tensor("queue", queue, ndim=2)
        dim, size = queue.shape
        if not isinstance(queue_ptr, torch.Tensor) or queue_ptr.numel() != 1:
            raise TypeError(f"queue_ptr must be a one-element integer tensor (the official queue_ptr), "
                            f"got {getattr(queue_ptr, 'shape', type(queue_ptr).__name__)}")
        out = cls(size, dim, dtype=dtype, device=queue.device, normalize=normalize)
        out.load_state_dict({"keys": queue.T, "ptr": queue_ptr.reshape(1).to(queue.device)})
        return out

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}, normalize={self.normalize}"

    @torch.no_grad()
    def push(self, keys: torch.Tensor, *, gather: bool = False) -> None:
        """Enqueue keys [n, dim] (any floating dtype, on the queue's device).

        gather=True first all-gathers keys from every rank (rank-major, like the official
        concat_all_gather), so all ranks push the same rows and hold identical queues;
        every rank must then pass the same n. No device-to-host sync on CUDA. A rejected
        push raises before anything in the queue changes."""
        keys = self._incoming("keys", keys)
        if gather:
            keys = all_gather_no_grad(keys)
        if not kernel_runs_on(self.keys.device):
            queue_push_ref(self.keys, self.ptr, keys, self.normalize)
            return
        try:
            torch.ops.fastssl.queue_push_(
                self.keys, self.ptr, self._arrivals, keys.contiguous(), self.normalize
            )
        except NotImplementedError as exc:
            raise RuntimeError(
                f"KeyQueue on {self.keys.device}: the fastssl extension ({_ext.load()}) has no kernel for "
                "this device type"
            ) from exc

    def _apply(self, fn, recurse=True):
        device_type, dtype = self.keys.device.type, self.keys.dtype
        super()._apply(fn, recurse)
        if self.keys.dtype != dtype:  # a cast (.double(), .to(dtype)) is an explicit choice: keep it
            self._auto_dtype = False
        elif self._auto_dtype and self.keys.device.type != device_type:
            self.keys = self.keys.to(_training_dtype(self.keys.device))
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Validate everything before nn.Module copies anything: a rejected load changes nothing.
        self._check_saved_rows(state_dict, prefix)
        ptr = state_dict.get(prefix + "ptr")
        if ptr is not None:
            if not isinstance(ptr, torch.Tensor) or ptr.numel() != 1 or ptr.is_floating_point() \
                    or ptr.dtype == torch.bool or ptr.is_complex():
                raise TypeError(f"state_dict[{prefix + 'ptr'!r}] must be a single integer tensor, got "
                                f"{getattr(ptr, 'dtype', type(ptr).__name__)} of shape "
                                f"{tuple(getattr(ptr, 'shape', ()))}")
            value = int(ptr.reshape(-1)[0])  # a host read, once per load (not per push)
            if not 0 <= value < self.size:
                raise ValueError(f"state_dict[{prefix + 'ptr'!r}] must be in [0, {self.size}), got {value}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
