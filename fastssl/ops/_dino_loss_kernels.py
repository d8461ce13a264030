"""Triton kernels, launchers and traffic formulas behind fastssl.ops.dino_loss and
fastssl.ops.ibot_patch_loss (see those modules for the math).

Imported only where triton is installed: fastssl.ops.dino_loss runs its reference without it."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastssl.ops._traffic import nbytes

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _row_start(rows_ptr, row, stride, token_stride, n_tokens, GATHER_ROWS: tl.constexpr):
    """Element offset of logical row `row`: row * stride, or, gathering, that of token rows_ptr[row]
    (a flat index b * n_tokens + l) of a [B, n_tokens, K] tensor with strides (stride, token_stride)."""
    if GATHER_ROWS:
        token = tl.load(rows_ptr + row)
        start = (token // n_tokens) * stride + (token % n_tokens) * token_stride
    else:
        start = row * stride
    return start


@triton.jit
def _target_prob(t_ptr, start, offs, mask, center, norm, inv_tt, TARGET_IS_LOGITS: tl.constexpr):
    """p tile of the target row at `start`, given its normaliser (lse of the logits, or log of the
    weight sum)."""
    t = tl.load(t_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
    if TARGET_IS_LOGITS:
        p = tl.exp((t - center) * inv_tt - norm)
    else:
        p = t * tl.exp(-norm)
    return tl.where(mask, p, 0.0)

@triton.jit
def _dino_loss_fwd_kernel(
    s_ptr, t_ptr, c_ptr, rows_ptr, s_stats_ptr, t_stats_ptr, t_sum_ptr,
    B, K, V, G, n_tiles, samples_per_group, s_stride, s_token_stride, s_tokens, t_stride, t_token_stride,
    t_tokens, t_rows_offset, inv_ts, inv_tt,
    BLOCK_K: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, EXCLUDE_SAME: tl.constexpr,
    WITH_TARGET_SUM: tl.constexpr, GATHER_ROWS: tl.constexpr,
):
    """Per (K-tile, group of samples): tile statistics of every student and target row, relative to
    the tile's max (see the module docstring), and the group's column sum of the target rows.

    Traffic (distinct bytes): loads each student and target element once (the exclude-same term
    re-reads student rows the program has just loaded: cache hits), the center and, gathering,
    the row table; stores
    2 (V*B) + (3 or 4) (G*B) fp32 per tile, and n_groups * K fp32 column sums."""
    tile = tl.program_id(0)
    group = tl.program_id(1)
    offs = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    # rows * K can pass 2^31 (1536 rows x 2^21 prototypes); offsets stay small.
    offs = offs.to(tl.int64)
    if TARGET_IS_LOGITS:
        center = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    col_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
    s_plane = V * B * n_tiles
    t_plane = G * B * n_tiles
    b_start = group * samples_per_group
    b_end = tl.minimum(b_start + samples_per_group, B)
    for b in range(b_start, b_end):
        s_sum = tl.zeros([BLOCK_K], dtype=tl.float32)
        for v in range(V):
            row = (v * B + b).to(tl.int64)
            start = _row_start(rows_ptr, row, s_stride, s_token_stride, s_tokens, GATHER_ROWS)
            x = tl.load(s_ptr + start + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
            m = tl.max(tl.where(mask, x, float("-inf")), axis=0)
            z = tl.sum(tl.where(mask, tl.exp(x - m), 0.0), axis=0)
            tl.store(s_stats_ptr + row * n_tiles + tile, m)
            tl.store(s_stats_ptr + s_plane + row * n_tiles + tile, z)
            s_sum += x
        for i in range(G):
            row = (i * B + b).to(tl.int64)
            start = _row_start(rows_ptr + t_rows_offset, row, t_stride, t_token_stride, t_tokens, GATHER_ROWS)
            t = tl.load(t_ptr + start + offs, mask=mask, other=0.0).to(tl.float32)
            if WITH_TARGET_SUM:
                col_sum += t
            # e = p * (normaliser relative to this tile): exp(y - tile max) for logits, w for weights
            if TARGET_IS_LOGITS:
                y = (t - center) * inv_tt
                m = tl.max(tl.where(mask, y, float("-inf")), axis=0)
                e = tl.where(mask, tl.exp(y - m), 0.0)
            else:
                m = tl.max(tl.zeros([BLOCK_K], dtype=tl.float32), axis=0)
                e = t
            z = tl.sum(e, axis=0)
            a = tl.sum(e * s_sum, axis=0)
            idx = row * n_tiles + tile
            tl.store(t_stats_ptr + idx, m)
            tl.store(t_stats_ptr + t_plane + idx, z)
            tl.store(t_stats_ptr + 2 * t_plane + idx, a)
            if EXCLUDE_SAME:
                # student crop i is teacher crop i's own view: subtract <e, s_i> (a cache hit, just read)
                s_start = _row_start(rows_ptr, row, s_stride, s_token_stride, s_tokens, GATHER_ROWS)
                x_i = tl.load(s_ptr + s_start + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
                tl.store(t_stats_ptr + 3 * t_plane + idx, tl.sum(e * x_i, axis=0))
    if WITH_TARGET_SUM:
        tl.store(t_sum_ptr + group.to(tl.int64) * K + offs, col_sum, mask=mask)

@triton.jit
def _dino_loss_bwd_kernel(
    s_ptr, t_ptr, c_ptr, rows_ptr, w_ptr, lse_s_ptr, t_norm_ptr, g_ptr, ds_ptr,
    B, K, V, G, samples_per_group, s_stride, s_token_stride, s_tokens, t_stride, t_token_stride, t_tokens,
    t_rows_offset, inv_ts, inv_tt, grad_scale,
    BLOCK_K: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, EXCLUDE_SAME: tl.constexpr,
    GATHER_ROWS: tl.constexpr, ROW_WEIGHTS: tl.constexpr,
):
    """grad s_v for a (K-tile, group of samples), recomputing p_i from the target and its normaliser;
    with ROW_WEIGHTS, sample b's gradient is scaled by w[b].

    Traffic (distinct bytes): loads each student and target element once (p_v of the excluded
    pair re-reads a target row the program has just loaded: a cache hit), the center, the
    V*B + G*B fp32 normalisers, and the row table and weights when used; stores each gradient
    element once (contiguous in the student's shape: row r of [V*B, K], or, gathering, its token)."""
    tile = tl.program_id(0)
    group = tl.program_id(1)
    offs = tile * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    offs = offs.to(tl.int64)
    center = tl.zeros([BLOCK_K], dtype=tl.float32)
    if TARGET_IS_LOGITS:
        center = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr).to(tl.float32) * grad_scale
    b_start = group * samples_per_group
    b_end = tl.minimum(b_start + samples_per_group, B)
    for b in range(b_start, b_end):
        g_b = g
        if ROW_WEIGHTS:
            g_b = g * tl.load(w_ptr + b)
        p_all = tl.zeros([BLOCK_K], dtype=tl.float32)
        for i in range(G):
            row = (i * B + b).to(tl.int64)
            norm = tl.load(t_norm_ptr + row)
            start = _row_start(rows_ptr + t_rows_offset, row, t_stride, t_token_stride, t_tokens, GATHER_ROWS)
            p_all += _target_prob(t_ptr, start, offs, mask, center, norm, inv_tt, TARGET_IS_LOGITS)
        for v in range(V):
            row = (v * B + b).to(tl.int64)
            start = _row_start(rows_ptr, row, s_stride, s_token_stride, s_tokens, GATHER_ROWS)
            x = tl.load(s_ptr + start + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
            lse = tl.load(lse_s_ptr + row)
            q = p_all
            # a float32 tensor even when Triton specialises G == 1 to a constant, so both paths of
            # the runtime `if` below carry one type
            count = tl.zeros([], dtype=tl.float32) + G
            if EXCLUDE_SAME:
                if v < G:
                    norm_v = tl.load(t_norm_ptr + row)
                    t_start = _row_start(rows_ptr + t_rows_offset, row, t_stride, t_token_stride, t_tokens, GATHER_ROWS)
                    q = p_all - _target_prob(t_ptr, t_start, offs, mask, center, norm_v, inv_tt,
                                             TARGET_IS_LOGITS)
                    count = count - 1.0
            grad = (count * tl.exp(x - lse) - q) * g_b
            ds_row = row
            if GATHER_ROWS:
                ds_row = tl.load(rows_ptr + row)
            tl.store(ds_ptr + ds_row * K + offs, grad.to(ds_ptr.dtype.element_ty), mask=mask)

@triton.jit
def _dino_loss_merge_kernel(
    s_stats_ptr, t_stats_ptr, t_parts_ptr, w_ptr, lse_s_ptr, t_norm_ptr, loss_parts_ptr, t_sum_ptr,
    B, K, V, G, n_tiles, n_groups, n_s_blocks, n_t_blocks, loss_scale,
    BLOCK_ROWS: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_COLS: tl.constexpr,
    EXCLUDE_SAME: tl.constexpr, ROW_WEIGHTS: tl.constexpr,
):
    """Merge the forward's tiles in one launch; a program's role is set by its id:
    student rows -> lse_s and c_v * lse_s, target rows -> normaliser and -<p_i, S - s_i>, then
    column blocks -> the column sum of the groups' partials. Each row program writes its
    (scaled, and with ROW_WEIGHTS weighted by its sample's w[b]) share of the loss to
    loss_parts[pid], summed by one torch reduction: deterministic.

    Traffic: loads the forward's statistics, column partials and row weights once; stores (V + G) * B + K
    fp32 and one value per program."""
    pid = tl.program_id(0)
    tiles = tl.arange(0, BLOCK_TILES)
    tile_ok = tiles < n_tiles
    if pid < n_s_blocks:
        rows = pid * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < V * B
        ok = row_ok[:, None] & tile_ok[None, :]
        idx = rows.to(tl.int64)[:, None] * n_tiles + tiles[None, :]
        m = tl.load(s_stats_ptr + idx, mask=ok, other=float("-inf"))
        z = tl.load(s_stats_ptr + V * B * n_tiles + idx, mask=ok, other=0.0)
        m_row = tl.where(row_ok, tl.max(m, axis=1), 0.0)
        # padded rows get z = 1, not log(0)
        lse = m_row + tl.log(tl.where(row_ok, tl.sum(z * tl.exp(m - m_row[:, None]), axis=1), 1.0))
        tl.store(lse_s_ptr + rows, lse, mask=row_ok)
        # c_v: the number of target crops paired with student crop v
        count = tl.full([BLOCK_ROWS], G, tl.float32)
        if EXCLUDE_SAME:
            count = tl.where((rows // B) < G, count - 1.0, count)
        if ROW_WEIGHTS:
            count *= tl.load(w_ptr + rows % B, mask=row_ok, other=0.0)
        tl.store(loss_parts_ptr + pid, tl.sum(tl.where(row_ok, count * lse, 0.0), axis=0) * loss_scale)
    elif pid < n_s_blocks + n_t_blocks:
        rows = (pid - n_s_blocks) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        row_ok = rows < G * B
        ok = row_ok[:, None] & tile_ok[None, :]
        plane = G * B * n_tiles
        idx = rows.to(tl.int64)[:, None] * n_tiles + tiles[None, :]
        m = tl.load(t_stats_ptr + idx, mask=ok, other=float("-inf"))
        m_row = tl.where(row_ok, tl.max(m, axis=1), 0.0)
        w = tl.where(ok, tl.exp(m - m_row[:, None]), 0.0)
        z = tl.sum(w * tl.load(t_stats_ptr + plane + idx, mask=ok, other=0.0), axis=1)
        z = tl.where(row_ok, z, 1.0)
        a = w * tl.load(t_stats_ptr + 2 * plane + idx, mask=ok, other=0.0)
        if EXCLUDE_SAME:
            a -= w * tl.load(t_stats_ptr + 3 * plane + idx, mask=ok, other=0.0)
        tl.store(t_norm_ptr + rows, m_row + tl.log(z), mask=row_ok)
        dots = tl.where(row_ok, tl.sum(a, axis=1) / z, 0.0)
        if ROW_WEIGHTS:
            dots *= tl.load(w_ptr + rows % B, mask=row_ok, other=0.0)
        tl.store(loss_parts_ptr + pid, -tl.sum(dots, axis=0) * loss_scale)
    else:
        cols = (pid - n_s_blocks - n_t_blocks) * BLOCK_COLS + tl.arange(0, BLOCK_COLS)
        col_ok = cols < K
        col_sum = tl.zeros([BLOCK_COLS], dtype=tl.float32)
        part_ptrs = t_parts_ptr + cols  # advanced by K per group: 64-bit pointer arithmetic
        for _ in range(n_groups):
            col_sum += tl.load(part_ptrs, mask=col_ok, other=0.0)
            part_ptrs += K
        tl.store(t_sum_ptr + cols, col_sum, mask=col_ok)
        tl.store(loss_parts_ptr + pid, 0.0)


# ----------------------------------------------------------------------------- traffic (fastssl.ops._traffic)


def _fwd_traffic(a: dict) -> tuple[int, int, int]:
    rows_s, rows_t = a["V"] * a["B"], a["G"] * a["B"]
    read = (rows_s * a["K"] * a["s_ptr"].element_size() + rows_t * a["K"] * a["t_ptr"].element_size()
            + (a["K"] * a["c_ptr"].element_size() if a["TARGET_IS_LOGITS"] else 0)
            + (nbytes(a["rows_ptr"]) if a["GATHER_ROWS"] else 0))
    written = nbytes(a["s_stats_ptr"], a["t_stats_ptr"]) + (nbytes(a["t_sum_ptr"]) if a["WITH_TARGET_SUM"] else 0)
    return read, written, 0


def _merge_traffic(a: dict) -> tuple[int, int, int]:
    weights = nbytes(a["w_ptr"]) if a["ROW_WEIGHTS"] else 0
    return (nbytes(a["s_stats_ptr"], a["t_stats_ptr"], a["t_parts_ptr"]) + weights,
            nbytes(a["lse_s_ptr"], a["t_norm_ptr"], a["t_sum_ptr"], a["loss_parts_ptr"]), 0)


def _bwd_traffic(a: dict) -> tuple[int, int, int]:
    rows_s, rows_t = a["V"] * a["B"], a["G"] * a["B"]
    read = (rows_s * a["K"] * a["s_ptr"].element_size() + rows_t * a["K"] * a["t_ptr"].element_size()
            + (a["K"] * a["c_ptr"].element_size() if a["TARGET_IS_LOGITS"] else 0)
            + nbytes(a["lse_s_ptr"], a["t_norm_ptr"]) + a["g_ptr"].element_size()
            + (nbytes(a["rows_ptr"]) if a["GATHER_ROWS"] else 0)
            + (nbytes(a["w_ptr"]) if a["ROW_WEIGHTS"] else 0))
    return read, rows_s * a["K"] * a["ds_ptr"].element_size(), 0


KERNEL_TRAFFIC = {
    "_dino_loss_fwd_kernel": _fwd_traffic,
    "_dino_loss_merge_kernel": _merge_traffic,
    "_dino_loss_bwd_kernel": _bwd_traffic,
}


# ----------------------------------------------------------------------------- launchers


def _launch_shape(K: int, B: int, elem_bytes: int) -> tuple[int, int, int, int]:
    """(BLOCK_K, n_tiles, samples_per_group, num_warps). Row tiles of 4 KB (2048 columns of 16-bit,
    1024 of fp32) read by 8 warps: 16-byte loads, 8 or 4 values per thread, and each tile's two
    reductions stay cheap next to its loads; fp32 gets the narrower tile because a thread holds
    its loads as fp32 beside the center, the student sum and the column sum (ptxas, triton 3.6,
    sm_100: 2048 fp32 columns on 8 warps spill). Samples are split into groups so that ~1k
    programs fill a GPU even for small B. Not tuned on a GPU yet."""
    block_k = min(4096 // elem_bytes, triton.next_power_of_2(K))
    n_tiles = triton.cdiv(K, block_k)
    n_groups = max(1, min(B, triton.cdiv(1024, n_tiles)))
    return block_k, n_tiles, triton.cdiv(B, n_groups), 8 if block_k * elem_bytes >= 4096 else 4


def _n_pairs(n_crops: int, n_targets: int, exclude_same: bool) -> int:
    return n_targets * (n_crops - 1) if exclude_same else n_targets * n_crops


def _unit_last_dim(x: Tensor) -> Tensor:
    """x itself when its rows are unit-stride (the kernels take the row stride), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _token_layout(x: Tensor) -> tuple[int, int, int]:
    """(stride, token_stride, n_tokens) by which the kernels address x's rows: [R, K] rows are
    tokens of a one-token image, [B, L, K] are L tokens per image."""
    return (x.stride(0), x.stride(1), x.shape[1]) if x.ndim == 3 else (x.stride(0), 0, 1)


def _merge_shape(n_tiles: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_TILES, BLOCK_COLS) of the merge kernel: ~4K statistics per program."""
    block_tiles = triton.next_power_of_2(n_tiles)
    return max(1, 4096 // block_tiles), block_tiles, 1024


def _rows_and_weights(student: Tensor, n_crops: int, student_rows: Tensor | None, target_rows: Tensor | None,
                      row_weight: Tensor | None) -> tuple[int, Tensor, int, Tensor]:
    """(B, the row table, where its target rows start, the weights) as the kernels take them: one
    table when student and target gather the same rows, else the two stacked; empty tensors stand
    for the inputs a flag switches off."""
    B = row_weight.numel() if row_weight is not None else student.shape[0] // n_crops
    weights = row_weight if row_weight is not None else student.new_empty(0, dtype=torch.float32)
    if student_rows is None:
        return B, student.new_empty(0, dtype=torch.int64), 0, weights
    if target_rows is student_rows:
        return B, student_rows, 0, weights
    return B, torch.cat([student_rows, target_rows]), student_rows.numel(), weights


def dino_loss_fwd(
    student: Tensor, target: Tensor, center: Tensor, *, n_crops: int, n_targets: int, student_temp: float,
    target_temp: float, target_is_logits: bool, exclude_same: bool, with_target_sum: bool,
    student_rows: Tensor | None = None, target_rows: Tensor | None = None, row_weight: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward and merge kernels. Returns (loss, lse of student/tau_s per row [n_crops*B],
    normaliser per target row [n_targets*B], column sum of the target rows [K] or [0]).

    Row-block layout: B = rows // n_crops samples. iBOT's layout (n_crops = n_targets = 1):
    row_weight [B] fp32 weighs sample b's term (the loss is then sum_b w_b * CE_b / n_pairs, B =
    row_weight.numel(), only the first B rows of a [R, K] input read), and student_rows /
    target_rows [B] int64 (both or neither; the same tensor is read once) gather the B rows as flat token indices b * L + l of
    [B_img, L, K] (or row indices of [R, K]) inputs, read through their strides."""
    student, target = _unit_last_dim(student), _unit_last_dim(target)
    K = student.shape[-1]
    B, rows, t_rows_offset, weights = _rows_and_weights(student, n_crops, student_rows, target_rows, row_weight)
    block_k, n_tiles, per_group, num_warps = _launch_shape(
        K, B, max(student.element_size(), target.element_size()))
    n_groups = triton.cdiv(B, per_group)
    f32 = dict(device=student.device, dtype=torch.float32)
    s_stats = torch.empty(2, n_crops * B, n_tiles, **f32)
    t_stats = torch.empty(4 if exclude_same else 3, n_targets * B, n_tiles, **f32)
    t_parts = torch.empty(n_groups if with_target_sum else 0, K, **f32)
    s_stride, s_token_stride, s_tokens = _token_layout(student)
    t_stride, t_token_stride, t_tokens = _token_layout(target)
    _dino_loss_fwd_kernel[(n_tiles, n_groups)](
        student, target, center, rows, s_stats, t_stats, t_parts,
        B, K, n_crops, n_targets, n_tiles, per_group, s_stride, s_token_stride, s_tokens,
        t_stride, t_token_stride, t_tokens, t_rows_offset, 1.0 / student_temp, 1.0 / target_temp,
        BLOCK_K=block_k, TARGET_IS_LOGITS=target_is_logits, EXCLUDE_SAME=exclude_same,
        WITH_TARGET_SUM=with_target_sum, GATHER_ROWS=student_rows is not None, num_warps=num_warps,
    )
    block_rows, block_tiles, block_cols = _merge_shape(n_tiles)
    n_s_blocks = triton.cdiv(n_crops * B, block_rows)
    n_t_blocks = triton.cdiv(n_targets * B, block_rows)
    n_programs = n_s_blocks + n_t_blocks + (triton.cdiv(K, block_cols) if with_target_sum else 0)
    lse_s = torch.empty(n_crops * B, **f32)
    norm_t = torch.empty(n_targets * B, **f32)
    loss_parts = torch.empty(n_programs, **f32)
    t_sum = torch.empty(K if with_target_sum else 0, **f32)
    n_pairs = _n_pairs(n_crops, n_targets, exclude_same)
    _dino_loss_merge_kernel[(n_programs,)](
        s_stats, t_stats, t_parts, weights, lse_s, norm_t, loss_parts, t_sum,
        B, K, n_crops, n_targets, n_tiles, n_groups, n_s_blocks, n_t_blocks,
        1.0 / (n_pairs if row_weight is not None else n_pairs * B),
        BLOCK_ROWS=block_rows, BLOCK_TILES=block_tiles, BLOCK_COLS=block_cols, EXCLUDE_SAME=exclude_same,
        ROW_WEIGHTS=row_weight is not None,
    )
    loss = loss_parts.sum()
    out_dtype = torch.promote_types(student.dtype, torch.float32)
    return loss.to(out_dtype), lse_s, norm_t, t_sum


def dino_loss_bwd(
    grad: Tensor, student: Tensor, target: Tensor, center: Tensor, lse_s: Tensor, norm_t: Tensor, *,
    n_crops: int, n_targets: int, student_temp: float, target_temp: float, target_is_logits: bool,
    exclude_same: bool, student_rows: Tensor | None = None, target_rows: Tensor | None = None,
    row_weight: Tensor | None = None,
) -> Tensor:
    """Launch the backward kernel: d loss / d student, contiguous in the student's shape and dtype
    (zero on the rows the loss does not read)."""
    # grad may be a stride-0 expanded view of a scalar: the kernel reads one value from its pointer
    student, target = _unit_last_dim(student), _unit_last_dim(target)
    K = student.shape[-1]
    B, rows, t_rows_offset, weights = _rows_and_weights(student, n_crops, student_rows, target_rows, row_weight)
    block_k, n_tiles, per_group, num_warps = _launch_shape(
        K, B, max(student.element_size(), target.element_size()))
    reads_all = student_rows is None and student.shape[0] == n_crops * B
    grad_student = student.new_empty(student.shape) if reads_all else student.new_zeros(student.shape)
    n_pairs = _n_pairs(n_crops, n_targets, exclude_same)
    scale = 1.0 / (student_temp * (n_pairs if row_weight is not None else n_pairs * B))
    s_stride, s_token_stride, s_tokens = _token_layout(student)
    t_stride, t_token_stride, t_tokens = _token_layout(target)
    _dino_loss_bwd_kernel[(n_tiles, triton.cdiv(B, per_group))](
        student, target, center, rows, weights, lse_s, norm_t, grad, grad_student,
        B, K, n_crops, n_targets, per_group, s_stride, s_token_stride, s_tokens, t_stride, t_token_stride,
        t_tokens, t_rows_offset, 1.0 / student_temp, 1.0 / target_temp, scale,
        BLOCK_K=block_k, TARGET_IS_LOGITS=target_is_logits, EXCLUDE_SAME=exclude_same,
        GATHER_ROWS=student_rows is not None, ROW_WEIGHTS=row_weight is not None, num_warps=num_warps,
    )
    return grad_student
