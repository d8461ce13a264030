"""Triton kernels and traffic formulas behind fastssl.ops.info_nce (see that module for the math)
and, with their CLIP flags, fastssl.ops.clip_loss; their tiles and launch shapes are in
_info_nce_tiles.py, their launchers in _info_nce_launchers.py. Imported only where triton is
installed: without it the reference runs."""

import triton
import triton.language as tl

from fastssl.ops._info_nce_tiles import _CONFIGS, _configs
from fastssl.ops._tiles import chunked_dot, program_tiles, row_block
from fastssl.ops._traffic import whole

_EPS = 1e-12  # F.normalize's clamp on the norm
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _kept_tile(p_ptr, outer, outer_ok, stream, stream_ok, stream_rows):
    """Addresses and mask of a tile of the KEEP_P scratch [outer rows, stream_rows], made where they
    are used: a tile of 64-bit addresses held across the logits would cost registers."""
    return (p_ptr + outer.to(tl.int64)[:, None] * stream_rows + stream[None, :],
            outer_ok[:, None] & stream_ok[None, :])


@triton.jit(do_not_specialize=["label_offset"])
def _info_nce_fwd_kernel(
    q_ptr, x_ptr, q_norm_ptr, x_norm_ptr, m_ptr, l_ptr, acc_ptr, col_m_ptr, col_l_ptr,
    N, X_ROWS, D, stride_q, stride_qd, stride_x, stride_xd, split_cols, label_offset, scale2,
    SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, COMPUTE_DQ: tl.constexpr, EXCLUDE_SELF: tl.constexpr,
    COLUMN_STATS: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    p_ptr=None, alpha_ptr=None, KEEP_P: tl.constexpr = False,
):
    """Partial online LSE (and Σ p·x̂ over columns [pid_d·BLOCK_DV, +BLOCK_DV)) of BLOCK_N queries
    over one split of the streamed rows x. ONE_CHUNK (BLOCK_K = BLOCK_DV >= D): the query tile
    stays in registers and each x tile serves both dots; otherwise the logits are summed over
    D in BLOCK_K chunks reloaded from cache, which keeps registers bounded for any D.
    KEEP_P (COMPUTE_DQ, D > BLOCK_DV): one program covers every BLOCK_DV chunk of the accumulator
    in turn; the first pass computes each logits tile once and keeps its p (in q's dtype, as the
    dot takes it) and its rescale α in the scratch p_ptr [N, X_ROWS] and alpha_ptr [N, x tiles],
    which the later passes replay instead of recomputing the logits (without it, each chunk is a
    program of its own that recomputes them).
    EXCLUDE_SELF (NT-Xent): column rows + label_offset, the query's own row among the keys, is
    left out of the softmax. COLUMN_STATS (CLIP's other direction, same sweep): each streamed
    row's (max, Σ 2^(s − max)) over this program's queries, at [pid_n, column]."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    pid_d = tl.program_id(2)
    dtype = q_ptr.dtype.element_ty  # x (e.g. an fp32 queue) is converted to it on load
    rows, row_ok, dims_v, _, start, end = program_tiles(N, D, split_cols, X_ROWS, BLOCK_N, BLOCK_DV)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_q
    dims_k = tl.arange(0, BLOCK_K)
    if ONE_CHUNK:
        q = tl.load(q_rows + dims_k[None, :] * stride_qd, mask=row_ok[:, None] & (dims_k < D)[None, :], other=0.0)
    # Logits in base 2: s2 = q·x · (log2(e)/T) / (‖q‖‖x‖), scaled after the dot so the
    # tensor cores see the raw (e.g. bf16) rows.
    row_scale = tl.zeros([BLOCK_N], tl.float32) + scale2
    if SCALE_ROWS:
        row_scale = scale2 / tl.maximum(tl.load(q_norm_ptr + rows, mask=row_ok, other=1.0), EPS)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    # KEEP_P: pass 0 computes each logits tile once and keeps its p and α, pass c + 1 accumulates D chunk c
    passes = tl.cdiv(D, BLOCK_DV) + 1 if KEEP_P else 1
    for d_pass in range(passes):
        if KEEP_P:
            logits_pass, dot_pass = d_pass == 0, d_pass > 0
            dims = dims_v + (d_pass - 1) * BLOCK_DV
        else:
            logits_pass: tl.constexpr = True  # static: one pass does both
            dot_pass: tl.constexpr = True
            dims = dims_v
        dims_ok = dims < D
        acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for col0 in range(start, end, BLOCK_M):
            cols, col_ok, x_rows = row_block(x_ptr, col0, end, stride_x, BLOCK_M)
            if KEEP_P:
                alpha_at = alpha_ptr + rows.to(tl.int64) * tl.cdiv(X_ROWS, BLOCK_M) + col0 // BLOCK_M
            if logits_pass:
                if ONE_CHUNK:
                    x = tl.load(x_rows + dims[None, :] * stride_xd, mask=col_ok[:, None] & dims_ok[None, :],
                                other=0.0).to(dtype)
                    s = tl.dot(q, tl.trans(x), input_precision=DOT_PRECISION)
                else:
                    s = chunked_dot(q_rows, row_ok, stride_qd, x_rows, col_ok, stride_xd, D, BLOCK_K, DOT_PRECISION)
                s = s * row_scale[:, None]
                if SCALE_COLS:
                    col_inv = 1.0 / tl.maximum(tl.load(x_norm_ptr + cols, mask=col_ok, other=1.0), EPS)
                    s = s * col_inv[None, :]
                s = tl.where(col_ok[None, :], s, float("-inf"))
                if EXCLUDE_SELF:
                    s = tl.where(cols[None, :] == rows[:, None] + label_offset, float("-inf"), s)
                if COLUMN_STATS:
                    s_col = tl.where(row_ok[:, None], s, float("-inf"))
                    c_max = tl.max(s_col, 0)
                    tile = pid_n.to(tl.int64) * X_ROWS + cols
                    tl.store(col_m_ptr + tile, c_max, mask=col_ok & (pid_d == 0))
                    tl.store(col_l_ptr + tile, tl.sum(tl.exp2(s_col - c_max[None, :]), 0),
                             mask=col_ok & (pid_d == 0))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                # a split whose only column so far is the row's own keeps m at -inf (-inf - -inf is NaN)
                m_exp = tl.where(m_new == float("-inf"), 0.0, m_new) if EXCLUDE_SELF else m_new
                alpha = tl.exp2(m_i - m_exp)
                p = tl.exp2(s - m_exp[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                m_i = m_new
                if SCALE_COLS:
                    p = p * col_inv[None, :]  # Σ p_ij x̂_j with x̂_j = x_j/‖x_j‖
                p = p.to(dtype)
                if KEEP_P:
                    kept, kept_ok = _kept_tile(p_ptr, rows, row_ok, cols, col_ok, X_ROWS)
                    tl.store(kept, p, mask=kept_ok)
                    tl.store(alpha_at, alpha, mask=row_ok)
            if COMPUTE_DQ:
                if dot_pass:
                    if KEEP_P:
                        kept, kept_ok = _kept_tile(p_ptr, rows, row_ok, cols, col_ok, X_ROWS)
                        p = tl.load(kept, mask=kept_ok, other=0.0)
                        alpha = tl.load(alpha_at, mask=row_ok, other=1.0)
                    if not ONE_CHUNK:
                        x = tl.load(x_rows + dims[None, :] * stride_xd, mask=col_ok[:, None] & dims_ok[None, :],
                                    other=0.0).to(dtype)
                    acc = acc * alpha[:, None] + tl.dot(p, x, input_precision=DOT_PRECISION)
        if COMPUTE_DQ:
            if dot_pass:
                part = split.to(tl.int64) * N + rows
                tl.store(acc_ptr + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dims_ok[None, :])
        if KEEP_P:
            tl.debug_barrier()  # pass 0's p and α, stored by other threads, before they are read
    part = split.to(tl.int64) * N + rows
    tl.store(m_ptr + part, m_i, mask=row_ok & (pid_d == 0))
    tl.store(l_ptr + part, l_i, mask=row_ok & (pid_d == 0))


@triton.jit(do_not_specialize=["num_splits", "label_offset"])
def _info_nce_combine_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, m_ptr, l_ptr, acc_ptr,
    loss_ptr, lse2_ptr, dq_ptr, dk_ptr,
    N, D, stride_q, stride_qd, stride_k, stride_kd, num_splits, label_offset, scale2, inv_temperature,
    HAS_QUEUE: tl.constexpr, NORMALIZE: tl.constexpr, COMPUTE_DQ: tl.constexpr, COMPUTE_DK: tl.constexpr,
    EXCLUDE_SELF: tl.constexpr, EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits' partials; add the positive column (queue form); write loss, lse2 and the
    per-row gradient directions dq (dk for the queue form). EXCLUDE_SELF: target = the other view."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    pos_rows = rows.to(tl.int64) + label_offset
    if EXCLUDE_SELF:  # the other view's key
        pos_rows += tl.where(rows < N // 2, N // 2, -(N // 2))
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * stride_q + dims[None, :] * stride_qd, mask=tile_ok,
                other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pos_rows[:, None] * stride_k + dims[None, :] * stride_kd, mask=tile_ok,
                other=0.0).to(tl.float32)
    q_inv = tl.zeros([BLOCK_N], tl.float32) + 1.0
    k_inv = tl.zeros([BLOCK_N], tl.float32) + 1.0
    if NORMALIZE:
        q_norm = tl.load(q_norm_ptr + rows, mask=row_ok, other=1.0)
        k_norm = tl.load(k_norm_ptr + pos_rows, mask=row_ok, other=1.0)
        q_inv = 1.0 / tl.maximum(q_norm, EPS)
        k_inv = 1.0 / tl.maximum(k_norm, EPS)
    qn = q * q_inv[:, None]
    kn = k * k_inv[:, None]
    # Same scaling order as the streamed logits, so the in-batch positive matches its column.
    pos2 = tl.sum(q * k, 1) * (scale2 * q_inv) * k_inv

    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for split in range(num_splits):
        part = split * N + rows.to(tl.int64)
        m_s = tl.load(m_ptr + part, mask=row_ok, other=0.0)
        l_s = tl.load(l_ptr + part, mask=row_ok, other=1.0)  # padded rows stay finite
        m_new = tl.maximum(m_i, m_s)
        m_exp = tl.where(m_new == float("-inf"), 0.0, m_new) if EXCLUDE_SELF else m_new  # as in the forward
        alpha = tl.exp2(m_i - m_exp)
        beta = tl.exp2(m_s - m_exp)
        l_i = l_i * alpha + l_s * beta
        if COMPUTE_DQ:
            acc_s = tl.load(acc_ptr + part[:, None] * D + dims[None, :], mask=tile_ok, other=0.0)
            acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m_i = m_new
    if HAS_QUEUE:
        m_new = tl.maximum(m_i, pos2)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(pos2 - m_new)
        l_i = l_i * alpha + beta
        if COMPUTE_DQ:
            acc = acc * alpha[:, None] + kn * beta[:, None]
        m_i = m_new
    lse2 = m_i + tl.log2(l_i)
    tl.store(loss_ptr + rows, (lse2 - pos2) * 0.6931471805599453, mask=row_ok)
    # Kept in base 2: a conversion would cost an ulp of lse, which the backward's exp2 amplifies
    # when logits are large (unnormalized inputs at small T).
    tl.store(lse2_ptr + rows, lse2, mask=row_ok)
    if COMPUTE_DQ:
        # ∂loss_i/∂q̂_i = (Σ_j p_ij x̂_j − k̂_pos) / T, then through q̂ = q/max(‖q‖, eps):
        # (I − q̂q̂ᵀ)/‖q‖, or plain 1/eps where the clamp is active.
        dqn = (acc / l_i[:, None] - kn) * inv_temperature
        if NORMALIZE:
            proj = tl.where(q_norm > EPS, tl.sum(qn * dqn, 1), 0.0)
            dqn = (dqn - qn * proj[:, None]) * q_inv[:, None]
        tl.store(dq_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], dqn, mask=tile_ok)
    if COMPUTE_DK:
        # Queue form only: k_i appears in row i's positive logit alone, ∂loss_i/∂k̂_i = (p_i0 − 1) q̂_i / T.
        p_pos = tl.exp2(pos2 - lse2)
        dkn = qn * ((p_pos - 1.0) * inv_temperature)[:, None]
        if NORMALIZE:
            proj = tl.where(k_norm > EPS, tl.sum(kn * dkn, 1), 0.0)
            dkn = (dkn - kn * proj[:, None]) * k_inv[:, None]
        tl.store(dk_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], dkn, mask=tile_ok)


@triton.jit
def _key_grad_direction(acc, q_ptr, q_norm_ptr, grad_ptr, outer_weight_ptr, weight_scale, keys, key_ok, dims, dims_ok,
                        N, stride_q, stride_qd, label_offset, inv_temperature, NORMALIZE: tl.constexpr,
                        EXCLUDE_SELF: tl.constexpr, OUTER_LSE: tl.constexpr, EPS: tl.constexpr):
    """∂loss/∂k̂_j from the whole Σ_i w_i p_ij q_i: times weight_scale/T, less the target term (key j
    is the target of query j − label_offset, if that query exists; OUTER_LSE: the key's own
    direction's too, outer_grad_j q_i, outer_grad_j = outer_weight_j · weight_scale)."""
    rows = keys.to(tl.int64) - label_offset
    has_row = key_ok & (rows >= 0) & (rows < N)
    if EXCLUDE_SELF:  # key j is the target of its other view's query
        rows = tl.where(rows < N // 2, rows + N // 2, rows - N // 2)
    q = tl.load(q_ptr + rows[:, None] * stride_q + dims[None, :] * stride_qd, mask=has_row[:, None] & dims_ok[None, :],
                other=0.0).to(tl.float32)
    coef = tl.load(grad_ptr + rows, mask=has_row, other=0.0) * inv_temperature
    if OUTER_LSE:
        coef += tl.load(outer_weight_ptr + keys, mask=has_row, other=0.0) * (weight_scale * inv_temperature)
    if NORMALIZE:
        coef = coef / tl.maximum(tl.load(q_norm_ptr + rows, mask=has_row, other=1.0), EPS)
    return acc * (weight_scale * inv_temperature) - q * coef[:, None]


@triton.jit(do_not_specialize=["label_offset"])
def _info_nce_bwd_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, lse2_ptr, weight_ptr, outer_lse2_ptr, outer_weight_ptr, part_ptr,
    N, M, D, stride_q, stride_qd, stride_k, stride_kd, split_rows, label_offset, scale2,
    NORMALIZE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, OUTER_LSE: tl.constexpr, EPS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ONE_CHUNK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
    p_ptr=None, grad_ptr=None, weight_scale_ptr=None, dk_ptr=None, inv_temperature=None, KEEP_P: tl.constexpr = False,
    DIRECT: tl.constexpr = False,
):
    """In-batch key gradient, one split of the queries, columns [pid_d·BLOCK_DV, +BLOCK_DV):
    Σ_i w_i p_ij q_i for BLOCK_M keys, with w_i = g_i/‖q_i‖ / max_i' |g_i'/‖q_i'‖| (the combine
    multiplies back the scale and 1/T) and p_ij = 2^(l_ij·log2(e) − lse2_i) recomputed from the
    saved base-2 lse. OUTER_LSE (CLIP, normalize=False): p_ij gains the key's own softmax term
    2^(l_ij·log2(e) − outer_lse2_j) · outer_weight_j. ONE_CHUNK, BLOCK_K and KEEP_P (the weighted
    p kept in p_ptr [M, N] by the first pass over the D chunks, replayed by the others) as in the forward.
    DIRECT (one split, normalize=False): the sum is whole, so the program finishes the gradient as
    the combine does and stores it in dk_ptr (the key's dtype), with no fp32 partials."""
    split = tl.program_id(1)
    dtype = k_ptr.dtype.element_ty
    keys, key_ok, dims_v, _, start, end = program_tiles(M, D, split_rows, N, BLOCK_M, BLOCK_DV)
    k_rows = k_ptr + keys.to(tl.int64)[:, None] * stride_k
    dims_k = tl.arange(0, BLOCK_K)
    if ONE_CHUNK:
        k = tl.load(k_rows + dims_k[None, :] * stride_kd, mask=key_ok[:, None] & (dims_k < D)[None, :], other=0.0)
    k_inv = tl.zeros([BLOCK_M], tl.float32) + 1.0
    if NORMALIZE:
        k_inv = 1.0 / tl.maximum(tl.load(k_norm_ptr + keys, mask=key_ok, other=1.0), EPS)
    if OUTER_LSE:
        outer_lse2 = tl.load(outer_lse2_ptr + keys, mask=key_ok, other=float("inf"))
        outer_weight = tl.load(outer_weight_ptr + keys, mask=key_ok, other=0.0)
    passes = tl.cdiv(D, BLOCK_DV) + 1 if KEEP_P else 1  # as in the forward
    for d_pass in range(passes):
        if KEEP_P:
            logits_pass, dot_pass = d_pass == 0, d_pass > 0
            dims = dims_v + (d_pass - 1) * BLOCK_DV
        else:
            logits_pass: tl.constexpr = True
            dot_pass: tl.constexpr = True
            dims = dims_v
        dims_ok = dims < D
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for row0 in range(start, end, BLOCK_N):
            rows, row_ok, q_rows = row_block(q_ptr, row0, end, stride_q, BLOCK_N)
            if logits_pass:
                if ONE_CHUNK:
                    q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_ok[:, None] & dims_ok[None, :],
                                other=0.0)
                    s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
                else:
                    s = chunked_dot(k_rows, key_ok, stride_kd, q_rows, row_ok, stride_qd, D, BLOCK_K, DOT_PRECISION)
                    if not KEEP_P:  # loaded before p is made, as its dot needs it next (fewer registers)
                        q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_ok[:, None] & dims_ok[None, :],
                                    other=0.0)
                row_scale = tl.zeros([BLOCK_N], tl.float32) + scale2
                if NORMALIZE:
                    row_scale = scale2 / tl.maximum(tl.load(q_norm_ptr + rows, mask=row_ok, other=1.0), EPS)
                weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
                # +inf lse2 on padded rows makes their p exactly 0.
                lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=float("inf"))
                s = s * row_scale[None, :] * k_inv[:, None]
                p = tl.exp2(s - lse2[None, :]) * weight[None, :]
                if OUTER_LSE:  # padded query rows are zero vectors: their p multiplies nothing
                    p += tl.exp2(s - outer_lse2[:, None]) * outer_weight[:, None]
                if EXCLUDE_SELF:
                    p = tl.where(keys[:, None] == rows[None, :] + label_offset, 0.0, p)
                p = p.to(dtype)
                if KEEP_P:
                    kept, kept_ok = _kept_tile(p_ptr, keys, key_ok, rows, row_ok, N)
                    tl.store(kept, p, mask=kept_ok)
            if dot_pass:
                if KEEP_P:
                    kept, kept_ok = _kept_tile(p_ptr, keys, key_ok, rows, row_ok, N)
                    p = tl.load(kept, mask=kept_ok, other=0.0)
                    q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_ok[:, None] & dims_ok[None, :],
                                other=0.0)
                acc += tl.dot(p, q, input_precision=DOT_PRECISION)
        if dot_pass:
            tile_ok = key_ok[:, None] & dims_ok[None, :]
            if DIRECT:
                dk = _key_grad_direction(acc, q_ptr, q_norm_ptr, grad_ptr, outer_weight_ptr, tl.load(weight_scale_ptr),
                                         keys, key_ok, dims, dims_ok, N, stride_q, stride_qd, label_offset,
                                         inv_temperature, NORMALIZE, EXCLUDE_SELF, OUTER_LSE, EPS)
                tl.store(dk_ptr + keys.to(tl.int64)[:, None] * D + dims[None, :], dk, mask=tile_ok)
            else:
                tl.store(part_ptr + (split.to(tl.int64) * M + keys)[:, None] * D + dims[None, :], acc, mask=tile_ok)
        if KEEP_P:
            tl.debug_barrier()  # pass 0's p, stored by other threads, before it is read


@triton.jit(do_not_specialize=["num_splits", "label_offset"])
def _info_nce_bwd_combine_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, grad_ptr, outer_weight_ptr, weight_scale_ptr, part_ptr, dk_ptr,
    N, M, D, stride_q, stride_qd, stride_k, stride_kd, num_splits, label_offset, inv_temperature,
    NORMALIZE: tl.constexpr, EXCLUDE_SELF: tl.constexpr, OUTER_LSE: tl.constexpr, EPS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sum the key-gradient splits, subtract the target term (_key_grad_direction), apply the normalization backward."""
    keys = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < M
    dim_ok = dims < D
    tile_ok = key_ok[:, None] & dim_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(num_splits):
        part = split * M + keys.to(tl.int64)
        acc += tl.load(part_ptr + part[:, None] * D + dims[None, :], mask=tile_ok, other=0.0)
    dkn = _key_grad_direction(acc, q_ptr, q_norm_ptr, grad_ptr, outer_weight_ptr, tl.load(weight_scale_ptr), keys,
                              key_ok, dims, dim_ok, N, stride_q, stride_qd, label_offset, inv_temperature,
                              NORMALIZE, EXCLUDE_SELF, OUTER_LSE, EPS)
    if NORMALIZE:
        k = tl.load(k_ptr + keys.to(tl.int64)[:, None] * stride_k + dims[None, :] * stride_kd, mask=tile_ok,
                    other=0.0).to(tl.float32)
        k_norm = tl.load(k_norm_ptr + keys, mask=key_ok, other=1.0)
        k_inv = 1.0 / tl.maximum(k_norm, EPS)
        kn = k * k_inv[:, None]
        proj = tl.where(k_norm > EPS, tl.sum(kn * dkn, 1), 0.0)
        dkn = (dkn - kn * proj[:, None]) * k_inv[:, None]
    tl.store(dk_ptr + keys.to(tl.int64)[:, None] * D + dims[None, :], dkn, mask=tile_ok)


_FWD_KEY = ["BLOCK_K", "BLOCK_DV", "ONE_CHUNK", "SCALE_ROWS", "SCALE_COLS", "COMPUTE_DQ", "EXCLUDE_SELF",
            "COLUMN_STATS", "DOT_PRECISION", "KEEP_P"]
_BWD_KEY = ["BLOCK_K", "BLOCK_DV", "ONE_CHUNK", "NORMALIZE", "EXCLUDE_SELF", "OUTER_LSE", "DOT_PRECISION", "KEEP_P",
            "DIRECT"]
_fwd_tuned = {p: triton.autotune(_configs(p, "BLOCK_N"), key=_FWD_KEY)(_info_nce_fwd_kernel) for p in _CONFIGS}
_bwd_tuned = {p: triton.autotune(_configs(p, "BLOCK_M"), key=_BWD_KEY)(_info_nce_bwd_kernel) for p in _CONFIGS}


# ----------------------------------------------------------------------------- traffic (fastssl.ops._traffic):
# each kernel reads the tensors named here whole and writes the outputs named here whole


def _norms(a: dict) -> tuple[str, ...]:
    return ("q_norm_ptr", "k_norm_ptr") * a["NORMALIZE"]


def _combine_traffic(a: dict) -> tuple[int, int, int]:
    """The keys (and their norms) are read at the queries' positives only: N of them (of M >= N gathered)."""
    read, written = whole(a, ("q_ptr", "m_ptr", "l_ptr", "acc_ptr") + _norms(a)[:1],
                          ("loss_ptr", "lse2_ptr", "dq_ptr", "dk_ptr"))
    N, (_, D), size = a["q_ptr"].shape[0], a["k_ptr"].shape, a["k_ptr"].itemsize
    return read + N * D * size + N * 4 * a["NORMALIZE"], written, 0


def _matmul_flops(a: dict, matmuls: int) -> int:
    """matmuls x 2 N K D (the logits tile, p @ streamed rows or its backward); one logits tile per
    BLOCK_DV-column program, each recomputing it (one program without the forward's accumulator,
    or with KEEP_P, whose later chunks replay the kept p)."""
    chunks = a.get("COMPUTE_DQ", True) and not a.get("KEEP_P", False)
    d_programs = -(-a["D"] // a["BLOCK_DV"]) if chunks else 1
    rows = a["k_ptr" if "k_ptr" in a else "x_ptr"].shape[0]
    return (d_programs + matmuls) * 2 * a["q_ptr"].shape[0] * rows * a["D"]


_KEPT = ("p_ptr", "alpha_ptr")  # the KEEP_P scratch, written once and read back (absent without it: 0 bytes)


def _fwd_traffic(a: dict) -> tuple[int, int, int]:
    reads = ("q_ptr", "x_ptr") + ("q_norm_ptr",) * a["SCALE_ROWS"] + ("x_norm_ptr",) * a["SCALE_COLS"] + _KEPT
    writes = ("m_ptr", "l_ptr", "acc_ptr", "col_m_ptr", "col_l_ptr") + _KEPT
    return *whole(a, reads, writes), _matmul_flops(a, int(a["COMPUTE_DQ"]))


def _targeted(a: dict) -> int:
    """The queries whose target is one of this launch's keys (all N but in a band of keys): the key
    gradient's target term reads their rows (query, gradient, norm, the key's outer weight) only."""
    N, M, offset = a["q_ptr"].shape[0], a["k_ptr"].shape[0], a["label_offset"]
    return max(0, min(N, M - offset) - max(0, -offset))


def _bwd_traffic(a: dict) -> tuple[int, int, int]:
    reads = ("q_ptr", "k_ptr", "lse2_ptr", "weight_ptr", "p_ptr", "weight_scale_ptr") + _OUTER + _norms(a)
    read, written = whole(a, reads, ("part_ptr", "p_ptr", "dk_ptr"))
    direct_grad = _targeted(a) * 4 if hasattr(a.get("grad_ptr"), "numel") else 0  # absent without DIRECT
    return read + direct_grad, written, _matmul_flops(a, 1)


def _bwd_combine_traffic(a: dict) -> tuple[int, int, int]:
    """The keys themselves only for the normalization backward."""
    read, written = whole(a, ("weight_scale_ptr", "part_ptr") + ("k_ptr", "k_norm_ptr") * a["NORMALIZE"], ("dk_ptr",))
    q = a["q_ptr"]
    per_target = q.shape[1] * q.itemsize + 4 * (1 + a["NORMALIZE"] + a["OUTER_LSE"])
    return read + _targeted(a) * per_target, written, 0


_OUTER = ("outer_lse2_ptr", "outer_weight_ptr")  # empty without OUTER_LSE: 0 bytes

KERNEL_TRAFFIC = {
    "_info_nce_combine_kernel": _combine_traffic,
    "_info_nce_bwd_combine_kernel": _bwd_combine_traffic,
    "_info_nce_fwd_kernel": _fwd_traffic,
    "_info_nce_bwd_kernel": _bwd_traffic,
}
