"""KeyQueue: the MoCo negative-key queue (He et al., "Momentum Contrast for Unsupervised
Visual Representation Learning", CVPR 2020), as a ring buffer whose pointer never leaves
the device.

The official code (and solo-learn, lightly, VISSL, mmselfsup) enqueues with
`ptr = int(self.queue_ptr); queue[:, ptr:ptr + n] = keys.T`, a device-to-host sync per
step, and needs the queue size to be a multiple of the batch. KeyQueue.push is one kernel
(torch.ops.fastssl.queue_push_, csrc/) that writes the rows, casts and optionally
L2-normalizes them, and advances the pointer in device memory; any n >= 1 works.
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl import _ext
from fastssl.distributed import all_gather_no_grad
from fastssl.ops._dispatch import FLOAT_DTYPES, check_tensor

_ext.load()


@torch.library.register_fake("fastssl::queue_push_")
def _queue_push_fake(queue, ptr, arrivals, keys, normalize) -> None:
    # Mutates its inputs in place and returns nothing: lets torch.compile trace push().
    return None


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    # Checked eagerly only (dynamo cannot trace data_ptr). Under torch.compile, pushing a view
    # of the queue itself is unsupported: inductor's re-inplacing reads rows already overwritten.
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


class KeyQueue(nn.Module):
    """A ring of `size` keys of `dim` features (MoCo's queue of negatives).

    Buffers (saved by state_dict, moved by .to()): `keys` [size, dim] in `dtype`, initially
    random unit vectors, and `ptr` [1] int64, the slot the next pushed row goes to. Row
    order in `keys` is the ring's, not time order (irrelevant for a set of negatives).

    push(keys [n, dim]) is exactly pushing its rows one at a time: row i goes to slot
    (ptr + i) % size and ptr becomes (ptr + n) % size, for any n >= 1 (with n > size the
    last `size` rows survive). `normalize=True` stores keys / max(||keys||_2, 1e-12) per
    row (F.normalize). Keys of another floating dtype are cast to `dtype` in the kernel.
    """

    keys: torch.Tensor
    ptr: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        _check_positive_int("size", size)
        _check_positive_int("dim", dim)
        if dtype not in FLOAT_DTYPES:
            names = ", ".join(str(d).replace("torch.", "") for d in FLOAT_DTYPES)
            raise TypeError(f"dtype must be one of ({names}), got {dtype}")
        if not isinstance(normalize, bool):
            raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
        self.normalize = normalize
        # Random unit rows like the official init (normalize(randn)); drawn in fp32 at
        # least so the rows are unit to the precision of `dtype`.
        draw_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        init = nn.functional.normalize(torch.randn(size, dim, device=device, dtype=draw_dtype), dim=1)
        self.register_buffer("keys", init.to(dtype))
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.int64, device=device))
        # Scratch counter of the CUDA kernel (its last block advances ptr); zero between pushes.
        self.register_buffer("_arrivals", torch.zeros(1, dtype=torch.int32, device=device), persistent=False)

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.dtype}, normalize={self.normalize}"

    @torch.no_grad()
    def push(self, keys: torch.Tensor, *, gather: bool = False) -> None:
        """Enqueue keys [n, dim] (any floating dtype, on the queue's device).

        gather=True first all-gathers keys from every rank (rank-major, like the official
        concat_all_gather), so all ranks push the same rows and hold identical queues;
        every rank must then pass the same n. No device-to-host sync on CUDA. A rejected
        push raises before anything in the queue changes."""
        check_tensor("keys", keys, ndim=2, device=self.keys.device, like="the queue")
        if keys.shape[1] != self.dim:
            raise ValueError(
                f"keys must have {self.dim} columns (the queue's dim), got shape {tuple(keys.shape)}"
            )
        if gather:
            keys = all_gather_no_grad(keys)
        elif not torch.compiler.is_compiling() and _same_storage(keys, self.keys):
            keys = keys.clone()  # rows of the queue itself: read them all before any is overwritten
        try:
            torch.ops.fastssl.queue_push_(
                self.keys, self.ptr, self._arrivals, keys.contiguous(), self.normalize
            )
        except NotImplementedError as exc:
            raise RuntimeError(
                f"KeyQueue on {self.keys.device}: the fastssl extension ({_ext.load()}) has no kernel for "
                "this device; on CUDA it must be built where torch has CUDA and nvcc is found"
            ) from exc

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Validate everything before nn.Module copies anything: a rejected load changes nothing.
        keys, ptr = state_dict.get(prefix + "keys"), state_dict.get(prefix + "ptr")
        if keys is not None:
            if not isinstance(keys, torch.Tensor) or not keys.is_floating_point():
                raise TypeError(f"state_dict[{prefix + 'keys'!r}] must be a floating tensor, got "
                                f"{getattr(keys, 'dtype', type(keys).__name__)}")
            if tuple(keys.shape) != tuple(self.keys.shape):
                raise ValueError(f"state_dict[{prefix + 'keys'!r}] must have shape {tuple(self.keys.shape)} "
                                 f"(size, dim), got {tuple(keys.shape)}")
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
