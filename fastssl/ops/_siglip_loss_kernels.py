"""Triton kernels and launchers behind fastssl.ops.siglip_loss (see that module for the math).

Imported only where triton is installed: fastssl.ops.siglip_loss runs its reference without it."""

import torch
import triton
import triton.language as tl

from fastssl.ops._tiles import (
    SPLIT_CHUNK,
    block_d,
    chunked_dot,
    dot_precision,
    precision,
    program_tiles,
    stream_splits,
)
from fastssl.ops._traffic import nbytes
from fastssl.ops.backend import triton_interpreting

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _siglip_pair_tile(
    a_ptr, b_ptr, scale_ptr, bias_ptr, rows, row_ok, cols, col_ok, D, stride_a, stride_ad, stride_b, stride_bd,
    label_offset, HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """For rows of a against columns of b: the dot products s = a_i·b_j and the signed logits
    u = z_ij (t·s + b), z = +1 where j == i + label_offset (POSITIVES), -1 elsewhere."""
    a_rows = a_ptr + rows.to(tl.int64)[:, None] * stride_a
    b_rows = b_ptr + cols.to(tl.int64)[:, None] * stride_b
    s = chunked_dot(a_rows, row_ok, stride_ad, b_rows, col_ok, stride_bd, D, BLOCK_K, DOT_PRECISION)
    logit = s * tl.load(scale_ptr).to(tl.float32)
    if HAS_BIAS:
        logit += tl.load(bias_ptr).to(tl.float32)
    z = tl.full(logit.shape, -1.0, tl.float32)
    if POSITIVES:
        z = tl.where(cols[None, :] == rows[:, None] + label_offset, 1.0, z)
    return s, z * logit, z


@triton.jit
def _siglip_pair_grad(u, z, valid):
    """d(-log σ(u))/d logit = -z σ(-u) (u = z·logit), 0 outside the valid pairs; NaN stays NaN.
    σ(-u) from e = exp(-|u|) <= 1, which never overflows."""
    e = tl.exp(-tl.abs(u))
    return tl.where(valid, -z * tl.where(u > 0, e, 1.0) / (1.0 + e), 0.0)


@triton.jit(do_not_specialize=["label_offset"])
def _siglip_loss_fwd_kernel(
    x_ptr, y_ptr, scale_ptr, bias_ptr, loss_ptr, dscale_ptr, dbias_ptr, acc_ptr,
    N, M, D, stride_x, stride_xd, stride_y, stride_yd, split_cols, label_offset,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, COMPUTE_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Rows [pid_n·BLOCK_N, +BLOCK_N) of the images against one split of the texts: per row, the
    sum of -log σ(u) and (COMPUTE_GRAD) of G = ∂/∂logit and G·s, and Σ_j G_ij y_j over the
    feature columns [pid_d·BLOCK_DV, +BLOCK_DV). Row sums come from the program with pid_d == 0.

    Traffic: reads x's and y's rows (each split its own texts; x re-read per split from cache);
    writes [splits, N] fp32 sums (three with COMPUTE_GRAD) and the [splits, N, D] fp32 accumulator."""
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    rows, row_ok, dims_v, dv_ok, start, end = program_tiles(N, D, split_cols, M, BLOCK_N, BLOCK_DV)
    loss = tl.zeros([BLOCK_N], tl.float32)
    dscale = tl.zeros([BLOCK_N], tl.float32)
    dbias = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for col0 in range(start, end, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_ok = cols < end
        s, u, z = _siglip_pair_tile(x_ptr, y_ptr, scale_ptr, bias_ptr, rows, row_ok, cols, col_ok, D,
                                    stride_x, stride_xd, stride_y, stride_yd, label_offset,
                                    HAS_BIAS, POSITIVES, DOT_PRECISION, BLOCK_K)
        valid = row_ok[:, None] & col_ok[None, :]
        # -log σ(u) = softplus(-u) = max(-u, 0) + log1p(e), e = exp(-|u|) in (0, 1]; log1p(e) as
        # log(w)·e/(w - 1), w = 1 + e (exact to fp32 rounding where log(1 + e) alone loses e's digits)
        e = tl.exp(-tl.abs(u))
        w = 1.0 + e
        log1p = tl.where(w == 1.0, e, tl.log(w) * (e / tl.where(w == 1.0, 1.0, w - 1.0)))
        loss += tl.sum(tl.where(valid, tl.where(u < 0, -u, 0.0) + log1p, 0.0), axis=1)
        if COMPUTE_GRAD:
            g = _siglip_pair_grad(u, z, valid)
            dscale += tl.sum(g * s, axis=1)
            dbias += tl.sum(g, axis=1)
            y = tl.load(y_ptr + cols.to(tl.int64)[:, None] * stride_y + dims_v[None, :] * stride_yd,
                        mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
            acc = tl.dot(g.to(x_ptr.dtype.element_ty), y.to(x_ptr.dtype.element_ty), acc,
                         input_precision=DOT_PRECISION)
    part = split.to(tl.int64) * N + rows
    if pid_d == 0:
        tl.store(loss_ptr + part, loss, mask=row_ok)
        if COMPUTE_GRAD:
            tl.store(dscale_ptr + part, dscale, mask=row_ok)
            tl.store(dbias_ptr + part, dbias, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(acc_ptr + part[:, None] * D + dims_v[None, :], acc, mask=row_ok[:, None] & dv_ok[None, :])


@triton.jit(do_not_specialize=["label_offset"])
def _siglip_loss_bwd_kernel(
    y_ptr, x_ptr, scale_ptr, bias_ptr, coef_ptr, out_ptr,
    M, N, D, stride_y, stride_yd, stride_x, stride_xd, split_rows, label_offset,
    HAS_BIAS: tl.constexpr, POSITIVES: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """Text gradient: for texts [pid_m·BLOCK_M, +BLOCK_M), Σ_i G_ij x_i over one split of the images,
    recomputing the logits (the pairs are symmetric: text j's positive is image j - label_offset).
    ONE_SPLIT: the sum is whole, so it is scaled by coef = g·t/N and stored in the text's dtype
    ([M, D]); otherwise the split's fp32 partial sum is stored ([splits, M, D]).
    Traffic: reads x's and y's rows; writes the gradient or the partials."""
    split = tl.program_id(1)
    texts, text_ok, dims_v, dv_ok, start, end = program_tiles(M, D, split_rows, N, BLOCK_M, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for row0 in range(start, end, BLOCK_N):
        images = row0 + tl.arange(0, BLOCK_N)
        image_ok = images < end
        _, u, z = _siglip_pair_tile(y_ptr, x_ptr, scale_ptr, bias_ptr, texts, text_ok, images, image_ok, D,
                                    stride_y, stride_yd, stride_x, stride_xd, -label_offset,
                                    HAS_BIAS, POSITIVES, DOT_PRECISION, BLOCK_K)
        g = _siglip_pair_grad(u, z, text_ok[:, None] & image_ok[None, :])
        x = tl.load(x_ptr + images.to(tl.int64)[:, None] * stride_x + dims_v[None, :] * stride_xd,
                    mask=image_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = tl.dot(g.to(y_ptr.dtype.element_ty), x.to(y_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
    part = split.to(tl.int64) * M + texts
    if ONE_SPLIT:
        acc = (acc * tl.load(coef_ptr)).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + part[:, None] * D + dims_v[None, :], acc, mask=text_ok[:, None] & dv_ok[None, :])


# ----------------------------------------------------------------------------- traffic (fastssl.ops._traffic)
# Each kernel reads x's and y's rows whole (the re-reads of a row per split and per D program hit
# cache) and writes its outputs whole.


def _matmul_flops(a: dict, with_grad: bool) -> int:
    """2 N M D per logits tile, one per BLOCK_DV-column program (each recomputes it), plus the
    gradient dot G @ rows (2 N M D over all programs)."""
    d_programs = -(-a["D"] // a["BLOCK_DV"])
    return (d_programs + with_grad) * 2 * a["x_ptr"].shape[0] * a["y_ptr"].shape[0] * a["D"]


def _reads(a: dict) -> int:
    return nbytes(a["x_ptr"], a["y_ptr"], a["scale_ptr"]) + (nbytes(a["bias_ptr"]) if a["HAS_BIAS"] else 0)


def _fwd_traffic(a: dict) -> tuple[int, int, int]:
    grads = nbytes(a["dscale_ptr"], a["dbias_ptr"], a["acc_ptr"]) if a["COMPUTE_GRAD"] else 0
    return _reads(a), nbytes(a["loss_ptr"]) + grads, _matmul_flops(a, a["COMPUTE_GRAD"])


KERNEL_TRAFFIC = {
    "_siglip_loss_fwd_kernel": _fwd_traffic,
    "_siglip_loss_bwd_kernel": lambda a: (_reads(a) + (nbytes(a["coef_ptr"]) if a["ONE_SPLIT"] else 0),
                                          nbytes(a["out_ptr"]), _matmul_flops(a, True)),
}


# ----------------------------------------------------------------------------- launchers

# (outer rows, streamed rows, num_warps, num_stages) per input precision; fp32 dots run as
# tf32x3 (three tf32 products), whose split operands double the registers of a tile. Picked by
# the compile gate (no spill on sm_80/89/90/100): 16-bit on 4 warps and fp32 with 32 streamed
# rows spill; 64-row outer tiles keep wgmma on sm_90. Not tuned on a GPU yet.
_TILES = {"16bit": (64, 64, 8, 2), "fp32": (64, 16, 8, 2)}
# Under the interpreter (CPU tests, small shapes): tiles small enough that N, M <= 64 and D <= 32
# still run several splits, accumulator programs and D chunks, so every code path is exercised.
_INTERPRETER = dict(outer=32, inner=32, BLOCK_K=16, BLOCK_DV=16, split_chunk=32)
_BLOCK_K = {"16bit": 64, "fp32": 32}  # D chunk of the logits dot
# D columns of the accumulator per program, each recomputing the logits: the widest without spills
_BLOCK_DV = {"16bit": 256, "fp32": 128}


def _unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    """x itself when its rows are unit-stride (the kernels take the row stride), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _launch_shape(outer_rows: int, stream_rows: int, D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """Tiles, grid and warps for `outer_rows` rows streaming `stream_rows`: the streamed rows are
    split so that about two programs per SM run on a GPU (N = 256 alone is 4 row tiles); on the
    interpreter in 2 splits, so the tests exercise the sum over splits."""
    tile_class = precision(dtype)
    outer, inner, warps, stages = _TILES[tile_class]
    block_k, block_dv, split_chunk = _BLOCK_K[tile_class], _BLOCK_DV[tile_class], SPLIT_CHUNK
    if triton_interpreting():
        outer, inner, block_k, block_dv, split_chunk = (_INTERPRETER[k] for k in (
            "outer", "inner", "BLOCK_K", "BLOCK_DV", "split_chunk"))
    block_dv = min(block_dv, block_d(D))
    d_programs = triton.cdiv(D, block_dv)
    outer_programs = triton.cdiv(outer_rows, outer)
    splits, split_rows = stream_splits(outer_programs, stream_rows, d_programs, device, chunk=split_chunk)
    return dict(grid=(outer_programs, splits, d_programs), splits=splits, split_rows=split_rows,
                outer=outer, inner=inner, BLOCK_K=min(block_k, block_d(D)), BLOCK_DV=block_dv,
                num_warps=warps, num_stages=stages, DOT_PRECISION=dot_precision(dtype))


def _scalar_args(logit_scale: torch.Tensor, logit_bias: torch.Tensor | None) -> tuple:
    """Pointers to t and b (read on the device: no host sync) and HAS_BIAS."""
    return logit_scale, (logit_scale if logit_bias is None else logit_bias), logit_bias is not None


def siglip_loss_fwd(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor | None, *,
    label_offset: int, positives: bool, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns (loss fp32 [], dimage_dir fp32 [N, D], dscale_dir fp32 [],
    dbias_dir fp32 []): the loss and its gradients for a unit incoming gradient (all but the loss
    empty unless compute_grad)."""
    image, text = _unit_last_dim(image), _unit_last_dim(text)
    N, D = image.shape
    M = text.shape[0]
    shape = _launch_shape(N, M, D, image.dtype, image.device)
    splits = shape["splits"]
    f32 = {"dtype": torch.float32, "device": image.device}
    loss_part = torch.empty(splits, N, **f32)
    grad_rows = (splits, N) if compute_grad else (0,)
    dscale_part, dbias_part = torch.empty(grad_rows, **f32), torch.empty(grad_rows, **f32)
    acc = torch.empty((splits, N, D) if compute_grad else (0,), **f32)
    scale_ptr, bias_ptr, has_bias = _scalar_args(logit_scale, logit_bias)
    _siglip_loss_fwd_kernel[shape["grid"]](
        image, text, scale_ptr, bias_ptr, loss_part, dscale_part, dbias_part, acc,
        N, M, D, *image.stride(), *text.stride(), shape["split_rows"], label_offset,
        HAS_BIAS=has_bias, POSITIVES=positives, COMPUTE_GRAD=compute_grad, DOT_PRECISION=shape["DOT_PRECISION"],
        BLOCK_N=shape["outer"], BLOCK_M=shape["inner"], BLOCK_K=shape["BLOCK_K"], BLOCK_DV=shape["BLOCK_DV"],
        num_warps=shape["num_warps"], num_stages=shape["num_stages"],
    )
    loss = loss_part.sum() / N
    if not compute_grad:
        return loss, torch.empty(0, **f32), torch.empty(0, **f32), torch.empty(0, **f32)
    scale = logit_scale.detach().reshape(()).to(torch.float32)
    return loss, acc.sum(0) * (scale / N), dscale_part.sum() / N, dbias_part.sum() / N


def siglip_loss_bwd(
    grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None, *, label_offset: int, positives: bool,
) -> torch.Tensor:
    """Text gradient [M, D] (text's dtype) of grad · loss, recomputing the logits tiles; grad is a
    0-d tensor (possibly a stride-0 expanded view), read on the device."""
    image, text = _unit_last_dim(image), _unit_last_dim(text)
    N, D = image.shape
    M = text.shape[0]
    shape = _launch_shape(M, N, D, text.dtype, text.device)
    one_split = shape["splits"] == 1
    coef = grad.reshape(1).to(torch.float32) * logit_scale.detach().reshape(1).to(torch.float32) / N
    # one split: the kernel writes the gradient itself; several: fp32 partials, summed here
    out = text.new_empty(text.shape) if one_split else torch.empty(shape["splits"], M, D, dtype=torch.float32,
                                                                     device=text.device)
    scale_ptr, bias_ptr, has_bias = _scalar_args(logit_scale, logit_bias)
    _siglip_loss_bwd_kernel[shape["grid"]](
        text, image, scale_ptr, bias_ptr, coef, out,
        M, N, D, *text.stride(), *image.stride(), shape["split_rows"], label_offset,
        HAS_BIAS=has_bias, POSITIVES=positives, ONE_SPLIT=one_split, DOT_PRECISION=shape["DOT_PRECISION"],
        BLOCK_M=shape["outer"], BLOCK_N=shape["inner"], BLOCK_K=shape["BLOCK_K"], BLOCK_DV=shape["BLOCK_DV"],
        num_warps=shape["num_warps"], num_stages=shape["num_stages"],
    )
    return out if one_split else (out.sum(0) * coef).to(text.dtype)
