"""The InfoNCE kernels that merge the splits' partials of _info_nce_kernels.py (behind
fastssl.ops.info_nce and fastssl.ops.clip_loss): the forward's per-row log-sum-exp and query
gradient, and the key gradient's sum, each with its traffic formula. Imported only where triton is
installed."""

import triton
import triton.language as tl

from fastssl.ops._traffic import whole

_EPS = 1e-12  # F.normalize's clamp on the norm


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


# ----------------------------------------------------------------------------- traffic (fastssl.ops._traffic)


def _norms(a: dict) -> tuple[str, ...]:
    return ("q_norm_ptr", "k_norm_ptr") * a["NORMALIZE"]


def _combine_traffic(a: dict) -> tuple[int, int, int]:
    """The keys (and their norms) are read at the queries' positives only: N of them (of M >= N gathered)."""
    read, written = whole(a, ("q_ptr", "m_ptr", "l_ptr", "acc_ptr") + _norms(a)[:1],
                          ("loss_ptr", "lse2_ptr", "dq_ptr", "dk_ptr"))
    N, (_, D), size = a["q_ptr"].shape[0], a["k_ptr"].shape, a["k_ptr"].itemsize
    return read + N * D * size + N * 4 * a["NORMALIZE"], written, 0


KERNEL_TRAFFIC = {
    "_info_nce_combine_kernel": _combine_traffic,
    "_info_nce_bwd_combine_kernel": lambda a: (*whole(
        a, ("q_ptr", "grad_ptr", "outer_weight_ptr", "weight_scale_ptr", "part_ptr") + ("k_ptr",) * a["NORMALIZE"]
        + _norms(a), ("dk_ptr",)), 0),  # the keys themselves only for the normalization backward
}
