"""Triton kernels, launchers and traffic formulas behind fastssl.ops.mae (random_masking,
unshuffle_tokens, mae_loss; see that module for the math).

Launchers read every activation through its strides (no hidden copy); outputs are fresh.
Imported only where triton is installed: fastssl.ops.mae runs its references without it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastssl.ops._traffic import nbytes

# ----------------------------------------------------------------------------- kernels


# L, K, R are not specialized (each new sequence length would compile again); D and P are,
# since their divisibility by 16 lets Triton vectorize the row accesses. Strides equal to 1
# are specialized by Triton, so the unit-stride case compiles to vector loads.
@triton.jit(do_not_specialize=["L", "K"])
def _compact_kernel(
    src_ptr, pos_ptr, ids_restore_ptr, prefix_ptr, dst_ptr, mask_ptr, rest_ptr, L, K, D,
    src_sn, src_sl, src_sd, pos_sl, pos_sd, pre_sn, pre_sd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    WRITE_MASK: tl.constexpr, SUM_REST: tl.constexpr, IS_FP64: tl.constexpr,
):
    """dst[n, P + j] = src[n, l] (+ pos[l]) where j = ids_restore[n, l] < K; program (n, column block).

    src is read through its strides (the transposed patch-embedding output, a slice of a
    gradient, an expanded view); dst is a fresh contiguous [N, P + K, D] with P = HAS_PREFIX.
    ids_restore is a permutation per row, so each kept row is written exactly once (no
    atomics). HAS_POS: add the positional embedding to kept rows only (saves the full-size
    x + pos pass). HAS_PREFIX: dst[n, 0] = prefix[n] (the class token row: the encoder's
    concat, or the unshuffle backward's pass-through). WRITE_MASK: mask[n, l] = 0 if kept else 1
    (masking forward). SUM_REST: rest[n, :] = sum of the removed rows (the mask-token gradient).

    Traffic: loads K rows of src (+ K rows of pos) per sample, or all L rows with SUM_REST;
    these are distinct bytes. A D-major src (the patch embedding's layout, tokens contiguous)
    scatters the kept 25% over 32-byte sectors of 8-16 tokens, so DRAM then serves ~all of x;
    stores P + K rows of dst (+ L mask values, or one fp32 rest row); + L ids."""
    n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    n_prefix: tl.constexpr = 1 if HAS_PREFIX else 0
    dst_row = n * (K + n_prefix)
    if HAS_PREFIX:
        head = tl.load(prefix_ptr + n * pre_sn + cols * pre_sd, mask=col_ok, other=0.0)
        tl.store(dst_ptr + dst_row * D + cols, head.to(dst_ptr.dtype.element_ty), mask=col_ok)
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
        src_offs = n * src_sn + rows.to(tl.int64)[:, None] * src_sl + cols[None, :] * src_sd
        if SUM_REST:
            vals = tl.load(src_ptr + src_offs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            removed = row_ok & ~kept
            rest += tl.sum(tl.where(removed[:, None], vals.to(rest.dtype), 0.0), axis=0)
        else:  # only kept rows are read (see the traffic note for a D-major x)
            vals = tl.load(src_ptr + src_offs, mask=kept[:, None] & col_ok[None, :], other=0.0)
        if HAS_POS:
            # x + pos in fp32 and one rounding: the same value as torch's add in x's dtype
            pos = tl.load(pos_ptr + rows[:, None] * pos_sl + cols[None, :] * pos_sd,
                          mask=kept[:, None] & col_ok[None, :], other=0.0)
            acc = tl.float64 if IS_FP64 else tl.float32
            vals = vals.to(acc) + pos.to(acc)
        dst_offs = (dst_row + n_prefix + j)[:, None] * D + cols[None, :]
        tl.store(dst_ptr + dst_offs, vals.to(dst_ptr.dtype.element_ty), mask=kept[:, None] & col_ok[None, :])
    if SUM_REST:
        tl.store(rest_ptr + n * D + cols, rest, mask=col_ok)

@triton.jit(do_not_specialize=["L", "K"])
def _expand_kernel(
    src_ptr, ids_restore_ptr, fill_ptr, pos_ptr, out_ptr, L, K, D,
    src_sn, src_sl, src_sd, pos_sl, pos_sd, out_sn, out_sl, out_sd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, HAS_POS: tl.constexpr, HAS_PREFIX: tl.constexpr,
    IS_FP64: tl.constexpr,
):
    """out[n, P + l] = (src[n, P + j] if j = ids_restore[n, l] < K else fill) (+ pos[P + l]);
    with HAS_PREFIX (P = 1) also out[n, 0] = src[n, 0] (+ pos[0]): the class token passes
    through, so the decoder's concat and positional add are this one pass. Program (n, column
    block); src and out through their strides (out's layout is the caller's choice).

    Traffic: loads P + K rows of src, P + L rows of pos (HAS_POS), one fill row, L ids;
    stores P + L rows of out."""
    n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    n_prefix: tl.constexpr = 1 if HAS_PREFIX else 0
    acc = tl.float64 if IS_FP64 else tl.float32
    if HAS_PREFIX:
        head = tl.load(src_ptr + n * src_sn + cols * src_sd, mask=col_ok, other=0.0)
        if HAS_POS:
            head = head.to(acc) + tl.load(pos_ptr + cols * pos_sd, mask=col_ok, other=0.0).to(acc)
        tl.store(out_ptr + n * out_sn + cols * out_sd, head.to(out_ptr.dtype.element_ty), mask=col_ok)
    fill = tl.load(fill_ptr + cols, mask=col_ok, other=0.0)
    for t0 in range(0, L, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        row_ok = rows < L
        j = tl.load(ids_restore_ptr + n * L + rows, mask=row_ok, other=-1)
        kept = row_ok & (j >= 0) & (j < K)
        vals = tl.load(src_ptr + n * src_sn + (n_prefix + j)[:, None] * src_sl + cols[None, :] * src_sd,
                       mask=kept[:, None] & col_ok[None, :], other=0.0)
        vals = tl.where(kept[:, None], vals, fill[None, :])
        out_rows = (n_prefix + rows).to(tl.int64)
        if HAS_POS:
            pos = tl.load(pos_ptr + out_rows[:, None] * pos_sl + cols[None, :] * pos_sd,
                          mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            vals = vals.to(acc) + pos.to(acc)
        tl.store(out_ptr + n * out_sn + out_rows[:, None] * out_sl + cols[None, :] * out_sd,
                 vals.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

@triton.jit(do_not_specialize=["R", "L"])
def _mae_loss_kernel(
    pred_ptr, target_ptr, mask_ptr, scale_ptr, dpred_ptr, num_ptr, den_ptr, R, L, P, eps,
    pred_sn, pred_sl, pred_sp, t_s0, t_s1, t_s2, t_s3, mask_sn, mask_sl, grid_w, patch, channels,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, NORM_PIX: tl.constexpr, BACKWARD: tl.constexpr,
    IMAGE_TARGET: tl.constexpr, HAS_PREFIX: tl.constexpr, IS_FP64: tl.constexpr,
):
    """BLOCK_R patch rows (r = n * L + l) per program, each whole in registers, so pred/target
    are read once, through their strides.

    The target is [N, L, P] (strides t_s0..t_s2), or with IMAGE_TARGET the images [N, C, H, W]
    (strides t_s0..t_s3) read in the official patchify layout ('nchpwq->nhwpqc': column
    k = (py * patch + px) * C + c of patch l = (row, col) on a grid_w-wide grid): no
    patchified copy exists.
    Forward: num[pid] = sum_r mask_r * mean_p (pred - t)^2, den[pid] = sum_r mask_r, where
    t = (target - mean) / sqrt(var_unbiased + eps) with NORM_PIX, else target.
    Backward: dpred[n, P0 + l] = scale * mask_r * 2 (pred - t) / P with scale = dloss / sum(mask),
    into a contiguous [N, P0 + L, P]; with HAS_PREFIX (P0 = 1) the class-token row gets 0.

    Traffic: loads R rows of pred and of target and R mask values; forward stores 2 values
    per program, backward R (+ N with HAS_PREFIX) rows of dpred."""
    acc = tl.float64 if IS_FP64 else tl.float32
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_P)
    row_ok = rows < R
    ok = row_ok[:, None] & (cols < P)[None, :]
    n = rows // L
    l = rows % L
    if IMAGE_TARGET:
        py = cols // (patch * channels)
        px = (cols // channels) % patch
        c = cols % channels
        t_offs = ((n * t_s0 + (l // grid_w) * patch * t_s2 + (l % grid_w) * patch * t_s3)[:, None]
                  + (c * t_s1 + py * t_s2 + px * t_s3)[None, :])
    else:
        t_offs = (n * t_s0 + l * t_s1)[:, None] + cols[None, :] * t_s2
    t = tl.load(target_ptr + t_offs, mask=ok, other=0.0).to(acc)
    if NORM_PIX:
        mean = tl.sum(t, axis=1) / P
        centered = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(centered * centered, axis=1) / (P - 1)
        t = centered / tl.sqrt(var + eps)[:, None]
    pred = tl.load(pred_ptr + (n * pred_sn + l * pred_sl)[:, None] + cols[None, :] * pred_sp,
                   mask=ok, other=0.0).to(acc)
    diff = tl.where(ok, pred - t, 0.0)
    m = tl.load(mask_ptr + n * mask_sn + l * mask_sl, mask=row_ok, other=0.0).to(acc)
    if BACKWARD:
        n_prefix: tl.constexpr = 1 if HAS_PREFIX else 0
        scale = tl.load(scale_ptr).to(acc)
        grad = diff * (2.0 * scale * m / P)[:, None]
        out_rows = n * (L + n_prefix) + n_prefix + l
        tl.store(dpred_ptr + out_rows[:, None] * P + cols[None, :], grad.to(dpred_ptr.dtype.element_ty),
                 mask=ok)
        if HAS_PREFIX:
            head = (n * (L + 1))[:, None] * P + cols[None, :]
            tl.store(dpred_ptr + head, tl.zeros([BLOCK_R, BLOCK_P], dtype=dpred_ptr.dtype.element_ty),
                     mask=ok & (l == 0)[:, None])
    else:
        # m * loss, not a select: NaN in a kept patch still gives NaN (as the official code)
        loss = tl.sum(diff * diff, axis=1) / P
        tl.store(num_ptr + pid, tl.sum(loss * m, axis=0))
        tl.store(den_ptr + pid, tl.sum(m, axis=0))


# ----------------------------------------------------------------------------- traffic (fastssl.ops._traffic)
# The position embedding's rows count once for all samples (every position is kept by some
# sample of a real batch).


def _compact_traffic(a: dict) -> tuple[int, int, int]:
    ids, src, dst = a["ids_restore_ptr"], a["src_ptr"], a["dst_ptr"]
    N, L, K, D = ids.shape[0], a["L"], a["K"], a["D"]
    read = nbytes(ids) + N * (L if a["SUM_REST"] else K) * D * src.element_size()
    if a["HAS_POS"]:
        read += L * D * a["pos_ptr"].element_size()
    if a["HAS_PREFIX"]:
        read += (N if a["pre_sn"] else 1) * D * a["prefix_ptr"].element_size()
    written = nbytes(dst) + (N * L * a["mask_ptr"].element_size() if a["WRITE_MASK"] else 0)
    return read, written + (N * D * a["rest_ptr"].element_size() if a["SUM_REST"] else 0), 0


def _expand_traffic(a: dict) -> tuple[int, int, int]:
    ids, src, out = a["ids_restore_ptr"], a["src_ptr"], a["out_ptr"]
    N, L, K, D = ids.shape[0], a["L"], a["K"], a["D"]
    n_prefix = int(a["HAS_PREFIX"])
    read = nbytes(ids) + N * (n_prefix + K) * D * src.element_size() + D * a["fill_ptr"].element_size()
    if a["HAS_POS"]:
        read += (n_prefix + L) * D * a["pos_ptr"].element_size()
    return read, N * (n_prefix + L) * D * out.element_size(), 0


def _loss_traffic(a: dict) -> tuple[int, int, int]:
    R, L, P = a["R"], a["L"], a["P"]
    read = R * P * (a["pred_ptr"].element_size() + a["target_ptr"].element_size()) + R * a["mask_ptr"].element_size()
    if not a["BACKWARD"]:
        return read, nbytes(a["num_ptr"], a["den_ptr"]), 0
    written = (R + (R // L) * int(a["HAS_PREFIX"])) * P * a["dpred_ptr"].element_size()
    return read + a["scale_ptr"].element_size(), written, 0


KERNEL_TRAFFIC = {
    "_compact_kernel": _compact_traffic,
    "_expand_kernel": _expand_traffic,
    "_mae_loss_kernel": _loss_traffic,
}


# ----------------------------------------------------------------------------- launchers


def _row_blocks(D: int, d_major: bool = False) -> tuple[int, int]:
    """Tile [BLOCK_T tokens, BLOCK_D columns]: ~8K elements so a program moves 16-32 KB per step.
    A D-major side (the patch embedding's layout: tokens contiguous) gets 64 x 64 tiles: its
    accesses coalesce along tokens, and the tile is transposed through shared memory, whose size
    and the registers it needs grow with the tile (ptxas: ~250 registers at 32 x 256)."""
    block_d = min(256, max(16, triton.next_power_of_2(D)))
    if d_major:
        return 64, min(64, block_d)
    return max(1, min(64, 8192 // block_d)), block_d


def _strides_2d(t: torch.Tensor | None) -> tuple[int, int]:
    """(row, column) strides of a [rows, D] operand, (0, 0) when absent."""
    return (0, 0) if t is None else (t.stride(0), t.stride(1))


def _d_major_empty(like: torch.Tensor, N: int, L: int, D: int, d_major: bool) -> torch.Tensor:
    """An [N, L, D] buffer, stored as [N, D, L] when d_major (the patch-embedding output's layout)."""
    return like.new_empty(N, D, L).transpose(1, 2) if d_major else like.new_empty(N, L, D)


def random_masking_fwd(x: torch.Tensor, ids_restore: torch.Tensor, *, len_keep: int, pos_embed: torch.Tensor | None,
                       prefix: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [N, L, D] (any strides; + pos_embed [L, D] in x's dtype) -> (x_kept [N, P + len_keep, D],
    mask [N, L] in x's dtype) by `_compact_kernel`; with prefix [D] (P = 1) row 0 of every sample is
    prefix (the class token), i.e. the encoder's concat is part of this pass."""
    ids_restore = ids_restore.contiguous()
    N, L, D = x.shape
    n_prefix = 0 if prefix is None else 1
    x_kept = x.new_empty(N, n_prefix + len_keep, D)
    mask = x.new_empty(N, L)
    block_t, block_d = _row_blocks(D, x.stride(2) != 1)
    _compact_kernel[(N, triton.cdiv(D, block_d))](
        x, x if pos_embed is None else pos_embed, ids_restore, x if prefix is None else prefix, x_kept, mask, x,
        L, len_keep, D, *x.stride(), *_strides_2d(pos_embed), 0, 0 if prefix is None else prefix.stride(0),
        BLOCK_T=block_t, BLOCK_D=block_d, HAS_POS=pos_embed is not None, HAS_PREFIX=prefix is not None,
        WRITE_MASK=True, SUM_REST=False, IS_FP64=x.dtype == torch.float64,
    )
    return x_kept, mask


def _expand(x: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor, *, pos_embed: torch.Tensor | None,
            has_prefix: bool, d_major: bool) -> torch.Tensor:
    """x [N, P + K, D] (any strides), ids_restore [N, L], fill [D] -> [N, P + L, D] by `_expand_kernel`
    (d_major gives the output the patch-embedding output's layout)."""
    ids_restore, fill = ids_restore.contiguous(), fill.contiguous()
    N, D = x.shape[0], x.shape[2]
    n_prefix = int(has_prefix)
    L = ids_restore.shape[1]
    out = _d_major_empty(x, N, n_prefix + L, D, d_major)
    block_t, block_d = _row_blocks(D, d_major or x.stride(2) != 1)
    _expand_kernel[(N, triton.cdiv(D, block_d))](
        x, ids_restore, fill, x if pos_embed is None else pos_embed, out, L, x.shape[1] - n_prefix, D,
        *x.stride(), *_strides_2d(pos_embed), *out.stride(),
        BLOCK_T=block_t, BLOCK_D=block_d, HAS_POS=pos_embed is not None, HAS_PREFIX=has_prefix,
        IS_FP64=x.dtype == torch.float64,
    )
    return out


def random_masking_bwd(grad_x_kept: torch.Tensor, ids_restore: torch.Tensor, *, d_major: bool) -> torch.Tensor:
    """grad_x_kept [N, K, D] (without its class-token row) -> grad_x [N, L, D]: kept rows back in place,
    zero at removed ones; stored D-major when d_major (x's layout)."""
    fill = grad_x_kept.new_zeros(grad_x_kept.shape[2])
    return _expand(grad_x_kept, ids_restore, fill, pos_embed=None, has_prefix=False, d_major=d_major)


def unshuffle_tokens_fwd(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor, *,
                         pos_embed: torch.Tensor | None, has_prefix: bool) -> torch.Tensor:
    """The decoder's unshuffle: x [N, P + K, D] -> [N, P + L, D], mask_token [D] at removed rows,
    the class-token row passed through (P = 1), + pos_embed [P + L, D]."""
    return _expand(x, ids_restore, mask_token, pos_embed=pos_embed, has_prefix=has_prefix, d_major=False)


def unshuffle_tokens_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, *, len_keep: int,
                         has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """grad_out [N, P + L, D] (any strides) -> (grad_x [N, P + K, D], grad_fill [D]) by `_compact_kernel`.

    grad_fill is summed per sample in the kernel (fp32) and over samples here: deterministic."""
    ids_restore = ids_restore.contiguous()
    N, _, D = grad_out.shape
    n_prefix = int(has_prefix)
    L = ids_restore.shape[1]
    tokens = grad_out[:, n_prefix:]  # a view: the kernel reads through its strides
    is_fp64 = grad_out.dtype == torch.float64
    grad_x = grad_out.new_empty(N, n_prefix + len_keep, D)
    rest = torch.empty(N, D, device=grad_out.device, dtype=torch.float64 if is_fp64 else torch.float32)
    block_t, block_d = _row_blocks(D)
    # half the tokens per step: the running fp32 sum of the removed rows holds a [BLOCK_D] slice
    # per thread beside the tile (ptxas, triton 3.6, sm_80/89: 32 x 256 fp32 spills)
    block_t = max(1, block_t // 2)
    _compact_kernel[(N, triton.cdiv(D, block_d))](
        tokens, tokens, ids_restore, grad_out, grad_x, rest, rest, L, len_keep, D,
        *tokens.stride(), 0, 0, grad_out.stride(0), grad_out.stride(2),
        BLOCK_T=block_t, BLOCK_D=block_d, HAS_POS=False, HAS_PREFIX=has_prefix, WRITE_MASK=False,
        SUM_REST=True, IS_FP64=is_fp64,
    )
    return grad_x, rest.sum(0).to(grad_out.dtype)


def _loss_blocks(P: int) -> tuple[int, int, int]:
    block_p = triton.next_power_of_2(P)
    return max(1, min(16, 4096 // block_p)), block_p, 8 if block_p >= 4096 else 4


def _loss_launch(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, out: tuple, *, patch_size: int,
                 has_prefix: bool, norm_pix_loss: bool, eps: float, backward: bool) -> None:
    """One `_mae_loss_kernel` launch over the N * L token rows of pred (after its prefix row)."""
    tokens = pred[:, int(has_prefix):]
    N, L, P = tokens.shape
    if patch_size:
        t_strides, geometry = target.stride(), (target.shape[3] // patch_size, patch_size, target.shape[1])
    else:
        t_strides, geometry = (*target.stride(), 0), (1, 1, 1)
    block_r, block_p, warps = _loss_blocks(P)
    _mae_loss_kernel[(triton.cdiv(N * L, block_r),)](
        tokens, target, mask, *out, N * L, L, P, eps, *tokens.stride(), *t_strides, *mask.stride(),
        *geometry, BLOCK_R=block_r, BLOCK_P=block_p, NORM_PIX=norm_pix_loss, BACKWARD=backward,
        IMAGE_TARGET=bool(patch_size), HAS_PREFIX=has_prefix,
        IS_FP64=torch.float64 in (pred.dtype, target.dtype), num_warps=warps,
    )


def mae_loss_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool, eps: float,
                 patch_size: int, has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pred [N, P0 + L, P], target [N, L, P] (or imgs [N, C, H, W] when patch_size), mask [N, L], all
    any strides -> (loss [], sum(mask) [] fp32/fp64) in one pass."""
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    R = pred.shape[0] * mask.shape[1]
    grid = triton.cdiv(R, _loss_blocks(pred.shape[2])[0])
    num = torch.empty(grid, device=pred.device, dtype=acc)
    den = torch.empty(grid, device=pred.device, dtype=acc)
    _loss_launch(pred, target, mask, (num, pred, num, den), patch_size=patch_size, has_prefix=has_prefix,
                 norm_pix_loss=norm_pix_loss, eps=eps, backward=False)
    mask_sum = den.sum()
    return (num.sum() / mask_sum).to(torch.promote_types(pred.dtype, target.dtype)), mask_sum


def mae_loss_bwd(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 mask_sum: torch.Tensor, *, norm_pix_loss: bool, eps: float, patch_size: int,
                 has_prefix: bool) -> torch.Tensor:
    """d loss / d pred, a contiguous [N, P0 + L, P] in pred's dtype (the prefix row 0), recomputing the
    normalized target (one pass)."""
    # a device scalar, not .item(): no host sync in the backward
    scale = (grad_loss.to(mask_sum.dtype) / mask_sum).reshape(1)
    dpred = pred.new_empty(pred.shape)
    _loss_launch(pred, target, mask, (scale, dpred, scale, scale), patch_size=patch_size, has_prefix=has_prefix,
                 norm_pix_loss=norm_pix_loss, eps=eps, backward=True)
    return dpred
