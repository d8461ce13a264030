"""Launchers of the InfoNCE kernels (_info_nce_kernels.py) behind fastssl.ops.info_nce and, with
their CLIP flags, fastssl.ops.clip_loss (_clip_loss_kernels.py): buffers, grids and flags, the
flags that only some launches set (KEEP_P, DIRECT) passed only there, so that every other
launch keeps its signature. Imported only where triton is installed."""

import torch
import triton

from fastssl.ops._info_nce_kernels import (
    _EPS,
    _LOG2E,
    _bwd_tuned,
    _fwd_tuned,
    _info_nce_bwd_combine_kernel,
    _info_nce_bwd_kernel,
    _info_nce_combine_kernel,
    _info_nce_fwd_kernel,
)
from fastssl.ops._info_nce_tiles import (
    _combine_block,
    _combine_warps,
    _d_tiles,
    _fixed_outer,
    _kept_band,
    _launch,
    _num_splits,
    stream_tile,
)
from fastssl.ops._tiles import block_d, dot_precision


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖ in fp32, [rows]: the only pass the normalization needs outside the kernels."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)


def _forward_plan(N: int, X_ROWS: int, D: int, dtype: torch.dtype, device: torch.device, *, compute_dq: bool,
                  column_stats: bool) -> dict:
    """The forward's D tiles, its column splits (splits, split_cols) and band_splits, the splits per
    KEEP_P band (0: no KEEP_P). Column statistics [query tiles, X_ROWS] are written by one launch
    over every column (a band's columns would be a strided slice of them): that launch is not
    banded, and recomputes the logits per D chunk (CLIP's one grid asks for them without dq)."""
    d_tiles = _d_tiles(D, dtype)
    chunks = triton.cdiv(D, d_tiles["BLOCK_DV"]) if compute_dq else 1  # D programs split the accumulator only
    splits, split_cols = _num_splits(N, X_ROWS, D, chunks, device)
    band = 0
    if chunks > 1 and not column_stats:
        kept_splits, kept_cols = _num_splits(N, X_ROWS, D, 1, device, kept_bytes=N * X_ROWS * dtype.itemsize)
        tiles = triton.cdiv(N, _fixed_outer(dtype, "BLOCK_N"))
        band = _kept_band(units=kept_splits,
                          unit_bytes=N * (kept_cols * dtype.itemsize + triton.cdiv(kept_cols, stream_tile(dtype)) * 4),
                          band_programs=lambda n: tiles * n, chunks=chunks,
                          recompute_programs=triton.cdiv(N, 128) * splits * chunks, device=device)
        if band:
            d_tiles, splits, split_cols = _d_tiles(D, dtype, keep_p=True), kept_splits, kept_cols
    return dict(d_tiles=d_tiles, d_programs=1 if band else chunks, splits=splits, split_cols=split_cols,
                band_splits=band)


def info_nce_partials(
    query: torch.Tensor, x: torch.Tensor, q_norm: torch.Tensor, x_norm: torch.Tensor, *, scale2: float,
    label_offset: int, scale_rows: bool, scale_cols: bool, compute_dq: bool, exclude_self: bool, column_stats: bool,
) -> dict:
    """Launch the forward kernel: per split, each query row's (m, l) [splits, N] and, with compute_dq,
    acc [splits, N, D]; with column_stats, each streamed row's (col_m, col_l) [query tiles, X_ROWS]
    (fixed tiles then, so the number of query tiles is known here). A KEEP_P launch runs over bands
    of whole splits: x's column band, the splits' partials, one workspace of N x band columns."""
    N, D = query.shape
    X_ROWS = x.shape[0]
    plan = _forward_plan(N, X_ROWS, D, query.dtype, query.device, compute_dq=compute_dq, column_stats=column_stats)
    splits, split_cols, band = plan["splits"], plan["split_cols"], plan["band_splits"]
    row_tiles = triton.cdiv(N, _fixed_outer(query.dtype, "BLOCK_N")) if column_stats else 0
    f32 = {"dtype": torch.float32, "device": query.device}
    out = dict(splits=splits, m=torch.empty(splits, N, **f32), l=torch.empty(splits, N, **f32),
               acc=torch.empty((splits, N, D) if compute_dq else (0,), **f32), row_tiles=row_tiles,
               col_m=torch.empty(row_tiles, X_ROWS, **f32), col_l=torch.empty(row_tiles, X_ROWS, **f32))
    flags = dict(SCALE_ROWS=scale_rows, SCALE_COLS=scale_cols, COMPUTE_DQ=compute_dq, EXCLUDE_SELF=exclude_self,
                 COLUMN_STATS=column_stats, EPS=_EPS, DOT_PRECISION=dot_precision(query.dtype), **plan["d_tiles"])
    flags.pop("KEEP_P")  # passed only where set: the other launches keep their signature
    if band:
        cols = min(band * split_cols, X_ROWS)
        block_m = stream_tile(query.dtype)
        p = torch.empty(N * cols, dtype=query.dtype, device=query.device)
        alpha = torch.empty(N * triton.cdiv(cols, block_m), **f32)
    for s0 in range(0, splits, band or splits):
        s1 = min(s0 + (band or splits), splits)
        c0, c1 = s0 * split_cols, min(s1 * split_cols, X_ROWS)
        if band:  # the band's columns are 0..c1 - c0 in the kernel: the workspace's, and the own column's
            kept = N * (c1 - c0), N * triton.cdiv(c1 - c0, block_m)
            flags |= dict(KEEP_P=True, p_ptr=p[:kept[0]].view(N, c1 - c0), alpha_ptr=alpha[:kept[1]].view(N, -1))
        args = (query, x[c0:c1], q_norm, x_norm[c0:c1] if scale_cols else x_norm, out["m"][s0:s1], out["l"][s0:s1],
                out["acc"][s0:s1] if compute_dq else out["acc"], out["col_m"], out["col_l"], N, c1 - c0, D,
                *query.stride(), *x.stride(), split_cols, label_offset - c0, scale2)
        _launch(_info_nce_fwd_kernel, _fwd_tuned, splits=s1 - s0, d_programs=plan["d_programs"],
                outer_block="BLOCK_N", outer_rows=N, logits=N * (c1 - c0), args=args, flags=flags,
                dtype=query.dtype, tune=not (column_stats or band))
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
    plan = _key_grad_plan(M, N, D, query.dtype, dev)
    band_rows, num_splits, split_rows = plan["band_rows"], plan["splits"], plan["split_rows"]
    keep = plan["d_tiles"]["KEEP_P"]
    # one split finishes in the kernel; at one-chunk widths (D <= 128) the fp32 partials are small anyway
    direct = num_splits == 1 and not normalize and not plan["d_tiles"]["ONE_CHUNK"]
    part = torch.empty((0,) if direct else (num_splits * band_rows * D,), dtype=torch.float32, device=dev)
    dk = torch.empty(key.shape, dtype=key.dtype, device=dev)
    flags = dict(NORMALIZE=normalize, EXCLUDE_SELF=exclude_self, OUTER_LSE=has_outer, EPS=_EPS,
                 DOT_PRECISION=dot_precision(query.dtype), **plan["d_tiles"])
    flags.pop("KEEP_P")  # passed only where set: the other launches keep their signature
    if keep:
        p = torch.empty(band_rows * N, dtype=key.dtype, device=dev)
    if direct:
        flags |= dict(DIRECT=True, grad_ptr=grad, weight_scale_ptr=weight_scale, inv_temperature=1.0 / temperature)
    # Bands of key rows [b0, b1): the kernels see keys 0..b1 - b0, so the label offset (a key's own
    # query, its target, EXCLUDE_SELF's column) moves by b0, and the per-key tensors are sliced.
    for b0 in range(0, M, band_rows):
        b1 = min(b0 + band_rows, M)
        rows, offset = b1 - b0, label_offset - b0
        band_part = part if direct else part[:num_splits * rows * D].view(num_splits, rows, D)
        band_norm = k_norm[b0:b1] if normalize else k_norm
        if keep:
            flags |= dict(KEEP_P=True, p_ptr=p[:rows * N].view(rows, N))
        if direct:
            flags |= dict(dk_ptr=dk[b0:b1])
        args = (query, key[b0:b1], q_norm, band_norm, lse2, weight, outer_lse2[b0:b1] if has_outer else lse2[:0],
                outer_weight[b0:b1], band_part, N, rows, D, *query.stride(), *key.stride(), split_rows, offset,
                _LOG2E / temperature)
        _launch(_info_nce_bwd_kernel, _bwd_tuned, splits=num_splits, d_programs=plan["d_programs"],
                outer_block="BLOCK_M", outer_rows=rows, logits=N * rows, args=args, flags=flags, dtype=query.dtype,
                tune=not keep)
        if direct:
            continue
        block_m = _combine_block(D)
        _info_nce_bwd_combine_kernel[(triton.cdiv(rows, block_m),)](
            query, key[b0:b1], q_norm, band_norm, grad, outer_weight[b0:b1], weight_scale, band_part, dk[b0:b1],
            N, rows, D, *query.stride(), *key.stride(), num_splits, offset, 1.0 / temperature,
            NORMALIZE=normalize, EXCLUDE_SELF=exclude_self, OUTER_LSE=has_outer, EPS=_EPS, BLOCK_M=block_m,
            BLOCK_D=block_d(D), num_warps=_combine_warps(D),
        )
    return dk


def _key_grad_plan(M: int, N: int, D: int, dtype: torch.dtype, device: torch.device) -> dict:
    """The key gradient's D tiles, band_rows (keys per KEEP_P band; all M without KEEP_P) and each
    band's query splits (splits, split_rows)."""
    d_tiles = _d_tiles(D, dtype)
    chunks = triton.cdiv(D, d_tiles["BLOCK_DV"])
    tile = _fixed_outer(dtype, "BLOCK_M")

    def splits_of(rows: int, d_programs: int) -> tuple[int, int]:
        return _num_splits(rows, N, D, d_programs, device)

    band = 0
    if chunks > 1:
        band = _kept_band(units=triton.cdiv(M, tile), unit_bytes=tile * N * dtype.itemsize,
                          band_programs=lambda n: n * splits_of(min(n * tile, M), 1)[0], chunks=chunks,
                          recompute_programs=triton.cdiv(M, 128) * splits_of(M, chunks)[0] * chunks, device=device)
    band_rows = min(band * tile, M) if band else M
    d_programs = 1 if band else chunks
    splits, split_rows = splits_of(band_rows, d_programs)
    return dict(d_tiles=_d_tiles(D, dtype, keep_p=band > 0), d_programs=d_programs, band_rows=band_rows,
                splits=splits, split_rows=split_rows)
