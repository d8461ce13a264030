"""MemoryBank: the non-parametric memory of instance discrimination (Wu, Xiong, Yu, Lin,
"Unsupervised Feature Learning via Non-Parametric Instance Discrimination", CVPR 2018): one
feature row per training image, updated with momentum by the images' dataset indices.

The official code (lemniscate.pytorch, NCEAverage / LinearAverage) updates in the loss's
backward with `memory.index_copy_(0, y, normalize(m * memory[y] + (1 - m) * x))`, where a
repeated index makes the CUDA result depend on which write lands last. MemoryBank.update is
an op of the C++/CUDA extension (torch.ops.fastssl.memory_bank_update_, csrc/): a scatter by
index with no host sync, any batch size, fp32 accumulation, fp16/bf16/fp32/fp64 rows, and
one stated rule for repeated indices: the last occurrence wins (below).
`memory_bank_update_ref` states the same update in PyTorch; it is the test oracle and the path
taken on a CUDA device the built extension has no image for (with a warning, once per device).

Across ranks the bank is replicated, not sharded: update(..., gather=True) all-gathers the
features and indices so every rank applies the same update to its own full copy. A full copy
is small (ImageNet's 1.28M images x 128 fp16 = 328 MB, `MemoryBank.bytes`), and it keeps the
reads local: sampling negatives (`sample`) and the full softmax over `memory` need no
collective. Sharding pays only once N x D x itemsize crowds out activations (hundreds of
millions of images, or D in the thousands); each rank would then hold N / W rows and the
negatives' rows would have to be fetched from their owners every step.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastssl import _ext
from fastssl.distributed import all_gather_no_grad
from fastssl.queue import RowTable, kernel_runs_on
from fastssl.validation import check_bool, check_float_dtype, check_int, check_number, check_tensor

_ext.load()

_INDEX_DTYPES = (torch.int64, torch.int32)
_INIT_CHUNK = 1 << 22  # elements drawn per step of the initialisation (16 MB of fp32)


@torch.library.register_fake("fastssl::memory_bank_update_")
def _memory_bank_update_fake(memory, scratch, rejected, features, indices, momentum, normalize) -> None:
    # Mutates its inputs in place and returns nothing: lets torch.compile trace update().
    return None


def memory_bank_update_ref(
    memory: torch.Tensor, rejected: torch.Tensor, features: torch.Tensor, indices: torch.Tensor,
    momentum: float, normalize: bool,
) -> None:
    """MemoryBank.update in PyTorch, in place: memory [N, D], rejected [1] int64, features [n, D],
    indices [n] int64.

    For each distinct index i in `indices`, with r the LAST row whose index is i,

        memory[i] <- normalize(momentum * memory[i] + (1 - momentum) * features[r])

    (normalize = F.normalize, x / max(||x||_2, 1e-12), skipped when `normalize` is False), in fp32
    (fp64 when memory or features are fp64), cast to memory's dtype through fp32. Earlier rows with
    the same index are ignored. A batch holding any index outside [0, N) changes no row and adds 1
    to `rejected`. No host sync: every occurrence of i writes the winner's value, so index_copy_'s
    order among duplicates cannot matter."""
    size, n = memory.shape[0], indices.shape[0]
    valid = ((indices >= 0) & (indices < size)).all()
    safe = indices.clamp(0, size - 1)
    last = torch.full((size,), -1, dtype=torch.int64, device=memory.device)
    last.scatter_reduce_(0, safe, torch.arange(n, device=memory.device), reduce="amax")
    winner = last[safe]
    acc = torch.promote_types(torch.promote_types(memory.dtype, features.dtype), torch.float32)
    old = memory[safe]
    rows = old.to(acc) * momentum + features[winner].to(acc) * (1.0 - momentum)
    if normalize:
        rows = nn.functional.normalize(rows, dim=1)
    if memory.dtype in (torch.float16, torch.bfloat16):
        rows = rows.to(torch.float32)
    memory.index_copy_(0, safe, torch.where(valid, rows.to(memory.dtype), old))
    rejected.add_(~valid)


class MemoryBank(RowTable):
    """`size` feature rows of `dim` features, one per training image (instance discrimination's
    memory bank), replicated on every rank.

    Buffers: `memory` [size, dim] in `dtype` (saved by state_dict as "memory", the official
    NCEAverage buffer's name and layout, so its tensor loads as is), and `rejected` [1] int64, the
    number of updates refused for an out-of-range index (not saved). dtype=None stores bfloat16
    when `device` is CUDA (what bf16 autocast gives the features) and float32 elsewhere, decided
    here.

    Initial rows are uniform in [-stdv, stdv] with stdv = 1 / sqrt(dim / 3), as the official
    NCEAverage draws them (each row's expected squared norm is then 1), L2-normalized when
    `normalize`. They are drawn on the CPU from a generator seeded with `seed`, so every rank and
    every device type starts from the same rows with no collective.

    update(features, indices) moves row indices[j] toward features[j] with `momentum` (the
    official default 0.5) and re-normalizes it when `normalize`; for an index repeated in one
    update, the last occurrence wins (in a gathered update: the last in rank order).
    """

    ROWS = "memory"
    memory: torch.Tensor
    rejected: torch.Tensor

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        momentum: float = 0.5,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        size = check_int("size", size, low=1)
        dim = check_int("dim", dim, low=1)
        self.momentum = check_number("momentum", momentum, low=0, high=1)
        self.normalize = check_bool("normalize", normalize)
        seed = check_int("seed", seed, low=0)
        device = torch.get_default_device() if device is None else torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        check_float_dtype("dtype", dtype)
        self.register_buffer("memory", torch.empty(size, dim, dtype=dtype, device=device))
        self.register_buffer("rejected", torch.zeros(1, dtype=torch.int64, device=device), persistent=False)
        # The update's claims (one int32 per row, zero between updates) and its rejection flag.
        self.register_buffer("_scratch", torch.zeros(size + 1, dtype=torch.int32, device=device),
                             persistent=False)
        self._initialise(seed)

    def _initialise(self, seed: int) -> None:
        generator = torch.Generator().manual_seed(seed)
        draw_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        stdv = 1.0 / math.sqrt(self.dim / 3)
        step = max(1, _INIT_CHUNK // self.dim)
        for start in range(0, self.size, step):
            rows = torch.rand(min(step, self.size - start), self.dim, generator=generator, dtype=draw_dtype)
            rows = rows * (2 * stdv) - stdv
            if self.normalize:
                rows = nn.functional.normalize(rows, dim=1)
            self.memory[start:start + rows.shape[0]] = rows.to(self.dtype)

    @staticmethod
    def bytes(size: int, dim: int, dtype: torch.dtype) -> int:
        """Device bytes one replica of a bank holds: the rows (size * dim * itemsize) plus the
        update's scratch ((size + 1) int32) and counter (one int64). ImageNet-1k, 1,281,167 x 128
        in float16: 327,978,752 + 5,124,672 + 8 bytes (333 MB)."""
        size = check_int("size", size, low=1)
        dim = check_int("dim", dim, low=1)
        check_float_dtype("dtype", dtype)
        return size * dim * dtype.itemsize + (size + 1) * 4 + 8

    def extra_repr(self) -> str:
        return (f"size={self.size}, dim={self.dim}, dtype={self.dtype}, momentum={self.momentum}, "
                f"normalize={self.normalize}")

    @torch.no_grad()
    def update(self, features: torch.Tensor, indices: torch.Tensor, *, momentum: float | None = None,
               gather: bool = False) -> None:
        """memory[indices[j]] <- normalize(m * memory[indices[j]] + (1 - m) * features[j]) for
        features [n, dim] (any floating dtype) and indices [n] (int64 or int32), both on the bank's
        device; m is `momentum` (a per-step value from a schedule) or the bank's.

        A repeated index takes its last occurrence's row only: deterministic, and cheap on a GPU
        (an integer atomicMax claims each row for its last occurrence, then one warp writes it: no
        float atomics, no write race; averaging the occurrences would need either). gather=True
        first all-gathers features and indices from every rank (rank-major, like KeyQueue.push), so
        every replica applies the same update; every rank must then pass the same n. No
        device-to-host sync on CUDA.

        Indices outside [0, size) refuse the whole batch, before any row changes: on CPU tensors
        with a ValueError; on CUDA, where checking would cost a host sync per step, the kernel
        refuses it on the device and counts it in `rejected` (read it at log time), as it does
        under torch.compile on any device."""
        features = self._incoming("features", features)
        check_tensor("indices", indices, ndim=1, dtypes=_INDEX_DTYPES, device=self.memory.device,
                     like="the MemoryBank")
        if indices.shape[0] != features.shape[0]:
            raise ValueError(f"indices must have one entry per feature row ({features.shape[0]}), got "
                             f"shape {tuple(indices.shape)}")
        momentum = self.momentum if momentum is None else check_number("momentum", momentum, low=0, high=1)
        check_bool("gather", gather)
        indices = indices.to(torch.int64)
        if gather:
            features, indices = all_gather_no_grad(features), all_gather_no_grad(indices)
        # After the gather, so that every rank agrees. Under torch.compile the op refuses instead.
        if indices.device.type == "cpu" and not torch.compiler.is_compiling():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= self.size:
                raise ValueError(f"indices must lie in [0, {self.size}) (the bank's size), got values from "
                                 f"{low} to {high}; pass dataset indices of the images")
        if not kernel_runs_on(self.memory.device):
            memory_bank_update_ref(self.memory, self.rejected, features, indices, momentum, self.normalize)
            return
        torch.ops.fastssl.memory_bank_update_(
            self.memory, self._scratch, self.rejected, features.contiguous(), indices.contiguous(), momentum,
            self.normalize,
        )

    @torch.no_grad()
    def sample(self, shape: int | tuple[int, ...], *,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Indices drawn uniformly with replacement from [0, size), int64 of `shape` (e.g. (B, K):
        K negatives per example, the paper's NCE form), and their rows [*shape, dim] (a copy, in
        the bank's dtype). `generator` (on the bank's device) or the device's default generator;
        like the official sampler, an example's own index is not excluded (probability K / size).
        No host sync."""
        shape = (shape,) if isinstance(shape, int) and not isinstance(shape, bool) else tuple(shape)
        for axis, extent in enumerate(shape):
            check_int(f"shape[{axis}]", extent, low=1)
        if generator is not None and generator.device.type != self.memory.device.type:
            raise ValueError(f"generator must be on the bank's device type ({self.memory.device.type}), "
                             f"got one on {generator.device}")
        indices = torch.randint(self.size, shape, device=self.memory.device, generator=generator)
        return indices, self.memory.index_select(0, indices.reshape(-1)).view(*shape, self.dim)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        self._check_saved_rows(state_dict, prefix)  # a rejected load changes nothing
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
