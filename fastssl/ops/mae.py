"""MAE token ops: random masking, decoder unshuffle with mask tokens, the masked pixel loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021). The official code
(`random_masking`, `forward_decoder`, `forward_loss` in facebookresearch/mae) does two
argsorts, gathers through an N×L×D int64 index built with `repeat`, concatenates mask tokens
and runs the loss as 6+ passes. Here:

* the permutation comes from one sort of random keys; `ids_restore` is its inverse by a scatter;
* `_compact_kernel` copies kept rows x[n, l] -> x_kept[n, ids_restore[n, l]] (and writes the
  mask, or sums the removed rows for the mask-token gradient), indexing rows directly;
* `_expand_kernel` rebuilds the full sequence: kept rows from x_kept, the mask token elsewhere;
  the same kernel with a zero token is the masking backward;
* `_mae_loss_kernel` is the per-patch-normalized MSE in one pass over pred/target, and with
  BACKWARD=True the gradient to pred in one pass.

Layout: x [N, L, D] (tokens of one sample contiguous), ids [N, L] int64, mask [N, L] with
0 = kept, 1 = removed, in the original token order (as in the official code).
"""

from __future__ import annotations

import math

import torch

from fastssl.ops._dispatch import HAS_TRITON, check_tensor, resolve_backend

if HAS_TRITON:
    import triton
    import triton.language as tl
else:  # the "torch" backend still works; resolve_backend refuses "triton"
    triton = None

__all__ = [
    "random_masking",
    "random_masking_ref",
    "unshuffle_tokens",
    "unshuffle_tokens_ref",
    "mae_loss",
    "mae_loss_ref",
    "patchify",
    "unpatchify",
]

NORM_PIX_EPS = 1e-6  # the official forward_loss: (var + 1e-6) ** 0.5
MAX_PATCH_DIM = 16384  # the loss kernel keeps one patch row in registers


# ---------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------

if HAS_TRITON:

    # L, K, R are not specialized (each new sequence length would compile again); D and P are,
    # since their divisibility by 16 lets Triton vectorize the row accesses.
    @triton.jit(do_not_specialize=["L", "K"])
    def _compact_kernel(
        src_ptr, pos_ptr, ids_restore_ptr, dst_ptr, mask_ptr, rest_ptr, L, K, D,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
        HAS_POS: tl.constexpr, WRITE_MASK: tl.constexpr, SUM_REST: tl.constexpr, IS_FP64: tl.constexpr,
    ):
        """dst[n, j] = src[n, l] (+ pos[l]) where j = ids_restore[n, l] < K; program (n, column block).

        ids_restore is a permutation per row, so each kept row is written exactly once (no
        atomics). HAS_POS: add the positional embedding to kept rows only (saves the full-size
        x + pos pass). WRITE_MASK: mask[n, l] = 0 if kept else 1 (masking forward). SUM_REST:
        rest[n, :] = sum of the removed rows (the mask-token gradient, unshuffle backward)."""
        n = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        if SUM_REST:
            rest = tl.zeros([BLOCK_D], dtype=tl.float64 if IS_FP64 else tl.float32)
        for t0 in range(0, L, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < L
            j = tl.load(ids_restore_ptr + n * L + rows, mask=row_ok, other=-1)
            # out-of-range ids are treated as removed, so bad ids can never address memory
            kept = row_ok & (j >= 0) & (j < K)
            if WRITE_MASK:
                tl.store(mask_ptr + n * L + rows, tl.where(kept, 0.0, 1.0).to(mask_ptr.dtype.element_ty),
                         mask=row_ok & (pid_d == 0))
            src_offs = (n * L + rows)[:, None] * D + cols[None, :]
            if SUM_REST:
                vals = tl.load(src_ptr + src_offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
                removed = row_ok & ~kept
                rest += tl.sum(tl.where(removed[:, None], vals.to(rest.dtype), 0.0), axis=0)
            else:  # only kept rows are read: the masking forward moves 25% of x, not all of it
                vals = tl.load(src_ptr + src_offs, mask=kept[:, None] & col_ok[None, :], other=0.0)
            if HAS_POS:
                # x + pos in fp32 and one rounding: the same value as torch's add in x's dtype
                pos = tl.load(pos_ptr + rows[:, None] * D + cols[None, :], mask=kept[:, None] & col_ok[None, :],
                              other=0.0)
                acc = tl.float64 if IS_FP64 else tl.float32
                vals = (vals.to(acc) + pos.to(acc)).to(dst_ptr.dtype.element_ty)
            dst_offs = (n * K + j)[:, None] * D + cols[None, :]
            tl.store(dst_ptr + dst_offs, vals, mask=kept[:, None] & col_ok[None, :])
        if SUM_REST:
            tl.store(rest_ptr + n * D + cols, rest, mask=col_ok)

    @triton.jit(do_not_specialize=["L", "K"])
    def _expand_kernel(
        src_ptr, ids_restore_ptr, fill_ptr, out_ptr, L, K, D,
        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        """out[n, l] = src[n, j] if j = ids_restore[n, l] < K else fill; program (n, column block)."""
        n = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0)
        for t0 in range(0, L, BLOCK_T):
            rows = t0 + tl.arange(0, BLOCK_T)
            row_ok = rows < L
            j = tl.load(ids_restore_ptr + n * L + rows, mask=row_ok, other=-1)
            kept = row_ok & (j >= 0) & (j < K)
            vals = tl.load(src_ptr + (n * K + j)[:, None] * D + cols[None, :],
                           mask=kept[:, None] & col_ok[None, :], other=0.0)
            vals = tl.where(kept[:, None], vals, fill[None, :])
            tl.store(out_ptr + (n * L + rows)[:, None] * D + cols[None, :], vals,
                     mask=row_ok[:, None] & col_ok[None, :])

    @triton.jit(do_not_specialize=["R"])
    def _mae_loss_kernel(
        pred_ptr, target_ptr, mask_ptr, scale_ptr, dpred_ptr, num_ptr, den_ptr, R, P, eps,
        BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
        NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr, IS_FP64: tl.constexpr,
    ):
        """BLOCK_R patch rows per program, each whole in registers, so pred/target are read once.

        Forward: num[pid] = sum_r mask_r * mean_p (pred - t)^2, den[pid] = sum_r mask_r, where
        t = (target - mean) / sqrt(var_unbiased + eps) with NORM_PIX, else target.
        Backward: dpred = scale * mask_r * 2 (pred - t) / P with scale = dloss / sum(mask)."""
        acc = tl.float64 if IS_FP64 else tl.float32
        pid = tl.program_id(0)
        rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.arange(0, BLOCK_P)
        row_ok = rows < R
        ok = row_ok[:, None] & (cols < P)[None, :]
        offs = rows[:, None] * P + cols[None, :]
        t = tl.load(target_ptr + offs, mask=ok, other=0.0).to(acc)
        if NORM_PIX:
            mean = tl.sum(t, axis=1) / P
            centered = tl.where(ok, t - mean[:, None], 0.0)
            var = tl.sum(centered * centered, axis=1) / (P - 1)
            t = centered / tl.sqrt(var + eps)[:, None]
        pred = tl.load(pred_ptr + offs, mask=ok, other=0.0).to(acc)
        diff = tl.where(ok, pred - t, 0.0)
        m = tl.load(mask_ptr + rows, mask=row_ok, other=0.0).to(acc)
        if BACKWARD:
            scale = tl.load(scale_ptr).to(acc)
            grad = diff * (2.0 * scale * m / P)[:, None]
            tl.store(dpred_ptr + offs, grad.to(dpred_ptr.dtype.element_ty), mask=ok)
        else:
            # m * loss, not a select: NaN in a kept patch still gives NaN (as the official code)
            loss = tl.sum(diff * diff, axis=1) / P
            tl.store(num_ptr + pid, tl.sum(loss * m, axis=0))
            tl.store(den_ptr + pid, tl.sum(m, axis=0))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _row_blocks(D: int) -> tuple[int, int]:
    """Tile [BLOCK_T tokens, BLOCK_D columns]: ~8K elements so a program moves 16-32 KB per step."""
    block_d = min(256, max(16, triton.next_power_of_2(D)))
    return max(1, min(64, 8192 // block_d)), block_d


def gather_kept_fwd(x: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                    pos_embed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, L, D] (+ pos_embed [L, D] in x's dtype) -> (x_kept [N, len_keep, D], mask [N, L] in x's
    dtype) by `_compact_kernel`."""
    x, ids_restore = x.contiguous(), ids_restore.contiguous()
    pos = x if pos_embed is None else pos_embed.contiguous()
    N, L, D = x.shape
    x_kept = x.new_empty(N, len_keep, D)
    mask = x.new_empty(N, L)
    block_t, block_d = _row_blocks(D)
    _compact_kernel[(N, triton.cdiv(D, block_d))](
        x, pos, ids_restore, x_kept, mask, x, L, len_keep, D, BLOCK_T=block_t, BLOCK_D=block_d,
        HAS_POS=pos_embed is not None, WRITE_MASK=True, SUM_REST=False, IS_FP64=x.dtype == torch.float64,
    )
    return x_kept, mask


def unshuffle_fwd(x_kept: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor) -> torch.Tensor:
    """x_kept [N, K, D], ids_restore [N, L], fill [D] -> [N, L, D] by `_expand_kernel`."""
    x_kept, ids_restore, fill = x_kept.contiguous(), ids_restore.contiguous(), fill.contiguous()
    N, K, D = x_kept.shape
    L = ids_restore.shape[1]
    out = x_kept.new_empty(N, L, D)
    block_t, block_d = _row_blocks(D)
    _expand_kernel[(N, triton.cdiv(D, block_d))](
        x_kept, ids_restore, fill, out, L, K, D, BLOCK_T=block_t, BLOCK_D=block_d,
    )
    return out


def unshuffle_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [N, L, D] -> (grad_x_kept [N, K, D], grad_fill [D]) by `_compact_kernel`.

    grad_fill is summed per sample in the kernel (fp32) and over samples here: deterministic."""
    grad_out, ids_restore = grad_out.contiguous(), ids_restore.contiguous()
    N, L, D = grad_out.shape
    is_fp64 = grad_out.dtype == torch.float64
    grad_x_kept = grad_out.new_empty(N, len_keep, D)
    rest = torch.empty(N, D, device=grad_out.device, dtype=torch.float64 if is_fp64 else torch.float32)
    block_t, block_d = _row_blocks(D)
    _compact_kernel[(N, triton.cdiv(D, block_d))](
        grad_out, grad_out, ids_restore, grad_x_kept, grad_out, rest, L, len_keep, D, BLOCK_T=block_t, BLOCK_D=block_d,
        HAS_POS=False, WRITE_MASK=False, SUM_REST=True, IS_FP64=is_fp64,
    )
    return grad_x_kept, rest.sum(0).to(grad_out.dtype)


def _loss_blocks(P: int) -> tuple[int, int, int]:
    block_p = triton.next_power_of_2(P)
    return max(1, min(16, 4096 // block_p)), block_p, 8 if block_p >= 4096 else 4


def mae_loss_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pred, target [N, L, P], mask [N, L] -> (loss [], sum(mask) [] fp32/fp64) in one pass."""
    pred, target, mask = pred.contiguous(), target.contiguous(), mask.contiguous()
    N, L, P = pred.shape
    R = N * L
    is_fp64 = torch.float64 in (pred.dtype, target.dtype)
    acc = torch.float64 if is_fp64 else torch.float32
    block_r, block_p, warps = _loss_blocks(P)
    grid = triton.cdiv(R, block_r)
    num = torch.empty(grid, device=pred.device, dtype=acc)
    den = torch.empty(grid, device=pred.device, dtype=acc)
    _mae_loss_kernel[(grid,)](
        pred, target, mask, num, pred, num, den, R, P, NORM_PIX_EPS,
        BLOCK_R=block_r, BLOCK_P=block_p, NORM_PIX=norm_pix_loss, BACKWARD=False, IS_FP64=is_fp64,
        num_warps=warps,
    )
    mask_sum = den.sum()
    return (num.sum() / mask_sum).to(torch.promote_types(pred.dtype, target.dtype)), mask_sum


def mae_loss_bwd(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 mask_sum: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    """d loss / d pred [N, L, P] in pred's dtype, recomputing the normalized target (one pass)."""
    pred, target, mask = pred.contiguous(), target.contiguous(), mask.contiguous()
    N, L, P = pred.shape
    R = N * L
    is_fp64 = torch.float64 in (pred.dtype, target.dtype)
    # a device scalar, not .item(): no host sync in the backward
    scale = (grad_loss.to(mask_sum.dtype) / mask_sum).reshape(1)
    dpred = torch.empty_like(pred)
    block_r, block_p, warps = _loss_blocks(P)
    _mae_loss_kernel[(triton.cdiv(R, block_r),)](
        pred, target, mask, scale, dpred, scale, scale, R, P, NORM_PIX_EPS,
        BLOCK_R=block_r, BLOCK_P=block_p, NORM_PIX=norm_pix_loss, BACKWARD=True, IS_FP64=is_fp64,
        num_warps=warps,
    )
    return dpred


# ---------------------------------------------------------------------------------------------
# Custom-op registration (torch.compile traces through these; opcheck runs on each in the tests)
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastssl::mae_gather_kept", mutates_args=())
def _gather_kept_op(x: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                    pos_embed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    return gather_kept_fwd(x, ids_restore, len_keep, pos_embed)


@_gather_kept_op.register_fake
def _(x, ids_restore, len_keep, pos_embed):
    N, L, D = x.shape
    return x.new_empty(N, len_keep, D), x.new_empty(N, L)


def _gather_kept_setup(ctx, inputs, output):
    _, ids_restore, _, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.mark_non_differentiable(output[1])


def _gather_kept_backward(ctx, grad_x_kept, grad_mask):
    (ids_restore,) = ctx.saved_tensors
    zero = grad_x_kept.new_zeros(grad_x_kept.shape[-1])
    return _unshuffle_op(grad_x_kept, ids_restore, zero), None, None, None


_gather_kept_op.register_autograd(_gather_kept_backward, setup_context=_gather_kept_setup)


@torch.library.custom_op("fastssl::mae_unshuffle", mutates_args=())
def _unshuffle_op(x_kept: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor) -> torch.Tensor:
    return unshuffle_fwd(x_kept, ids_restore, mask_token)


@_unshuffle_op.register_fake
def _(x_kept, ids_restore, mask_token):
    return x_kept.new_empty(x_kept.shape[0], ids_restore.shape[1], x_kept.shape[2])


def _unshuffle_setup(ctx, inputs, output):
    x_kept, ids_restore, _ = inputs
    ctx.save_for_backward(ids_restore)
    ctx.len_keep = x_kept.shape[1]


def _unshuffle_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    grad_x_kept, grad_token = _unshuffle_bwd_op(grad_out, ids_restore, ctx.len_keep)
    return grad_x_kept, None, grad_token


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


@torch.library.custom_op("fastssl::mae_unshuffle_bwd", mutates_args=())
def _unshuffle_bwd_op(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    return unshuffle_bwd(grad_out, ids_restore, len_keep)


@_unshuffle_bwd_op.register_fake
def _(grad_out, ids_restore, len_keep):
    N, _, D = grad_out.shape
    return grad_out.new_empty(N, len_keep, D), grad_out.new_empty(D)


@torch.library.custom_op("fastssl::mae_loss_fwd", mutates_args=())
def _mae_loss_fwd_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     norm_pix_loss: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return mae_loss_fwd(pred, target, mask, norm_pix_loss)


@_mae_loss_fwd_op.register_fake
def _(pred, target, mask, norm_pix_loss):
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return pred.new_empty((), dtype=torch.promote_types(pred.dtype, target.dtype)), pred.new_empty((), dtype=acc)


def _mae_loss_setup(ctx, inputs, output):
    pred, target, mask, norm_pix_loss = inputs
    ctx.save_for_backward(pred, target, mask, output[1])
    ctx.norm_pix_loss = norm_pix_loss
    ctx.mark_non_differentiable(output[1])


def _mae_loss_backward(ctx, grad_loss, grad_mask_sum):
    pred, target, mask, mask_sum = ctx.saved_tensors
    return _mae_loss_bwd_op(grad_loss, pred, target, mask, mask_sum, ctx.norm_pix_loss), None, None, None


_mae_loss_fwd_op.register_autograd(_mae_loss_backward, setup_context=_mae_loss_setup)


@torch.library.custom_op("fastssl::mae_loss_bwd", mutates_args=())
def _mae_loss_bwd_op(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     mask_sum: torch.Tensor, norm_pix_loss: bool) -> torch.Tensor:
    return mae_loss_bwd(grad_loss, pred, target, mask, mask_sum, norm_pix_loss)


@_mae_loss_bwd_op.register_fake
def _(grad_loss, pred, target, mask, mask_sum, norm_pix_loss):
    return torch.empty_like(pred)


# ---------------------------------------------------------------------------------------------
# References: the official code path (two argsorts, repeat-built gather index, cat, multi-pass loss)
# ---------------------------------------------------------------------------------------------


def random_masking_ref(x: torch.Tensor, len_keep: int, noise: torch.Tensor,
                       pos_embed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official `random_masking` given its noise [N, L] (stable argsort for ties), after the
    encoder's `x + pos_embed` when one is given."""
    N, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed.reshape(L, D).to(x.dtype)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def unshuffle_tokens_ref(x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
    """The official `forward_decoder` step (class token excluded): cat mask tokens, gather."""
    N, K, D = x_kept.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(x_kept.dtype).repeat(N, L - K, 1)
    x_ = torch.cat([x_kept, mask_tokens], dim=1)
    return torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))


def mae_loss_ref(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True) -> torch.Tensor:
    """The official `forward_loss` on patchified targets, in fp32 (fp64 stays fp64).

    Under autocast the official loss also runs in fp32: bf16 `pred` meets fp32 `target`."""
    out_dtype = torch.promote_types(pred.dtype, target.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    pred, target = pred.to(acc), target.to(acc)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(acc)
    return ((loss * mask).sum() / mask.sum()).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check_ids_restore(ids_restore: object, N: int, min_len: int, device: torch.device) -> torch.Tensor:
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=(torch.int64,), device=device, like="x_kept")
    if ids_restore.shape[0] != N or ids_restore.shape[1] < min_len:
        raise ValueError(
            f"ids_restore must be [N={N}, L] with L >= len_keep={min_len} (a permutation of range(L) per row), "
            f"got shape {tuple(ids_restore.shape)}"
        )
    return ids_restore


def random_masking(
    x: torch.Tensor,
    mask_ratio: float = 0.75,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    pos_embed: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking (He et al. 2021, `random_masking`).

    x [N, L, D]; len_keep = int(L * (1 - mask_ratio)). With `noise` [N, L]: ids_shuffle =
    argsort(noise) (stable), the first len_keep are kept - identical to the official function.
    Without: noise = torch.rand(N, L, device=x.device) from `generator` (or the default
    generator), the official draw, so the same seed gives the official code's mask (the two sorts
    differ only where two noise values tie, which the official unstable argsort leaves unspecified).

    pos_embed [L, D] or [1, L, D] (optional): the encoder's positional embedding, cast to x's
    dtype and added to the kept rows inside the gather, i.e. the result equals masking
    x + pos_embed without that full-size pass. A pos_embed that requires grad (a learned one)
    is added by torch before the gather instead, so its gradient is exact either way.

    Returns x_kept [N, len_keep, D] (x's rows in shuffle order), mask [N, L] in x's dtype
    (0 kept, 1 removed, original order) and ids_restore [N, L] int64 (the inverse permutation).
    Gradient flows to x (zero at removed tokens)."""
    check_tensor("x", x, ndim=3)
    N, L, D = x.shape
    if not isinstance(mask_ratio, (int, float)) or isinstance(mask_ratio, bool):
        raise TypeError(f"mask_ratio must be a number, got {type(mask_ratio).__name__}")
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    len_keep = int(L * (1 - mask_ratio))
    if len_keep == 0:
        raise ValueError(f"mask_ratio={mask_ratio} keeps int({L} * (1 - {mask_ratio})) = 0 of L={L} tokens; need >= 1")
    if noise is not None:
        if generator is not None:
            raise ValueError("give noise or generator, not both (noise already fixes the permutation)")
        check_tensor("noise", noise, ndim=2, device=x.device, like="x")
        if tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape [N, L] = {(N, L)} like x, got {tuple(noise.shape)}")
    elif generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator must be on x's device type {x.device.type}, got {generator.device}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=(2, 3), device=x.device, like="x")
        if pos_embed.shape[-2:] != (L, D) or pos_embed.numel() != L * D:
            raise ValueError(f"pos_embed must be [L, D] or [1, L, D] = {(L, D)} like x, got {tuple(pos_embed.shape)}")
    backend = resolve_backend(backend, x)

    if noise is None:
        noise = torch.rand(N, L, generator=generator, device=x.device)
    if backend == "torch":
        return random_masking_ref(x, len_keep, noise, pos_embed)
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(L, D).to(x.dtype)
        if torch.is_grad_enabled() and pos_embed.requires_grad:
            x, pos_embed = x + pos_embed, None
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    # the inverse permutation by a scatter, not the official second argsort
    positions = torch.arange(L, device=x.device).expand(N, L)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    x_kept, mask = _gather_kept_op(x, ids_restore, len_keep, pos_embed)
    return x_kept, mask, ids_restore


def unshuffle_tokens(
    x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, backend: str = "auto"
) -> torch.Tensor:
    """MAE decoder input (He et al. 2021, `forward_decoder`, class token kept outside).

    out[n, l] = x_kept[n, ids_restore[n, l]] if that index < len_keep else mask_token.
    x_kept [N, len_keep, D]; mask_token [D] or [1, 1, D] (cast to x_kept's dtype; its gradient
    is the sum over all masked positions, in its own dtype); ids_restore [N, L] int64, a
    permutation of range(L) per row (not verified: that would cost a host sync; out-of-range
    ids give mask tokens, never an out-of-bounds access). Returns [N, L, D] in x_kept's dtype."""
    check_tensor("x_kept", x_kept, ndim=3)
    N, K, D = x_kept.shape
    check_tensor("mask_token", mask_token, ndim=(1, 3), device=x_kept.device, like="x_kept")
    if mask_token.numel() != D or mask_token.shape[-1] != D:
        raise ValueError(f"mask_token must be [D] or [1, 1, D] with D={D} like x_kept, got {tuple(mask_token.shape)}")
    _check_ids_restore(ids_restore, N, K, x_kept.device)
    backend = resolve_backend(backend, x_kept, mask_token, ids_restore)
    if backend == "torch":
        return unshuffle_tokens_ref(x_kept, mask_token, ids_restore)
    return _unshuffle_op(x_kept, ids_restore, mask_token.reshape(D).to(x_kept.dtype))


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool = True, backend: str = "auto"
) -> torch.Tensor:
    """MAE masked pixel loss (He et al. 2021, `forward_loss`), fp32 math.

    pred, target [N, L, P] (target = patchify(imgs)); mask [N, L] (1 = removed = scored).
    With norm_pix_loss: target <- (target - mean_P) / sqrt(var_P(unbiased) + 1e-6) per patch.
    loss = sum(mask * mean_P (pred - target)^2) / sum(mask): a scalar in
    promote_types(pred, target) (NaN when sum(mask) == 0, as the official code).
    Gradient flows to pred only."""
    check_tensor("pred", pred, ndim=3)
    N, L, P = pred.shape
    check_tensor("target", target, ndim=3, device=pred.device, like="pred")
    if target.shape != pred.shape:
        raise ValueError(f"target must have pred's shape {tuple(pred.shape)}, got {tuple(target.shape)}")
    check_tensor("mask", mask, ndim=2, device=pred.device, like="pred")
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must have shape [N, L] = {(N, L)} like pred, got {tuple(mask.shape)}")
    if not isinstance(norm_pix_loss, bool):
        raise TypeError(f"norm_pix_loss must be a bool, got {type(norm_pix_loss).__name__}")
    if norm_pix_loss and P < 2:
        raise ValueError(f"norm_pix_loss needs P >= 2 values per patch for the unbiased variance, got P={P}")
    if torch.is_grad_enabled() and (target.requires_grad or mask.requires_grad):
        raise ValueError("mae_loss differentiates pred only; detach target and mask (they require grad)")
    backend = resolve_backend(backend, pred, target, mask)
    if backend == "torch":
        return mae_loss_ref(pred, target, mask, norm_pix_loss)
    if P > MAX_PATCH_DIM:
        raise ValueError(f"backend='triton' supports patch size P <= {MAX_PATCH_DIM}, got P={P}")
    return _mae_loss_fwd_op(pred, target, mask, norm_pix_loss)[0]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, (H/p)(W/p), p*p*C], the official layout ('nchpwq->nhwpqc')."""
    check_tensor("imgs", imgs, ndim=4, dtypes=None)
    N, C, H, W = imgs.shape
    if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
        raise ValueError(f"p must be a positive int, got {p!r}")
    if H % p or W % p:
        raise ValueError(f"imgs height and width must be multiples of p={p}, got {H}x{W}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """x [N, h*w, p*p*C] -> imgs [N, C, h*p, w*p], the inverse of `patchify`.

    grid = (h, w); the default is the official square grid h = w = sqrt(L)."""
    check_tensor("x", x, ndim=3, dtypes=None)
    N, L, P = x.shape
    if not isinstance(p, int) or isinstance(p, bool) or p <= 0:
        raise ValueError(f"p must be a positive int, got {p!r}")
    if P % (p * p):
        raise ValueError(f"x's last dim must be p*p*C with p={p}, got {P}")
    C = P // (p * p)
    if grid is None:
        h = w = math.isqrt(L)
        if h * w != L:
            raise ValueError(f"x has L={L} patches, not a square grid; pass grid=(h, w)")
    else:
        h, w = grid
        if h * w != L:
            raise ValueError(f"grid={grid} has {h * w} patches, x has L={L}")
    x = x.reshape(N, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, C, h * p, w * p)
