"""Triton kernels, launchers and traffic formulas behind fastssl.ops.info_nce (see that module
for the math) and, with their CLIP flags, fastssl.ops.clip_loss; their tiles and launch shapes are in
_info_nce_tiles.py, the kernels that merge the splits' partials in _info_nce_combine_kernels.py. Imported only where triton is installed: without it the reference runs."""

import torch
import triton
import triton.language as tl

from fastssl.ops._info_nce_combine_kernels import (
    _EPS,
    _info_nce_bwd_combine_kernel,
    _info_nce_combine_kernel,
    _key_grad_direction,
    _norms,
)
from fastssl.ops._info_nce_tiles import (
    _CONFIGS,
    _combine_block,
    _combine_warps,
    _configs,
    _d_tiles,
    _fixed_outer,
    _launch,
    _num_splits,
    keep_p,
    stream_tile,
)
from fastssl.ops._tiles import block_d, chunked_dot, dot_precision, program_tiles, row_block
from fastssl.ops._traffic import whole

_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------- kernels


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
    passes = tl.cdiv(D, BLOCK_DV) if KEEP_P else 1
    for d_pass in range(passes):
        dims = dims_v + d_pass * BLOCK_DV
        dims_ok = dims < D
        acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        for col0 in range(start, end, BLOCK_M):
            cols, col_ok, x_rows = row_block(x_ptr, col0, end, stride_x, BLOCK_M)
            if KEEP_P:
                first_pass = d_pass == 0
                kept = p_ptr + rows.to(tl.int64)[:, None] * X_ROWS + cols[None, :]
                kept_ok = row_ok[:, None] & col_ok[None, :]
                alpha_at = alpha_ptr + rows.to(tl.int64) * tl.cdiv(X_ROWS, BLOCK_M) + col0 // BLOCK_M
            else:
                first_pass = True
            if first_pass:
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
                    tl.store(kept, p, mask=kept_ok)
                    tl.store(alpha_at, alpha, mask=row_ok)
            else:
                p = tl.load(kept, mask=kept_ok, other=0.0)
                alpha = tl.load(alpha_at, mask=row_ok, other=1.0)
            if COMPUTE_DQ:
                if not ONE_CHUNK:
                    x = tl.load(x_rows + dims[None, :] * stride_xd, mask=col_ok[:, None] & dims_ok[None, :],
                                other=0.0).to(dtype)
                acc = acc * alpha[:, None] + tl.dot(p, x, input_precision=DOT_PRECISION)
        if COMPUTE_DQ:
            part = split.to(tl.int64) * N + rows
            tl.store(acc_ptr + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dims_ok[None, :])
        if KEEP_P:
            tl.debug_barrier()  # the first pass's p and α, stored by other threads, before the replay
    part = split.to(tl.int64) * N + rows
    tl.store(m_ptr + part, m_i, mask=row_ok & (pid_d == 0))
    tl.store(l_ptr + part, l_i, mask=row_ok & (pid_d == 0))


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
    passes = tl.cdiv(D, BLOCK_DV) if KEEP_P else 1
    for d_pass in range(passes):
        dims = dims_v + d_pass * BLOCK_DV
        dims_ok = dims < D
        acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
        for row0 in range(start, end, BLOCK_N):
            rows, row_ok, q_rows = row_block(q_ptr, row0, end, stride_q, BLOCK_N)
            if KEEP_P:
                first_pass = d_pass == 0
                kept = p_ptr + keys.to(tl.int64)[:, None] * N + rows[None, :]
                kept_ok = key_ok[:, None] & row_ok[None, :]
            else:
                first_pass = True
            if first_pass:
                if ONE_CHUNK:
                    q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_ok[:, None] & dims_ok[None, :],
                                other=0.0)
                    s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION)
                else:
                    s = chunked_dot(k_rows, key_ok, stride_kd, q_rows, row_ok, stride_qd, D, BLOCK_K, DOT_PRECISION)
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
                    tl.store(kept, p, mask=kept_ok)
            else:
                p = tl.load(kept, mask=kept_ok, other=0.0)
            if not ONE_CHUNK:
                q = tl.load(q_rows + dims[None, :] * stride_qd, mask=row_ok[:, None] & dims_ok[None, :], other=0.0)
            acc += tl.dot(p, q, input_precision=DOT_PRECISION)
        tile_ok = key_ok[:, None] & dims_ok[None, :]
        if DIRECT:
            dk = _key_grad_direction(acc, q_ptr, q_norm_ptr, grad_ptr, outer_weight_ptr, tl.load(weight_scale_ptr),
                                     keys, key_ok, dims, dims_ok, N, stride_q, stride_qd, label_offset, inv_temperature,
                                     NORMALIZE, EXCLUDE_SELF, OUTER_LSE, EPS)
            tl.store(dk_ptr + keys.to(tl.int64)[:, None] * D + dims[None, :], dk, mask=tile_ok)
        else:
            tl.store(part_ptr + (split.to(tl.int64) * M + keys)[:, None] * D + dims[None, :], acc, mask=tile_ok)
        if KEEP_P:
            tl.debug_barrier()  # the first pass's p, stored by other threads, before the replay


_FWD_KEY = ["BLOCK_K", "BLOCK_DV", "ONE_CHUNK", "SCALE_ROWS", "SCALE_COLS", "COMPUTE_DQ", "EXCLUDE_SELF",
            "COLUMN_STATS", "DOT_PRECISION", "KEEP_P"]
_BWD_KEY = ["BLOCK_K", "BLOCK_DV", "ONE_CHUNK", "NORMALIZE", "EXCLUDE_SELF", "OUTER_LSE", "DOT_PRECISION", "KEEP_P",
            "DIRECT"]
_fwd_tuned = {p: triton.autotune(_configs(p, "BLOCK_N"), key=_FWD_KEY)(_info_nce_fwd_kernel) for p in _CONFIGS}
_bwd_tuned = {p: triton.autotune(_configs(p, "BLOCK_M"), key=_BWD_KEY)(_info_nce_bwd_kernel) for p in _CONFIGS}


# ----------------------------------------------------------------------------- launchers


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖ in fp32, [rows]: the only pass the normalization needs outside the kernels."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)


def info_nce_partials(
    query: torch.Tensor, x: torch.Tensor, q_norm: torch.Tensor, x_norm: torch.Tensor, *, scale2: float,
    label_offset: int, scale_rows: bool, scale_cols: bool, compute_dq: bool, exclude_self: bool, column_stats: bool,
) -> dict:
    """Launch the forward kernel: per split, each query row's (m, l) [splits, N] and, with compute_dq,
    acc [splits, N, D]; with column_stats, each streamed row's (col_m, col_l) [query tiles, X_ROWS]
    (fixed tiles then, so the number of query tiles is known here)."""
    N, D = query.shape
    X_ROWS = x.shape[0]
    d_tiles = _d_tiles(D, query.dtype)
    d_chunks = triton.cdiv(D, d_tiles["BLOCK_DV"]) if compute_dq else 1  # D programs split the accumulator only
    keep = keep_p(d_chunks, N, X_ROWS, query.dtype)
    d_programs = 1 if keep else d_chunks
    splits, split_cols = _num_splits(N, X_ROWS, D, d_programs, query.device)
    row_tiles = triton.cdiv(N, _fixed_outer(query.dtype, "BLOCK_N")) if column_stats else 0
    f32 = {"dtype": torch.float32, "device": query.device}
    out = dict(splits=splits, m=torch.empty(splits, N, **f32), l=torch.empty(splits, N, **f32),
               acc=torch.empty((splits, N, D) if compute_dq else (0,), **f32), row_tiles=row_tiles,
               col_m=torch.empty(row_tiles, X_ROWS, **f32), col_l=torch.empty(row_tiles, X_ROWS, **f32))
    flags = dict(SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, COMPUTE_DQ=compute_dq, EXCLUDE_SELF=exclude_self,
                 COLUMN_STATS=column_stats, EPS=_EPS, DOT_PRECISION=dot_precision(query.dtype), **d_tiles)
    if keep:  # passed only here: the other launches keep their signature
        flags |= dict(KEEP_P=True, p_ptr=torch.empty(N, X_ROWS, dtype=query.dtype, device=query.device),
                      alpha_ptr=torch.empty(N, triton.cdiv(X_ROWS, stream_tile(query.dtype)), **f32))
    args = (query, x, q_norm, x_norm, out["m"], out["l"], out["acc"], out["col_m"], out["col_l"], N, X_ROWS, D,
            *query.stride(), *x.stride(), split_cols, label_offset, scale2)
    _launch(_info_nce_fwd_kernel, _fwd_tuned, splits=splits, d_programs=d_programs, outer_block="BLOCK_N",
            outer_rows=N, logits=N * X_ROWS, args=args, flags=flags, dtype=query.dtype, tune=not column_stats)
    return out


def info_nce_combine(
    query: torch.Tensor, key: torch.Tensor, q_norm: torch.Tensor, k_norm: torch.Tensor, m_part: torch.Tensor,
    l_part: torch.Tensor, acc_part: torch.Tensor, *, scale2: float, temperature: float, label_offset: int,
    has_queue: bool, normalize: bool, compute_dq: bool, compute_dk: bool, exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the combine kernel over the partials [parts, N] of each query row (splits of the
    forward, or a column's query tiles). Returns (loss, lse2, dq_dir, dk_dir) as info_nce_fwd."""
    N, D = query.shape
    f32 = {"dtype": torch.float32, "device": query.device}
    loss, lse2 = torch.empty(N, **f32), torch.empty(N, **f32)
    dq_dir = torch.empty((N, D) if compute_dq else (0,), **f32)
    dk_dir = torch.empty((N, D) if compute_dk else (0,), **f32)
    block_n = _combine_block(D)
    _info_nce_combine_kernel[(triton.cdiv(N, block_n),)](
        query, key, q_norm, k_norm, m_part, l_part, acc_part, loss, lse2, dq_dir, dk_dir,
        N, D, *query.stride(), *key.stride(), m_part.shape[0], label_offset, scale2, 1.0 / temperature,
        HAS_QUEUE=has_queue, NORMALIZE=normalize, COMPUTE_DQ=compute_dq, COMPUTE_DK=compute_dk,
        EXCLUDE_SELF=exclude_self, EPS=_EPS, BLOCK_N=block_n, BLOCK_D=block_d(D), num_warps=_combine_warps(D),
    )
    return loss, lse2, dq_dir, dk_dir


def info_nce_fwd(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None, *, temperature: float,
    normalize: bool, label_offset: int, compute_dq: bool, compute_dk: bool, exclude_self: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns (loss [N] fp32, lse2 [N] fp32 = log2 Σ_j 2^(l_ij·log2 e),
    dq_dir, dk_dir) where dq_dir [N, D] fp32 = ∂loss_i/∂query_i (empty unless compute_dq) and dk_dir [N, D]
    fp32 = ∂loss_i/∂key_i for the queue form (empty unless compute_dk and a queue). The queue may
    have another float dtype than query: its rows are converted to query's dtype on load."""
    has_queue = queue is not None
    q_norm = _row_norms(query) if normalize else query.new_empty(0, dtype=torch.float32)
    k_norm = _row_norms(key) if normalize else q_norm
    scale2 = _LOG2E / temperature
    parts = info_nce_partials(query, queue if has_queue else key, q_norm, k_norm, scale2=scale2,
                              label_offset=label_offset, scale_rows=normalize, scale_cols=normalize and not has_queue,
                              compute_dq=compute_dq, exclude_self=exclude_self, column_stats=False)
    return info_nce_combine(query, key, q_norm, k_norm, parts["m"], parts["l"], parts["acc"], scale2=scale2,
                            temperature=temperature, label_offset=label_offset, has_queue=has_queue,
                            normalize=normalize, compute_dq=compute_dq, compute_dk=compute_dk and has_queue,
                            exclude_self=exclude_self)


def info_nce_bwd(
    query: torch.Tensor, key: torch.Tensor, lse2: torch.Tensor, grad: torch.Tensor, *, temperature: float,
    normalize: bool, label_offset: int, exclude_self: bool, outer_lse2: torch.Tensor | None = None,
    outer_grad: torch.Tensor | None = None,
) -> torch.Tensor:
    """In-batch key gradient [M, D] (key's dtype, contiguous) of Σ_i grad_i · loss_i, recomputing
    the logits tiles from lse2 [N] (from info_nce_fwd). grad [N] may be an expanded (stride-0) view.
    outer_lse2, outer_grad [M] (CLIP, normalize=False): the keys' own cross-entropies over the
    queries, Σ_j outer_grad_j · (outer_lse_j − l_{j−label_offset, j}), join the gradient."""
    grad = grad.to(torch.float32).contiguous()  # [N]: the copy of a stride-0 view is N floats
    lse2 = lse2.contiguous()
    N, D = query.shape
    M = key.shape[0]
    dev = query.device
    q_norm = _row_norms(query) if normalize else query.new_empty(0, dtype=torch.float32)
    k_norm = _row_norms(key) if normalize else q_norm
    # The per-query weights g_i/‖q_i‖ multiply p before it is rounded to the input dtype for the
    # tensor-core dot; scaling them into [-1, 1] keeps fp16 from underflowing (g = 1/N at large
    # N). One [N] pass; the scale stays on the device (no sync).
    weight = grad / q_norm.clamp_min(_EPS) if normalize else grad
    has_outer = outer_lse2 is not None
    if has_outer:  # one scale for both weights, which meet in one p
        outer_grad, outer_lse2 = outer_grad.to(torch.float32), outer_lse2.contiguous()
        weight = torch.cat([weight, outer_grad])
    weight_scale = weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    weight = weight / weight_scale
    weight, outer_weight = weight[:N], weight[N:]
    d_tiles = _d_tiles(D, query.dtype)
    d_chunks = triton.cdiv(D, d_tiles["BLOCK_DV"])
    keep = keep_p(d_chunks, M, N, key.dtype)
    d_programs = 1 if keep else d_chunks
    num_splits, split_rows = _num_splits(M, N, D, d_programs, dev)
    direct = num_splits == 1 and not normalize
    part = torch.empty((0,) if direct else (num_splits, M, D), dtype=torch.float32, device=dev)
    dk = torch.empty(key.shape, dtype=key.dtype, device=dev)
    flags = dict(NORMALIZE=normalize, EXCLUDE_SELF=exclude_self, OUTER_LSE=has_outer, EPS=_EPS,
                 DOT_PRECISION=dot_precision(query.dtype), **d_tiles)
    if keep:  # passed only where set: the other launches keep their signature
        flags |= dict(KEEP_P=True, p_ptr=torch.empty(M, N, dtype=key.dtype, device=dev))
    if direct:
        flags |= dict(DIRECT=True, grad_ptr=grad, weight_scale_ptr=weight_scale, dk_ptr=dk,
                      inv_temperature=1.0 / temperature)
    args = (query, key, q_norm, k_norm, lse2, weight, outer_lse2 if has_outer else lse2[:0], outer_weight, part,
            N, M, D, *query.stride(), *key.stride(), split_rows, label_offset, _LOG2E / temperature)
    _launch(_info_nce_bwd_kernel, _bwd_tuned, splits=num_splits, d_programs=d_programs, outer_block="BLOCK_M",
            outer_rows=M, logits=N * M, args=args, flags=flags, dtype=query.dtype)
    if direct:
        return dk
    block_m = _combine_block(D)
    _info_nce_bwd_combine_kernel[(triton.cdiv(M, block_m),)](
        query, key, q_norm, k_norm, grad, outer_weight, weight_scale, part, dk,
        N, M, D, *query.stride(), *key.stride(), num_splits, label_offset, 1.0 / temperature,
        NORMALIZE=normalize, EXCLUDE_SELF=exclude_self, OUTER_LSE=has_outer, EPS=_EPS, BLOCK_M=block_m,
        BLOCK_D=block_d(D), num_warps=_combine_warps(D),
    )
    return dk


# ----------------------------------------------------------------------------- traffic (fastssl.ops._traffic):
# each kernel reads the tensors named here whole and writes the outputs named here whole


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


_OUTER = ("outer_lse2_ptr", "outer_weight_ptr")  # empty without OUTER_LSE: 0 bytes
_DIRECT = ("grad_ptr", "weight_scale_ptr")  # absent without DIRECT (part_ptr empty with it)

KERNEL_TRAFFIC = {
    "_info_nce_fwd_kernel": _fwd_traffic,
    "_info_nce_bwd_kernel": lambda a: (*whole(a, ("q_ptr", "k_ptr", "lse2_ptr", "weight_ptr", "p_ptr") + _OUTER
                                              + _norms(a) + _DIRECT, ("part_ptr", "p_ptr", "dk_ptr")), _matmul_flops(a, 1)),
}
