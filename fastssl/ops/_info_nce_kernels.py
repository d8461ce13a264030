"""Triton kernels and launchers behind fastssl.ops.info_nce (see that module for the math).

Imported only where triton is installed: fastssl.ops.info_nce runs its reference without it."""

import torch
import triton
import triton.language as tl

from fastssl.ops._dispatch import triton_interpreting

_EPS = 1e-12  # F.normalize's clamp on the norm
_LOG2E = 1.4426950408889634
_SPLIT_CHUNK = 128  # columns per split are a multiple of this, the largest BLOCK_M of any config


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _info_nce_fwd_kernel(
    q_ptr, x_ptr, q_norm_ptr, x_norm_ptr, m_ptr, l_ptr, acc_ptr,
    N, X_ROWS, D, split_cols, scale2,
    SCALE_ROWS: tl.constexpr, SCALE_COLS: tl.constexpr, COMPUTE_DQ: tl.constexpr,
    EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Partial online LSE (and Σ p·x̂) of BLOCK_N queries over one split of the streamed rows x."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
    # Logits in base 2: s2 = q·x · (log2(e)/T) / (‖q‖‖x‖), scaled after the dot so the
    # tensor cores see the raw (e.g. bf16) rows.
    row_scale = tl.zeros([BLOCK_N], tl.float32) + scale2
    if SCALE_ROWS:
        row_scale = scale2 / tl.maximum(tl.load(q_norm_ptr + rows, mask=row_ok, other=1.0), EPS)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    start = split * split_cols
    end = tl.minimum(start + split_cols, X_ROWS)
    for col0 in range(start, end, BLOCK_M):
        cols = col0 + tl.arange(0, BLOCK_M)
        col_ok = cols < end
        x = tl.load(x_ptr + cols.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=col_ok[:, None] & dim_ok[None, :], other=0.0)
        s = tl.dot(q, tl.trans(x), input_precision=DOT_PRECISION) * row_scale[:, None]
        if SCALE_COLS:
            col_inv = 1.0 / tl.maximum(tl.load(x_norm_ptr + cols, mask=col_ok, other=1.0), EPS)
            s = s * col_inv[None, :]
        s = tl.where(col_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if COMPUTE_DQ:
            if SCALE_COLS:
                p = p * col_inv[None, :]  # Σ p_ij x̂_j with x̂_j = x_j/‖x_j‖
            acc = acc * alpha[:, None] + tl.dot(p.to(x.dtype), x, input_precision=DOT_PRECISION)
        m_i = m_new
    part = split.to(tl.int64) * N + rows
    tl.store(m_ptr + part, m_i, mask=row_ok)
    tl.store(l_ptr + part, l_i, mask=row_ok)
    if COMPUTE_DQ:
        tl.store(acc_ptr + part[:, None] * D + dims[None, :], acc, mask=row_ok[:, None] & dim_ok[None, :])


@triton.jit
def _info_nce_combine_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, m_ptr, l_ptr, acc_ptr,
    loss_ptr, lse2_ptr, dq_ptr, dk_ptr,
    N, D, num_splits, label_offset, scale2, inv_temperature,
    HAS_QUEUE: tl.constexpr, NORMALIZE: tl.constexpr, COMPUTE_DQ: tl.constexpr, COMPUTE_DK: tl.constexpr,
    EPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Merge the splits' partials; add the positive column (queue form); write loss, lse2
    and the per-row gradient directions dq (and dk for the queue form)."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < N
    dim_ok = dims < D
    tile_ok = row_ok[:, None] & dim_ok[None, :]
    pos_rows = rows.to(tl.int64) + label_offset
    q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
    k = tl.load(k_ptr + pos_rows[:, None] * D + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
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
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)
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
def _info_nce_bwd_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, lse2_ptr, weight_ptr, part_ptr,
    N, M, D, split_rows, scale2,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """In-batch key gradient, one split of the queries: Σ_i w_i p_ij q_i for BLOCK_M keys, with
    w_i = g_i/‖q_i‖ / max_i' |g_i'/‖q_i'‖| (the combine multiplies back the scale and 1/T) and
    p_ij = 2^(l_ij·log2(e) − lse2_i) recomputed from the saved base-2 lse."""
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    keys = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < M
    dim_ok = dims < D
    k = tl.load(k_ptr + keys.to(tl.int64)[:, None] * D + dims[None, :],
                mask=key_ok[:, None] & dim_ok[None, :], other=0.0)
    k_inv = tl.zeros([BLOCK_M], tl.float32) + 1.0
    if NORMALIZE:
        k_inv = 1.0 / tl.maximum(tl.load(k_norm_ptr + keys, mask=key_ok, other=1.0), EPS)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    start = split * split_rows
    end = tl.minimum(start + split_rows, N)
    for row0 in range(start, end, BLOCK_N):
        rows = row0 + tl.arange(0, BLOCK_N)
        row_ok = rows < end
        q = tl.load(q_ptr + rows.to(tl.int64)[:, None] * D + dims[None, :],
                    mask=row_ok[:, None] & dim_ok[None, :], other=0.0)
        row_scale = tl.zeros([BLOCK_N], tl.float32) + scale2
        if NORMALIZE:
            row_scale = scale2 / tl.maximum(tl.load(q_norm_ptr + rows, mask=row_ok, other=1.0), EPS)
        weight = tl.load(weight_ptr + rows, mask=row_ok, other=0.0)
        # +inf lse2 on padded rows makes their p exactly 0.
        lse2 = tl.load(lse2_ptr + rows, mask=row_ok, other=float("inf"))
        s = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * row_scale[None, :] * k_inv[:, None]
        p = tl.exp2(s - lse2[None, :]) * weight[None, :]
        acc += tl.dot(p.to(q.dtype), q, input_precision=DOT_PRECISION)
    part = split.to(tl.int64) * M + keys
    tl.store(part_ptr + part[:, None] * D + dims[None, :], acc, mask=key_ok[:, None] & dim_ok[None, :])


@triton.jit
def _info_nce_bwd_combine_kernel(
    q_ptr, k_ptr, q_norm_ptr, k_norm_ptr, grad_ptr, weight_scale_ptr, part_ptr, dk_ptr,
    N, M, D, num_splits, label_offset, inv_temperature,
    NORMALIZE: tl.constexpr, EPS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sum the key-gradient splits, subtract the target term, apply the normalization backward."""
    keys = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    key_ok = keys < M
    dim_ok = dims < D
    tile_ok = key_ok[:, None] & dim_ok[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for split in range(num_splits):
        part = split * M + keys.to(tl.int64)
        acc += tl.load(part_ptr + part[:, None] * D + dims[None, :], mask=tile_ok, other=0.0)
    acc = acc * (tl.load(weight_scale_ptr) * inv_temperature)
    # Key j is the target of query i = j − label_offset (if that query exists).
    rows = keys.to(tl.int64) - label_offset
    has_row = key_ok & (rows >= 0) & (rows < N)
    q = tl.load(q_ptr + rows[:, None] * D + dims[None, :], mask=has_row[:, None] & dim_ok[None, :],
                other=0.0).to(tl.float32)
    coef = tl.load(grad_ptr + rows, mask=has_row, other=0.0) * inv_temperature
    if NORMALIZE:
        coef = coef / tl.maximum(tl.load(q_norm_ptr + rows, mask=has_row, other=1.0), EPS)
    dkn = acc - q * coef[:, None]
    if NORMALIZE:
        k = tl.load(k_ptr + keys.to(tl.int64)[:, None] * D + dims[None, :], mask=tile_ok, other=0.0).to(tl.float32)
        k_norm = tl.load(k_norm_ptr + keys, mask=key_ok, other=1.0)
        k_inv = 1.0 / tl.maximum(k_norm, EPS)
        kn = k * k_inv[:, None]
        proj = tl.where(k_norm > EPS, tl.sum(kn * dkn, 1), 0.0)
        dkn = (dkn - kn * proj[:, None]) * k_inv[:, None]
    tl.store(dk_ptr + keys.to(tl.int64)[:, None] * D + dims[None, :], dkn, mask=tile_ok)


# Autotuning on a GPU for problems big enough to repay it (each config is a compile); small
# ones and the interpreter run one fixed configuration.
# (BLOCK_N, BLOCK_M, warps, stages, shared-memory bytes per unit of BLOCK_D for 16-bit / fp32
# inputs): the larger of the forward's and the key-gradient kernel's, as compiled for sm_90
# (triton 3.8; linear in BLOCK_D). Configs that cannot fit the card's shared memory are pruned
# before compiling (a tf32x3 compile at D=256 takes tens of seconds): fp32 at D=256 keeps only
# the last one (~224 KiB of the H100's 227).
_TILE_TABLE = [
    (128, 64, 8, 3, 512, 2584),
    (128, 128, 8, 2, 518, 2572),
    (64, 64, 4, 3, 262, 1548),
    (64, 32, 4, 2, 256, 897),
]
_TILE_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_M": m}, num_warps=w, num_stages=st)
                 for n, m, w, st, _, _ in _TILE_TABLE]
_AUTOTUNE_MIN_LOGITS = 1 << 22  # N·K below this: the fixed configuration
_INTERPRETER_TILES = {"BLOCK_N": 32, "BLOCK_M": 64}


def _prune_configs(configs, named_args, **kwargs):
    bytes_col = 5 if kwargs["DOT_PRECISION"] == "tf32x3" else 4
    limit = torch.cuda.get_device_properties(torch.cuda.current_device()).shared_memory_per_block_optin
    kept = [cfg for cfg, row in zip(_TILE_CONFIGS, _TILE_TABLE) if row[bytes_col] * kwargs["BLOCK_D"] <= limit]
    return kept or _TILE_CONFIGS[-1:]  # nothing fits: the smallest, whose launch then says why


_fwd_kernel_tuned = triton.autotune(
    _TILE_CONFIGS, key=["BLOCK_D", "SCALE_ROWS", "SCALE_COLS", "COMPUTE_DQ", "DOT_PRECISION"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_info_nce_fwd_kernel)
_bwd_kernel_tuned = triton.autotune(
    _TILE_CONFIGS, key=["BLOCK_D", "NORMALIZE", "DOT_PRECISION"], prune_configs_by={"early_config_prune": _prune_configs},
)(_info_nce_bwd_kernel)


def _fixed_tiles(block_d: int, dtype: torch.dtype) -> dict:
    """GPU tiles for problems below the autotuning threshold; fit sm_90's shared memory for
    rows up to D=512 (fp32: 32x32 tiles from D=256 on, ~96-192 KiB)."""
    row_bytes = block_d * dtype.itemsize
    return {"BLOCK_N": 64, "BLOCK_M": 64} if row_bytes <= 512 else {"BLOCK_N": 32, "BLOCK_M": 32}


def _launch(kernel, tuned, splits: int, outer_block: str, outer_rows: int, logits: int, args: tuple,
            flags: dict) -> None:
    """Run `kernel` over (ceil(outer_rows / BLOCK), splits) programs with the tiles for this machine."""
    if triton_interpreting():
        grid = (triton.cdiv(outer_rows, _INTERPRETER_TILES[outer_block]), splits)
        kernel[grid](*args, **flags, **_INTERPRETER_TILES)
    elif logits >= _AUTOTUNE_MIN_LOGITS:
        tuned[lambda meta: (triton.cdiv(outer_rows, meta[outer_block]), splits)](*args, **flags)
    else:
        tiles = _fixed_tiles(flags["BLOCK_D"], args[0].dtype)
        grid = (triton.cdiv(outer_rows, tiles[outer_block]), splits)
        kernel[grid](*args, **flags, **tiles, num_warps=4, num_stages=2)


# ----------------------------------------------------------------------------- launchers


def _row_norms(x: torch.Tensor) -> torch.Tensor:
    """‖x_i‖ in fp32, [rows]: the only pass the normalization needs outside the kernels."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)


def _block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs every tile dim >= 16


def _dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def _num_splits(outer_rows: int, stream_rows: int, D: int, device: torch.device) -> tuple[int, int]:
    """(splits, rows per split) of the streamed dimension: enough programs to fill the GPU
    (about 2 per SM) while every split keeps >= 4 chunks of work and the fp32 partials stay
    under ~16 MiB. On the CPU interpreter, 2 splits so tests exercise the merge."""
    chunks = triton.cdiv(stream_rows, _SPLIT_CHUNK)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        want = triton.cdiv(2 * sms, triton.cdiv(outer_rows, 128))
        want = min(want, max(1, chunks // 4), max(1, (16 << 20) // (outer_rows * D * 4)))
    else:
        want = 2
    per_split = triton.cdiv(chunks, max(1, min(want, chunks)))
    return triton.cdiv(chunks, per_split), per_split * _SPLIT_CHUNK


def info_nce_fwd(
    query: torch.Tensor, key: torch.Tensor, queue: torch.Tensor | None, temperature: float,
    normalize: bool, label_offset: int, compute_dq: bool, compute_dk: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward. Returns (loss [N] fp32, lse2 [N] fp32 = log2 Σ_j 2^(l_ij·log2 e),
    dq_dir, dk_dir) where dq_dir [N, D] fp32 = ∂loss_i/∂query_i (empty unless compute_dq) and dk_dir [N, D]
    fp32 = ∂loss_i/∂key_i for the queue form (empty unless compute_dk and a queue)."""
    query, key = query.contiguous(), key.contiguous()
    has_queue = queue is not None
    x = queue.contiguous() if has_queue else key
    N, D = query.shape
    dev = query.device
    q_norm = _row_norms(query) if normalize else query.new_empty(0, dtype=torch.float32)
    k_norm = _row_norms(key) if normalize else q_norm
    scale2 = _LOG2E / temperature
    num_splits, split_cols = _num_splits(N, x.shape[0], D, dev)
    f32 = {"dtype": torch.float32, "device": dev}
    m_part = torch.empty(num_splits, N, **f32)
    l_part = torch.empty(num_splits, N, **f32)
    acc_part = torch.empty((num_splits, N, D) if compute_dq else (0,), **f32)
    flags = dict(SCALE_ROWS=normalize, SCALE_COLS=normalize and not has_queue, COMPUTE_DQ=compute_dq,
                 EPS=_EPS, DOT_PRECISION=_dot_precision(query.dtype), BLOCK_D=_block_d(D))
    args = (query, x, q_norm, k_norm, m_part, l_part, acc_part, N, x.shape[0], D, split_cols, scale2)
    _launch(_info_nce_fwd_kernel, _fwd_kernel_tuned, num_splits, "BLOCK_N", N, N * x.shape[0], args, flags)

    loss = torch.empty(N, **f32)
    lse2 = torch.empty(N, **f32)
    dq_dir = torch.empty((N, D) if compute_dq else (0,), **f32)
    compute_dk = compute_dk and has_queue
    dk_dir = torch.empty((N, D) if compute_dk else (0,), **f32)
    block_d = _block_d(D)
    block_n = max(1, min(64, 4096 // block_d))
    _info_nce_combine_kernel[(triton.cdiv(N, block_n),)](
        query, key, q_norm, k_norm, m_part, l_part, acc_part, loss, lse2, dq_dir, dk_dir,
        N, D, num_splits, label_offset, scale2, 1.0 / temperature,
        HAS_QUEUE=has_queue, NORMALIZE=normalize, COMPUTE_DQ=compute_dq, COMPUTE_DK=compute_dk,
        EPS=_EPS, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return loss, lse2, dq_dir, dk_dir


def info_nce_bwd(
    query: torch.Tensor, key: torch.Tensor, lse2: torch.Tensor, grad: torch.Tensor, temperature: float,
    normalize: bool, label_offset: int,
) -> torch.Tensor:
    """In-batch key gradient [M, D] (key's dtype) of Σ_i grad_i · loss_i, recomputing the logits
    tiles from lse2 [N] (from info_nce_fwd). grad [N] may be an expanded (stride-0) view."""
    query, key = query.contiguous(), key.contiguous()
    grad = grad.to(torch.float32).contiguous()
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
    weight_scale = weight.abs().amax().clamp_min(torch.finfo(torch.float32).tiny)
    weight = weight / weight_scale
    num_splits, split_rows = _num_splits(M, N, D, dev)
    part = torch.empty(num_splits, M, D, dtype=torch.float32, device=dev)
    flags = dict(NORMALIZE=normalize, EPS=_EPS, DOT_PRECISION=_dot_precision(query.dtype), BLOCK_D=_block_d(D))
    args = (query, key, q_norm, k_norm, lse2, weight, part, N, M, D, split_rows, _LOG2E / temperature)
    _launch(_info_nce_bwd_kernel, _bwd_kernel_tuned, num_splits, "BLOCK_M", M, N * M, args, flags)
    dk = torch.empty_like(key)
    block_d = _block_d(D)
    block_m = max(1, min(64, 4096 // block_d))
    _info_nce_bwd_combine_kernel[(triton.cdiv(M, block_m),)](
        query, key, q_norm, k_norm, grad, weight_scale, part, dk, N, M, D, num_splits, label_offset,
        1.0 / temperature,
        NORMALIZE=normalize, EPS=_EPS, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=4,
    )
    return dk
