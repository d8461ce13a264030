"""Fused InfoNCE: the MoCo v2 (query vs positive key + queue) and MoCo v3 / SimCLR
(query vs all keys) contrastive loss, flash-attention style.

Math (He et al. 2020, MoCo; Chen et al. 2020/2021, MoCo v2/v3). With qn, kn the
L2-normalized rows (when normalize=True) and T the temperature:

* queue form:   l_i = [qn_i·kn_i, qn_i·queue_1, …, qn_i·queue_K] / T, target 0
* in-batch:     l_i = [qn_i·kn_1, …, qn_i·kn_M] / T,            target i + label_offset
* NT-Xent (SimCLR, exclude_self): queries = two views stacked [a; b] (N = 2B), found among the
  keys at rows label_offset…; l_i leaves out the own column i + label_offset (2N−1 candidates
  when keys = queries) and its target is the other view's column, i ± B + label_offset
* loss_i = lse(l_i) − l_i[target] = −log softmax(l_i)[target]

The kernels never build an N×K logits tile outside registers/shared memory:

1. ``_info_nce_fwd_kernel``: grid (query blocks, column splits). Each program streams
   BLOCK_M rows of the queue (or of the keys) through ``tl.dot`` with an online
   log-sum-exp (base 2, one exp2 per logit) and, when the query needs a gradient,
   accumulates Σ_j p_ij x̂_j with the rescaled flash-attention update (V = the
   streamed rows). Splitting the columns fills the GPU when N is small
   (N=256 is two query blocks); each split writes (max, sum, acc) partials, O(S·N·D).
2. ``_info_nce_combine_kernel``: merges the splits, adds the queue form's positive
   column, writes loss and lse2 [N] (base-2 log-sum-exp) and the gradient directions
   dq_i = ∂loss_i/∂q_i = (Σ_j p_ij x̂_j − k̂_pos(i)) / T pulled back through the
   normalization, and for the queue form dk_i = (p_i0 − 1)·q̂_i / T likewise. The
   backward of both forms then only multiplies these [N, D] rows by the incoming
   per-row gradient: dq costs no recomputation in either form.
3. In-batch key gradient (``_info_nce_bwd_kernel``): grid (key blocks, query splits),
   recomputes logits tiles kᵀq from lse2 and accumulates dk̂_j = Σ_i g_i p_ij q̂_i / T
   into per-split partials (no atomics, so results are deterministic);
   ``_info_nce_bwd_combine_kernel`` sums them, subtracts the target term
   g_i q̂_i / T for j = i + label_offset and applies the normalization backward.

Matmul-equivalents (2·N·K·D flops each): queue form 2 (logits, p·queue), in-batch with
key gradient 4 (forward 2, backward 2), each +1 per extra D chunk where the logits are recomputed.
Extra memory: O((N+M)·D), plus where D is chunked the kept-p workspace, at most 48 MiB for any N and K.

Normalization: row norms are one fp32 read pass over query/key (`_row_norms`); the
kernels scale logits by 1/‖q‖·1/‖k‖ after the dot (so bf16 inputs feed the tensor cores
unchanged and no normalized copy is written) and apply d(x/‖x‖) =
(I − x̂x̂ᵀ)/‖x‖ in their epilogues. ‖x‖ is clamped at 1e-12 like F.normalize.

Precision: fp32 accumulation everywhere; bf16/fp16 tiles go to the tensor cores, and
the probabilities multiplying the streamed rows are rounded to the input dtype for
that dot (as flash attention does). fp32 inputs use input_precision="tf32x3" (three
tf32 products, close to fp32 accuracy on tensor cores) so the kernel stays within the
tolerance of a plain fp32 reference; plain tf32 would err by ~1e-3 relative in the
logits, i.e. ~0.1 absolute at T=0.01.

Registers: a 16-bit query tile of up to 128 columns stays in registers; wider rows (and every
fp32 row, whose tf32x3 operand splits double their registers) are reduced over D in chunks,
and the accumulator (Σ p x̂ in the forward, the key gradient) is made in column chunks
(128 wide, fp32 64) so registers and shared memory stay bounded for any D (checked without
spills for sm_80/89/90/100 by tests/ops/compile_gate.py). One program makes every chunk in
turn (KEEP_P): a first pass computes each logits tile once and keeps its p, in the input's
dtype as the dot takes it (and the forward's rescale α), in a workspace of outer x streamed
rows; each chunk's pass replays them, bit for bit the p it would recompute, so the logits
cost one matmul whatever D. The workspace is bounded (_KEEP_P_BYTES, 48 MiB, about an H100's
L2): a problem whose p is larger runs band after band through one workspace (bands of key rows
in the key gradient, of whole column splits of the streamed rows in the forward), so memory is
flat in N, K and the number of ranks. Where a band holds too few programs to fill the device
for keeping p to pay (or not one tile's p fits), each chunk is a program of its own that
recomputes the logits. A key gradient made in one split of the queries with
normalize=False (CLIP's) is finished in its kernel (DIRECT): no fp32 partials, no combine.

At D=128 the exponentials are a co-limit with the matmuls on an H100; overlapping them
is left to Triton's software pipelining (num_stages) across the streamed tiles.

The kernels and their traffic formulas are in _info_nce_kernels.py, their launchers
(`info_nce_fwd`, `info_nce_bwd`) in _info_nce_launchers.py.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from fastssl.ops.backend import HAS_TRITON, check_interpreter_dot, resolve_backend
from fastssl.validation import (
    FLOAT_DTYPES,
    check_bool,
    check_choice,
    check_int,
    check_positive,
    check_same_dtype,
    check_tensor,
)

if HAS_TRITON:  # without triton only the reference runs (resolve_backend refuses "triton")
    from fastssl.ops._info_nce_launchers import info_nce_bwd, info_nce_fwd

_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastssl::info_nce_fwd", mutates_args=())
def _fwd_op(
    # typing.Optional: the spelling every torch version's schema inference knows.
    query: torch.Tensor, key: torch.Tensor, queue: Optional[torch.Tensor], temperature: float,  # noqa: UP045
    normalize: bool, label_offset: int, compute_dq: bool, compute_dk: bool, exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return info_nce_fwd(query, key, queue, temperature=temperature, normalize=normalize, label_offset=label_offset,
                        compute_dq=compute_dq, compute_dk=compute_dk, exclude_self=exclude_self)


@_fwd_op.register_fake
def _(query, key, queue, temperature, normalize, label_offset, compute_dq, compute_dk, exclude_self):
    N, D = query.shape
    f32 = {"dtype": torch.float32}
    dq_shape = (N, D) if compute_dq else (0,)
    dk_shape = (N, D) if (compute_dk and queue is not None) else (0,)
    return (query.new_empty(N, **f32), query.new_empty(N, **f32), query.new_empty(dq_shape, **f32),
            query.new_empty(dk_shape, **f32))


@torch.library.custom_op("fastssl::info_nce_bwd", mutates_args=())
def _bwd_op(
    query: torch.Tensor, key: torch.Tensor, lse2: torch.Tensor, grad: torch.Tensor, temperature: float,
    normalize: bool, label_offset: int, exclude_self: bool,
) -> torch.Tensor:
    return info_nce_bwd(query, key, lse2, grad, temperature=temperature, normalize=normalize,
                        label_offset=label_offset, exclude_self=exclude_self)


@_bwd_op.register_fake
def _(query, key, lse2, grad, temperature, normalize, label_offset, exclude_self):
    return key.new_empty(key.shape)  # contiguous, like the launcher's


def _setup_context(ctx, inputs, output):
    query, key, queue, temperature, normalize, label_offset, compute_dq, compute_dk, exclude_self = inputs
    _, lse2, dq_dir, dk_dir = output
    ctx.save_for_backward(query, key, lse2, dq_dir, dk_dir)
    ctx.has_queue = queue is not None
    ctx.temperature, ctx.normalize, ctx.label_offset = temperature, normalize, label_offset
    ctx.exclude_self = exclude_self
    ctx.compute_dq, ctx.compute_dk = compute_dq, compute_dk


def _backward(ctx, grad_loss, grad_lse2, grad_dq_dir, grad_dk_dir):
    # lse2 and the direction outputs are internal (the public function returns only the loss),
    # so their incoming gradients are ignored.
    query, key, lse2, dq_dir, dk_dir = ctx.saved_tensors
    g = grad_loss.to(torch.float32)
    dq = dk = None
    if ctx.needs_input_grad[0]:
        if not ctx.compute_dq:
            raise RuntimeError("fastssl::info_nce_fwd was called with compute_dq=False; query has no gradient")
        dq = (g[:, None] * dq_dir).to(query.dtype)
    if ctx.needs_input_grad[1]:
        if ctx.has_queue:
            if not ctx.compute_dk:
                raise RuntimeError("fastssl::info_nce_fwd was called with compute_dk=False; key has no gradient")
            dk = (g[:, None] * dk_dir).to(key.dtype)
        else:
            dk = _bwd_op(query, key, lse2, g, temperature=ctx.temperature, normalize=ctx.normalize,
                         label_offset=ctx.label_offset, exclude_self=ctx.exclude_self)
    return dq, dk, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference and public API


def info_nce_ref(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None, *, temperature: float = 0.2,
    normalize: bool = True, label_offset: int = 0, exclude_self: bool = False, reduction: str = "mean",
) -> torch.Tensor:
    """The official formulas in plain PyTorch (MoCo v2 with a queue, MoCo v3 without, SimCLR's
    NT-Xent with exclude_self); materializes the [N, K+1] / [N, M] logits. Same arguments as `info_nce`."""
    if normalize:
        query, key = F.normalize(query, dim=1), F.normalize(key, dim=1)
    if queue is None:
        logits = query @ key.T / temperature
        rows = torch.arange(query.shape[0], device=query.device)
        labels = rows + label_offset
        if exclude_self:
            logits = logits.index_put((rows, labels), logits.new_tensor(float("-inf")))
            labels = (rows + query.shape[0] // 2) % query.shape[0] + label_offset
    else:
        l_pos = (query * key).sum(1, keepdim=True)
        # A queue of another dtype (e.g. fp32 beside bf16 queries) meets the queries in the
        # promoted dtype (under autocast, matmul's own cast applies).
        dtype = torch.promote_types(query.dtype, queue.dtype)
        l_neg = query.to(dtype) @ queue.detach().to(dtype).T
        logits = torch.cat([l_pos, l_neg], dim=1) / temperature
        labels = torch.zeros(query.shape[0], dtype=torch.long, device=query.device)
    return F.cross_entropy(logits, labels, reduction=reduction)


def info_nce(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None = None, *, temperature: float = 0.2,
    normalize: bool = True, label_offset: int = 0, exclude_self: bool = False, reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """InfoNCE / NT-Xent loss without materializing the logits (on the Triton backend).

    query [N, D]; key [M, D] (query's dtype); queue [K, D] or None, any float dtype (the kernel
    converts its rows to query's dtype on load; the reference promotes); all on one device.
    Rows may be strided views (slices, transposes): the kernels take both strides, no copy.
    float64 runs the reference on backend="auto" (Triton has no fp64 tensor-core path) and is
    refused by backend="triton".

    * queue given (MoCo v2): M == N; row i's logits are [q_i·k_i, q_i·queue_1, …, q_i·queue_K] / T,
      target 0. The queue is used as given (not normalized) and gets no gradient.
    * queue None (MoCo v3 / SimCLR): logits = q @ kᵀ / T [N, M], row i's target is column
      i + label_offset (label_offset = rank·N when keys were gathered from all ranks).
    * exclude_self=True (SimCLR's NT-Xent, in-batch form): query = the two views stacked [a; b]
      (N even), whose rows are also keys label_offset … label_offset + N − 1 (key = query on one
      rank; the ranks' stacked views gathered rank-major, label_offset = rank·N, on several).
      Row i leaves out its own column i + label_offset and targets its other view's,
      (i + N/2) mod N + label_offset.

    normalize=True L2-normalizes query and key rows first (F.normalize, fused).
    reduction: "mean" | "sum" (scalar) or "none" ([N]); the result has the input dtype.
    backend: "auto" (Triton on CUDA, else `info_nce_ref`), "triton", "torch".
    """
    check_tensor("query", query, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor("key", key, ndim=2, dtypes=FLOAT_DTYPES, device=query.device, like="query")
    N, D = query.shape
    M = key.shape[0]
    if key.shape[1] != D:
        raise ValueError(f"key must have D={D} columns like query, got shape {tuple(key.shape)}")
    if queue is not None:
        check_tensor("queue", queue, ndim=2, dtypes=FLOAT_DTYPES, device=query.device, like="query")
        if queue.shape[1] != D:
            raise ValueError(f"queue must have D={D} columns like query, got shape {tuple(queue.shape)}")
        if M != N:
            raise ValueError(f"with a queue, key must have one row per query (M == N == {N}), got M={M}")
    check_same_dtype(("query", "key"), (query, key))
    temperature = check_positive("temperature", temperature)
    check_bool("normalize", normalize)
    label_offset = check_int("label_offset", label_offset)
    check_bool("exclude_self", exclude_self)
    if exclude_self and (queue is not None or N % 2):
        raise ValueError(f"exclude_self=True needs the in-batch form (queue=None) and the two views stacked "
                         f"(an even N), got N={N} and a queue={queue is not None}")
    if queue is not None and label_offset != 0:
        raise ValueError(f"label_offset applies to the in-batch form (queue=None); with a queue the target "
                         f"is always column 0, got label_offset={label_offset}")
    if label_offset < 0 or label_offset + N > M:
        raise ValueError(f"label_offset must satisfy 0 <= label_offset and label_offset + N <= M "
                         f"(N={N}, M={M}), got label_offset={label_offset}")
    check_choice("reduction", reduction, _REDUCTIONS)
    tensors = (query, key) if queue is None else (query, key, queue)
    resolved = resolve_backend(backend, *tensors)
    if resolved == "triton" and any(t.dtype not in _KERNEL_DTYPES for t in tensors):
        if backend != "auto":
            got = ", ".join(f"{n}={t.dtype}" for n, t in zip(("query", "key", "queue"), tensors))
            raise TypeError(f"info_nce: backend='triton' takes float32, float16 or bfloat16 tensors, got {got}; "
                            f"backend='auto' or 'torch' runs the reference in float64")
        resolved = "torch"  # float64 (e.g. gradcheck): the reference, which computes in it
    if resolved == "triton":
        check_interpreter_dot("info_nce", *tensors)
    if resolved == "torch":
        return info_nce_ref(query, key, queue, temperature=temperature, normalize=normalize,
                            label_offset=label_offset, exclude_self=exclude_self, reduction=reduction)
    grad = torch.is_grad_enabled()
    loss, _, _, _ = _fwd_op(query, key, queue, temperature=temperature, normalize=normalize,
                            label_offset=label_offset, compute_dq=grad and query.requires_grad,
                            compute_dk=grad and key.requires_grad, exclude_self=exclude_self)
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(query.dtype)
