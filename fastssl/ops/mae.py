"""MAE token ops: random masking, decoder unshuffle with mask tokens, the masked pixel loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021). The official code
(`random_masking`, `forward_decoder`, `forward_loss` in facebookresearch/mae) does two
argsorts, gathers through an N×L×D int64 index built with `repeat`, concatenates mask tokens
and runs the loss as 6+ passes. Here:

* the permutation comes from one sort of random keys; `ids_restore` is its inverse by a scatter;
* `_compact_kernel` copies kept rows x[n, l] -> x_kept[n, P + ids_restore[n, l]] (adding the
  encoder's position embedding and writing the class token as row 0, P = 1, in the same pass;
  and the mask, or the sum of the removed rows for the mask-token gradient), indexing rows directly;
* `_expand_kernel` rebuilds the full sequence: the class token, kept rows from x_kept, the mask
  token elsewhere, plus the decoder's position embedding - the official cat, gather, cat and add
  as one pass; the same kernel with a zero token is the masking backward;
* `_mae_loss_kernel` is the per-patch-normalized MSE in one pass over pred/target (the target
  read from the images in the patchify layout), and with BACKWARD=True the gradient to pred.

Every kernel reads its inputs through their strides: the patch embedding's transposed output,
the decoder's output with its class-token row and the images reach the kernels without a copy,
in the forward and in the backward (autograd saves the views). Each kernel states its traffic
(what it loads and stores) in its docstring; `fastssl.bench.traffic` sums them.

Layout: x [N, L, D], ids [N, L] int64, mask [N, L] with 0 = kept, 1 = removed, in the
original token order (as in the official code).
"""

from __future__ import annotations

import math
from typing import Optional

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


# Traffic of one launch, from its bound arguments (name -> value): (bytes read, bytes written),
# each distinct address counted once, as each kernel's docstring states it. The position
# embedding's rows count once for all samples (every position is kept by some sample of a real
# batch). tests/test_traffic_model.py checks each against the interpreter; fastssl.bench.traffic
# sums them for the model.
def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _compact_kernel_traffic(a: dict) -> tuple[int, int]:
    ids, src, dst = a["ids_restore_ptr"], a["src_ptr"], a["dst_ptr"]
    N, L, K, D = ids.shape[0], a["L"], a["K"], a["D"]
    read = _bytes(ids) + N * (L if a["SUM_REST"] else K) * D * src.element_size()
    if a["HAS_POS"]:
        read += L * D * a["pos_ptr"].element_size()
    if a["HAS_PREFIX"]:
        read += (N if a["pre_sn"] else 1) * D * a["prefix_ptr"].element_size()
    written = _bytes(dst) + (N * L * a["mask_ptr"].element_size() if a["WRITE_MASK"] else 0)
    return read, written + (N * D * a["rest_ptr"].element_size() if a["SUM_REST"] else 0)


def _expand_kernel_traffic(a: dict) -> tuple[int, int]:
    ids, src, out = a["ids_restore_ptr"], a["src_ptr"], a["out_ptr"]
    N, L, K, D = ids.shape[0], a["L"], a["K"], a["D"]
    n_prefix = int(a["HAS_PREFIX"])
    read = _bytes(ids) + N * (n_prefix + K) * D * src.element_size() + D * a["fill_ptr"].element_size()
    if a["HAS_POS"]:
        read += (n_prefix + L) * D * a["pos_ptr"].element_size()
    return read, N * (n_prefix + L) * D * out.element_size()


def _mae_loss_kernel_traffic(a: dict) -> tuple[int, int]:
    R, L, P = a["R"], a["L"], a["P"]
    read = R * P * (a["pred_ptr"].element_size() + a["target_ptr"].element_size()) + R * a["mask_ptr"].element_size()
    if not a["BACKWARD"]:
        return read, _bytes(a["num_ptr"], a["den_ptr"])
    written = (R + (R // L) * int(a["HAS_PREFIX"])) * P * a["dpred_ptr"].element_size()
    return read + a["scale_ptr"].element_size(), written


KERNEL_TRAFFIC = {
    "_compact_kernel": _compact_kernel_traffic,
    "_expand_kernel": _expand_kernel_traffic,
    "_mae_loss_kernel": _mae_loss_kernel_traffic,
}


# ---------------------------------------------------------------------------------------------
# Launchers: every activation is read through its strides (no hidden copy); outputs are fresh
# ---------------------------------------------------------------------------------------------


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


def gather_kept_fwd(x: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, pos_embed: torch.Tensor | None,
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


def expand_fwd(x: torch.Tensor, ids_restore: torch.Tensor, fill: torch.Tensor, pos_embed: torch.Tensor | None,
               has_prefix: bool, d_major: bool = False) -> torch.Tensor:
    """x [N, P + K, D] (any strides), ids_restore [N, L], fill [D] -> [N, P + L, D] by `_expand_kernel`:
    the decoder's unshuffle (+ class-token row, + pos_embed [P + L, D]) and the masking backward
    (zero fill; d_major gives the output the patch-embedding output's layout)."""
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


def unshuffle_bwd(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
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


def _loss_launch(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, patch_size: int, has_prefix: bool,
                 out: tuple, norm_pix_loss: bool, backward: bool) -> None:
    """One `_mae_loss_kernel` launch over the N * L token rows of pred (after its prefix row)."""
    tokens = pred[:, int(has_prefix):]
    N, L, P = tokens.shape
    if patch_size:
        t_strides, geometry = target.stride(), (target.shape[3] // patch_size, patch_size, target.shape[1])
    else:
        t_strides, geometry = (*target.stride(), 0), (1, 1, 1)
    block_r, block_p, warps = _loss_blocks(P)
    _mae_loss_kernel[(triton.cdiv(N * L, block_r),)](
        tokens, target, mask, *out, N * L, L, P, NORM_PIX_EPS, *tokens.stride(), *t_strides, *mask.stride(),
        *geometry, BLOCK_R=block_r, BLOCK_P=block_p, NORM_PIX=norm_pix_loss, BACKWARD=backward,
        IMAGE_TARGET=bool(patch_size), HAS_PREFIX=has_prefix,
        IS_FP64=torch.float64 in (pred.dtype, target.dtype), num_warps=warps,
    )


def mae_loss_fwd(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool,
                 patch_size: int, has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """pred [N, P0 + L, P], target [N, L, P] (or imgs [N, C, H, W] when patch_size), mask [N, L], all
    any strides -> (loss [], sum(mask) [] fp32/fp64) in one pass."""
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    R = pred.shape[0] * mask.shape[1]
    grid = triton.cdiv(R, _loss_blocks(pred.shape[2])[0])
    num = torch.empty(grid, device=pred.device, dtype=acc)
    den = torch.empty(grid, device=pred.device, dtype=acc)
    _loss_launch(pred, target, mask, patch_size, has_prefix, (num, pred, num, den), norm_pix_loss, False)
    mask_sum = den.sum()
    return (num.sum() / mask_sum).to(torch.promote_types(pred.dtype, target.dtype)), mask_sum


def mae_loss_bwd(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                 mask_sum: torch.Tensor, norm_pix_loss: bool, patch_size: int, has_prefix: bool) -> torch.Tensor:
    """d loss / d pred, a contiguous [N, P0 + L, P] in pred's dtype (the prefix row 0), recomputing the
    normalized target (one pass)."""
    # a device scalar, not .item(): no host sync in the backward
    scale = (grad_loss.to(mask_sum.dtype) / mask_sum).reshape(1)
    dpred = pred.new_empty(pred.shape)
    _loss_launch(pred, target, mask, patch_size, has_prefix, (scale, dpred, scale, scale), norm_pix_loss, True)
    return dpred


# ---------------------------------------------------------------------------------------------
# Custom-op registration (torch.compile traces through these; opcheck runs on each in the tests).
# Autograd saves the inputs themselves (views included), never a contiguous copy.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastssl::mae_gather_kept", mutates_args=())
def _gather_kept_op(x: torch.Tensor, ids_restore: torch.Tensor, len_keep: int, pos_embed: Optional[torch.Tensor],  # noqa: UP045
                    prefix: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045
    return gather_kept_fwd(x, ids_restore, len_keep, pos_embed, prefix)


@_gather_kept_op.register_fake
def _(x, ids_restore, len_keep, pos_embed, prefix):
    N, L, D = x.shape
    return x.new_empty(N, (prefix is not None) + len_keep, D), x.new_empty(N, L)


def _is_d_major(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(2) == x.shape[1] and x.stride(1) == 1


def _gather_kept_setup(ctx, inputs, output):
    x, ids_restore, _, _, prefix = inputs
    ctx.save_for_backward(ids_restore)
    ctx.has_prefix = prefix is not None
    # the gradient gets x's layout, so the patch embedding's backward receives a contiguous one
    ctx.d_major = _is_d_major(x)
    ctx.mark_non_differentiable(output[1])


def _gather_kept_backward(ctx, grad_x_kept, grad_mask):
    (ids_restore,) = ctx.saved_tensors
    n_prefix = int(ctx.has_prefix)
    grad_x = _masking_bwd_op(grad_x_kept[:, n_prefix:], ids_restore, ctx.d_major)
    grad_prefix = grad_x_kept[:, 0].sum(0) if ctx.has_prefix and ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_prefix


_gather_kept_op.register_autograd(_gather_kept_backward, setup_context=_gather_kept_setup)


@torch.library.custom_op("fastssl::mae_masking_bwd", mutates_args=())
def _masking_bwd_op(grad_x_kept: torch.Tensor, ids_restore: torch.Tensor, d_major: bool) -> torch.Tensor:
    return expand_fwd(grad_x_kept, ids_restore, grad_x_kept.new_zeros(grad_x_kept.shape[2]), None, False, d_major)


@_masking_bwd_op.register_fake
def _(grad_x_kept, ids_restore, d_major):
    return _d_major_empty(grad_x_kept, grad_x_kept.shape[0], ids_restore.shape[1], grad_x_kept.shape[2], d_major)


@torch.library.custom_op("fastssl::mae_unshuffle", mutates_args=())
def _unshuffle_op(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                  pos_embed: Optional[torch.Tensor], has_prefix: bool) -> torch.Tensor:  # noqa: UP045
    return expand_fwd(x, ids_restore, mask_token, pos_embed, has_prefix)


@_unshuffle_op.register_fake
def _(x, ids_restore, mask_token, pos_embed, has_prefix):
    return x.new_empty(x.shape[0], int(has_prefix) + ids_restore.shape[1], x.shape[2])


def _unshuffle_setup(ctx, inputs, output):
    x, ids_restore, _, _, has_prefix = inputs
    ctx.save_for_backward(ids_restore)
    ctx.has_prefix = has_prefix
    ctx.len_keep = x.shape[1] - int(has_prefix)


def _unshuffle_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_token = _unshuffle_bwd_op(grad_out, ids_restore, ctx.len_keep, ctx.has_prefix)
    return grad_x, None, grad_token, None, None


_unshuffle_op.register_autograd(_unshuffle_backward, setup_context=_unshuffle_setup)


@torch.library.custom_op("fastssl::mae_unshuffle_bwd", mutates_args=())
def _unshuffle_bwd_op(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                      has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return unshuffle_bwd(grad_out, ids_restore, len_keep, has_prefix)


@_unshuffle_bwd_op.register_fake
def _(grad_out, ids_restore, len_keep, has_prefix):
    N, _, D = grad_out.shape
    return grad_out.new_empty(N, int(has_prefix) + len_keep, D), grad_out.new_empty(D)


@torch.library.custom_op("fastssl::mae_loss_fwd", mutates_args=())
def _mae_loss_fwd_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool,
                     patch_size: int, has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return mae_loss_fwd(pred, target, mask, norm_pix_loss, patch_size, has_prefix)


@_mae_loss_fwd_op.register_fake
def _(pred, target, mask, norm_pix_loss, patch_size, has_prefix):
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return pred.new_empty((), dtype=torch.promote_types(pred.dtype, target.dtype)), pred.new_empty((), dtype=acc)


def _mae_loss_setup(ctx, inputs, output):
    pred, target, mask, *flags = inputs
    ctx.save_for_backward(pred, target, mask, output[1])
    ctx.flags = flags  # norm_pix_loss, patch_size, has_prefix
    ctx.mark_non_differentiable(output[1])


def _mae_loss_backward(ctx, grad_loss, grad_mask_sum):
    pred, target, mask, mask_sum = ctx.saved_tensors
    return _mae_loss_bwd_op(grad_loss, pred, target, mask, mask_sum, *ctx.flags), None, None, None, None, None


_mae_loss_fwd_op.register_autograd(_mae_loss_backward, setup_context=_mae_loss_setup)


@torch.library.custom_op("fastssl::mae_loss_bwd", mutates_args=())
def _mae_loss_bwd_op(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     mask_sum: torch.Tensor, norm_pix_loss: bool, patch_size: int, has_prefix: bool) -> torch.Tensor:
    return mae_loss_bwd(grad_loss, pred, target, mask, mask_sum, norm_pix_loss, patch_size, has_prefix)


@_mae_loss_bwd_op.register_fake
def _(grad_loss, pred, target, mask, mask_sum, norm_pix_loss, patch_size, has_prefix):
    return pred.new_empty(pred.shape)


# ---------------------------------------------------------------------------------------------
# References: the official code path (two argsorts, repeat-built gather index, cat, multi-pass loss)
# ---------------------------------------------------------------------------------------------


def random_masking_ref(x: torch.Tensor, len_keep: int, noise: torch.Tensor, pos_embed: torch.Tensor | None = None,
                       cls_token: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official `random_masking` given its noise [N, L] (stable argsort for ties), after the
    encoder's `x + pos_embed` when one is given, followed by its `torch.cat([cls_token, x])` when
    cls_token [D] is given."""
    N, L, D = x.shape
    if pos_embed is not None:
        x = x + pos_embed.reshape(L, D).to(x.dtype)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    if cls_token is not None:
        x_kept = torch.cat([cls_token.reshape(1, 1, D).to(x.dtype).expand(N, -1, -1), x_kept], dim=1)
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def unshuffle_tokens_ref(x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor,
                         pos_embed: torch.Tensor | None = None, with_cls_token: bool = False) -> torch.Tensor:
    """The official `forward_decoder` step: cat mask tokens, gather (then, with_cls_token, put row 0
    back in front), then `+ pos_embed` when one is given."""
    cls, x_kept = (x_kept[:, :1], x_kept[:, 1:]) if with_cls_token else (None, x_kept)
    N, K, D = x_kept.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(x_kept.dtype).repeat(N, L - K, 1)
    x_ = torch.cat([x_kept, mask_tokens], dim=1)
    x = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
    if cls is not None:
        x = torch.cat([cls, x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], D).to(x.dtype)
    return x


def mae_loss_ref(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool = True, *,
                 patch_size: int | None = None, with_cls_token: bool = False) -> torch.Tensor:
    """The official `forward_loss` (target = patchify(imgs, patch_size) when patch_size is given;
    pred[:, 1:] when with_cls_token), in fp32 (fp64 stays fp64).

    Under autocast the official loss also runs in fp32: bf16 `pred` meets fp32 `target`."""
    if with_cls_token:
        pred = pred[:, 1:]
    if patch_size is not None:
        target = patchify(target, patch_size)
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
    cls_token: torch.Tensor | None = None,
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

    cls_token [D] or [1, 1, D] (optional): written as row 0 of every sample's kept tokens by the
    same pass, i.e. the official encoder's `torch.cat([cls_token + pos_embed[:, :1], x], dim=1)`
    (pass that sum); its gradient is the sum over samples of row 0's.

    x may have any strides (the patch embedding's output is a transposed view): it is read in
    place, and its gradient gets its layout.

    Returns x_kept [N, P + len_keep, D] (P = 1 with cls_token, then x's rows in shuffle order), mask [N, L] in x's dtype
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
    if cls_token is not None:
        check_tensor("cls_token", cls_token, ndim=(1, 3), device=x.device, like="x")
        if cls_token.numel() != D or cls_token.shape[-1] != D:
            raise ValueError(f"cls_token must be [D] or [1, 1, D] with D={D} like x, got {tuple(cls_token.shape)}")
    backend = resolve_backend(backend, x)

    if noise is None:
        noise = torch.rand(N, L, generator=generator, device=x.device)
    if backend == "torch":
        return random_masking_ref(x, len_keep, noise, pos_embed, cls_token)
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(L, D).to(x.dtype)
        if torch.is_grad_enabled() and pos_embed.requires_grad:
            x, pos_embed = x + pos_embed, None
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    # the inverse permutation by a scatter, not the official second argsort
    positions = torch.arange(L, device=x.device).expand(N, L)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    if cls_token is not None:
        cls_token = cls_token.reshape(D).to(x.dtype)
    x_kept, mask = _gather_kept_op(x, ids_restore, len_keep, pos_embed, cls_token)
    return x_kept, mask, ids_restore


def unshuffle_tokens(
    x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, backend: str = "auto", *,
    pos_embed: torch.Tensor | None = None, with_cls_token: bool = False,
) -> torch.Tensor:
    """MAE decoder input (He et al. 2021, `forward_decoder`).

    out[n, P + l] = x_kept[n, P + ids_restore[n, l]] if that index < len_keep else mask_token,
    then + pos_embed. x_kept [N, P + len_keep, D], any strides; with_cls_token (P = 1): row 0 is
    the class token and passes through to out row 0 (the official concat). mask_token [D] or
    [1, 1, D] (cast to x_kept's dtype; its gradient is the sum over all masked positions, in its
    own dtype); ids_restore [N, L] int64, a permutation of range(L) per row (not verified: that
    would cost a host sync; out-of-range ids give mask tokens, never an out-of-bounds access).
    pos_embed [P + L, D] or [1, P + L, D] (optional, cast to x_kept's dtype): added in the same
    pass (one that requires grad is added by torch afterwards, so its gradient is exact).
    Returns a contiguous [N, P + L, D] in x_kept's dtype."""
    check_tensor("x_kept", x_kept, ndim=3)
    if not isinstance(with_cls_token, bool):
        raise TypeError(f"with_cls_token must be a bool, got {type(with_cls_token).__name__}")
    n_prefix = int(with_cls_token)
    N, K, D = x_kept.shape
    K -= n_prefix
    if K < 1:
        raise ValueError(f"x_kept must hold {n_prefix} class-token row(s) and >= 1 kept token, got {tuple(x_kept.shape)}")
    check_tensor("mask_token", mask_token, ndim=(1, 3), device=x_kept.device, like="x_kept")
    if mask_token.numel() != D or mask_token.shape[-1] != D:
        raise ValueError(f"mask_token must be [D] or [1, 1, D] with D={D} like x_kept, got {tuple(mask_token.shape)}")
    _check_ids_restore(ids_restore, N, K, x_kept.device)
    L = ids_restore.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=(2, 3), device=x_kept.device, like="x_kept")
        if pos_embed.shape[-2:] != (n_prefix + L, D) or pos_embed.numel() != (n_prefix + L) * D:
            raise ValueError(f"pos_embed must be [P + L, D] or [1, P + L, D] = {(n_prefix + L, D)} "
                             f"(with_cls_token={with_cls_token}), got {tuple(pos_embed.shape)}")
    backend = resolve_backend(backend, x_kept, mask_token, ids_restore)
    if backend == "torch":
        return unshuffle_tokens_ref(x_kept, mask_token, ids_restore, pos_embed, with_cls_token)
    pos_after = None
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(n_prefix + L, D).to(x_kept.dtype)
        if torch.is_grad_enabled() and pos_embed.requires_grad:
            pos_after, pos_embed = pos_embed, None
    out = _unshuffle_op(x_kept, ids_restore, mask_token.reshape(D).to(x_kept.dtype), pos_embed, with_cls_token)
    return out if pos_after is None else out + pos_after


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool = True,
    patch_size: int | None = None, with_cls_token: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """MAE masked pixel loss (He et al. 2021, `forward_loss`), fp32 math.

    pred [N, L, P], or [N, 1 + L, P] with_cls_token (the decoder's output with its class-token
    row, which gets gradient 0: no slice and no slice-backward pass); target [N, L, P] = patchify(imgs),
    or, with patch_size = p, the images [N, C, H, W] themselves (P = p*p*C, L = HW/p^2), read in
    the patchify layout by the kernel (no patchified copy); mask [N, L] (1 = removed = scored).
    All may have any strides; they are read in place.
    With norm_pix_loss: target <- (target - mean_P) / sqrt(var_P(unbiased) + 1e-6) per patch.
    loss = sum(mask * mean_P (pred - target)^2) / sum(mask): a scalar in
    promote_types(pred, target) (NaN when sum(mask) == 0, as the official code).
    Gradient flows to pred only."""
    check_tensor("pred", pred, ndim=3)
    if not isinstance(with_cls_token, bool):
        raise TypeError(f"with_cls_token must be a bool, got {type(with_cls_token).__name__}")
    N, L, P = pred.shape
    L -= int(with_cls_token)
    if L < 1:
        raise ValueError(f"pred must hold a class-token row and >= 1 patch with_cls_token, got {tuple(pred.shape)}")
    if patch_size is None:
        check_tensor("target", target, ndim=3, device=pred.device, like="pred")
        if tuple(target.shape) != (N, L, P):
            raise ValueError(f"target must have pred's shape {(N, L, P)}{' after its class-token row' * with_cls_token}, "
                             f"got {tuple(target.shape)}")
    else:
        check_tensor("target", target, ndim=4, device=pred.device, like="pred")
        if not isinstance(patch_size, int) or isinstance(patch_size, bool) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        _, C, H, W = target.shape
        if (target.shape[0] != N or H % patch_size or W % patch_size
                or (H // patch_size) * (W // patch_size) != L or patch_size * patch_size * C != P):
            raise ValueError(f"target images [N, C, H, W] must give pred's [N, L, P] = {(N, L, P)} patches of "
                             f"patch_size={patch_size}, got {tuple(target.shape)}")
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
        return mae_loss_ref(pred, target, mask, norm_pix_loss, patch_size=patch_size, with_cls_token=with_cls_token)
    if P > MAX_PATCH_DIM:
        raise ValueError(f"backend='triton' supports patch size P <= {MAX_PATCH_DIM}, got P={P}")
    return _mae_loss_fwd_op(pred, target, mask, norm_pix_loss, patch_size or 0, with_cls_token)[0]


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
