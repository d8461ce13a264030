"""Fused soft-target cross-entropy over row blocks: the DINO loss and the multi-label softmax loss.

DINO (Caron et al., 2021) compares every teacher crop i (n_global of them) with every student
crop v != i (n_crops of them) for each of B samples:

    p_i  = softmax((t_i - center) / tau_t)                 (teacher, no gradient)
    loss = 1/(n_pairs * B) * sum_b sum_{(i, v), v != i} [ lse(s_v / tau_s) - <p_i, s_v> / tau_s ]

The official code materialises softmax / log-softmax / product tensors for each of the
n_pairs = n_global * (n_crops - 1) pairs. Here the pair sum is regrouped so that no per-pair
tensor exists: with S = sum_v s_v,

    sum_{v != i} <p_i, s_v> = <p_i, S> - <p_i, s_i>,    sum over pairs of lse_v = sum_v c_v * lse_v

where c_v counts the teacher crops paired with student crop v. The forward kernel reads each
student and teacher logit once (one program per K-tile and group of samples), writing per-tile
partial statistics (max, sum of exponentials, and the two dot products, all relative to the tile
max); one merge kernel combines the tiles (and the groups' column sums of the teacher, for the
center) and one torch sum adds the loss shares. The backward kernel reads student and teacher
once more (the least a recomputing backward can read: no [B, K] probability tensor is stored)
and writes

    grad s_v = (c_v * softmax(s_v / tau_s) - sum_{i != v} p_i) / (tau_s * n_pairs * B) * grad_out.

Inputs are read through their row stride (a sliced or row-strided view costs no copy); only a
last dimension that is not unit-stride is copied. Each kernel states its traffic in its docstring.

The same kernels, with the target given as non-negative weights (p_i = w_i / sum w_i) instead of
teacher logits, compute the multi-label softmax loss (n_crops = n_global = 1, the pair (0, 0)
included) and DINOv2's Sinkhorn-Knopp-teacher loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.distributed import all_reduce_sum_, get_world_size
from fastssl.ops._dispatch import (
    HAS_TRITON,
    check_positive,
    check_tensor,
    resolve_backend,
)

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _target_prob(t_ptr, row, offs, mask, t_stride, center, norm, inv_tt, TARGET_IS_LOGITS: tl.constexpr):
        """p tile of target row `row`, given its normaliser (lse of the logits, or log of the weight sum)."""
        t = tl.load(t_ptr + row * t_stride + offs, mask=mask, other=0.0).to(tl.float32)
        if TARGET_IS_LOGITS:
            p = tl.exp((t - center) * inv_tt - norm)
        else:
            p = t * tl.exp(-norm)
        return tl.where(mask, p, 0.0)

    @triton.jit
    def _dino_loss_fwd_kernel(
        s_ptr, t_ptr, c_ptr, s_stats_ptr, t_stats_ptr, t_sum_ptr,
        B, K, V, G, n_tiles, samples_per_group, s_stride, t_stride, inv_ts, inv_tt,
        BLOCK_K: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, EXCLUDE_SAME: tl.constexpr,
        WITH_TARGET_SUM: tl.constexpr,
    ):
        """Per (K-tile, group of samples): tile statistics of every student and target row, relative to
        the tile's max (see the module docstring), and the group's column sum of the target rows.

        Traffic (distinct bytes): loads each student and target element once (the exclude-same term
        re-reads student rows the program has just loaded: cache hits) and the center; stores
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
                x = tl.load(s_ptr + row * s_stride + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
                m = tl.max(tl.where(mask, x, float("-inf")), axis=0)
                z = tl.sum(tl.where(mask, tl.exp(x - m), 0.0), axis=0)
                tl.store(s_stats_ptr + row * n_tiles + tile, m)
                tl.store(s_stats_ptr + s_plane + row * n_tiles + tile, z)
                s_sum += x
            for i in range(G):
                row = (i * B + b).to(tl.int64)
                t = tl.load(t_ptr + row * t_stride + offs, mask=mask, other=0.0).to(tl.float32)
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
                    x_i = tl.load(s_ptr + row * s_stride + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
                    tl.store(t_stats_ptr + 3 * t_plane + idx, tl.sum(e * x_i, axis=0))
        if WITH_TARGET_SUM:
            tl.store(t_sum_ptr + group.to(tl.int64) * K + offs, col_sum, mask=mask)

    @triton.jit
    def _dino_loss_bwd_kernel(
        s_ptr, t_ptr, c_ptr, lse_s_ptr, t_norm_ptr, g_ptr, ds_ptr,
        B, K, V, G, samples_per_group, s_stride, t_stride, inv_ts, inv_tt, grad_scale,
        BLOCK_K: tl.constexpr, TARGET_IS_LOGITS: tl.constexpr, EXCLUDE_SAME: tl.constexpr,
    ):
        """grad s_v for a (K-tile, group of samples), recomputing p_i from the target and its normaliser.

        Traffic (distinct bytes): loads each student and target element once (p_v of the excluded
        pair re-reads a target row the program has just loaded: a cache hit), the center, the
        V*B + G*B fp32 normalisers; stores each gradient element once (contiguous [V*B, K])."""
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
            p_all = tl.zeros([BLOCK_K], dtype=tl.float32)
            for i in range(G):
                row = (i * B + b).to(tl.int64)
                norm = tl.load(t_norm_ptr + row)
                p_all += _target_prob(t_ptr, row, offs, mask, t_stride, center, norm, inv_tt, TARGET_IS_LOGITS)
            for v in range(V):
                row = (v * B + b).to(tl.int64)
                x = tl.load(s_ptr + row * s_stride + offs, mask=mask, other=0.0).to(tl.float32) * inv_ts
                lse = tl.load(lse_s_ptr + row)
                q = p_all
                # a float32 tensor even when Triton specialises G == 1 to a constant, so both paths of
                # the runtime `if` below carry one type
                count = tl.zeros([], dtype=tl.float32) + G
                if EXCLUDE_SAME:
                    if v < G:
                        norm_v = tl.load(t_norm_ptr + row)
                        q = p_all - _target_prob(t_ptr, row, offs, mask, t_stride, center, norm_v, inv_tt,
                                                 TARGET_IS_LOGITS)
                        count = count - 1.0
                grad = (count * tl.exp(x - lse) - q) * g
                tl.store(ds_ptr + row * K + offs, grad.to(ds_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _dino_loss_merge_kernel(
        s_stats_ptr, t_stats_ptr, t_parts_ptr, lse_s_ptr, t_norm_ptr, loss_parts_ptr, t_sum_ptr,
        B, K, V, G, n_tiles, n_groups, n_s_blocks, n_t_blocks, loss_scale,
        BLOCK_ROWS: tl.constexpr, BLOCK_TILES: tl.constexpr, BLOCK_COLS: tl.constexpr,
        EXCLUDE_SAME: tl.constexpr,
    ):
        """Merge the forward's tiles in one launch; a program's role is set by its id:
        student rows -> lse_s and c_v * lse_s, target rows -> normaliser and -<p_i, S - s_i>, then
        column blocks -> the column sum of the groups' partials. Each row program writes its
        (scaled) share of the loss to loss_parts[pid], summed by one torch reduction: deterministic.

        Traffic: loads the forward's statistics and column partials once; stores (V + G) * B + K
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


def _bytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# Traffic of one launch, from its bound arguments (name -> value): (bytes read, bytes written),
# counting each distinct address once (what DRAM must serve when a program's re-reads hit cache).
# tests/test_traffic_model.py checks each against the addresses the kernel touches under the
# interpreter; fastssl.bench.traffic sums them for the model.
def _dino_loss_fwd_kernel_traffic(a: dict) -> tuple[int, int]:
    rows_s, rows_t = a["V"] * a["B"], a["G"] * a["B"]
    read = (rows_s * a["K"] * a["s_ptr"].element_size() + rows_t * a["K"] * a["t_ptr"].element_size()
            + (a["K"] * a["c_ptr"].element_size() if a["TARGET_IS_LOGITS"] else 0))
    written = _bytes(a["s_stats_ptr"], a["t_stats_ptr"]) + (_bytes(a["t_sum_ptr"]) if a["WITH_TARGET_SUM"] else 0)
    return read, written


def _dino_loss_merge_kernel_traffic(a: dict) -> tuple[int, int]:
    return (_bytes(a["s_stats_ptr"], a["t_stats_ptr"], a["t_parts_ptr"]),
            _bytes(a["lse_s_ptr"], a["t_norm_ptr"], a["t_sum_ptr"], a["loss_parts_ptr"]))


def _dino_loss_bwd_kernel_traffic(a: dict) -> tuple[int, int]:
    rows_s, rows_t = a["V"] * a["B"], a["G"] * a["B"]
    read = (rows_s * a["K"] * a["s_ptr"].element_size() + rows_t * a["K"] * a["t_ptr"].element_size()
            + (a["K"] * a["c_ptr"].element_size() if a["TARGET_IS_LOGITS"] else 0)
            + _bytes(a["lse_s_ptr"], a["t_norm_ptr"]) + a["g_ptr"].element_size())
    return read, rows_s * a["K"] * a["ds_ptr"].element_size()


KERNEL_TRAFFIC = {
    "_dino_loss_fwd_kernel": _dino_loss_fwd_kernel_traffic,
    "_dino_loss_merge_kernel": _dino_loss_merge_kernel_traffic,
    "_dino_loss_bwd_kernel": _dino_loss_bwd_kernel_traffic,
}


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


def _merge_shape(n_tiles: int) -> tuple[int, int, int]:
    """(BLOCK_ROWS, BLOCK_TILES, BLOCK_COLS) of the merge kernel: ~4K statistics per program."""
    block_tiles = triton.next_power_of_2(n_tiles)
    return max(1, 4096 // block_tiles), block_tiles, 1024


def dino_loss_fwd(
    student: Tensor, target: Tensor, center: Tensor, n_crops: int, n_targets: int, student_temp: float,
    target_temp: float, target_is_logits: bool, exclude_same: bool, with_target_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Launch the forward and merge kernels. Returns (loss, lse of student/tau_s per row [n_crops*B],
    normaliser per target row [n_targets*B], column sum of the target rows [K] or [0])."""
    student, target = _unit_last_dim(student), _unit_last_dim(target)
    K = student.shape[1]
    B = student.shape[0] // n_crops
    block_k, n_tiles, per_group, num_warps = _launch_shape(
        K, B, max(student.element_size(), target.element_size()))
    n_groups = triton.cdiv(B, per_group)
    f32 = dict(device=student.device, dtype=torch.float32)
    s_stats = torch.empty(2, n_crops * B, n_tiles, **f32)
    t_stats = torch.empty(4 if exclude_same else 3, n_targets * B, n_tiles, **f32)
    t_parts = torch.empty(n_groups if with_target_sum else 0, K, **f32)
    _dino_loss_fwd_kernel[(n_tiles, n_groups)](
        student, target, center, s_stats, t_stats, t_parts,
        B, K, n_crops, n_targets, n_tiles, per_group, student.stride(0), target.stride(0),
        1.0 / student_temp, 1.0 / target_temp,
        BLOCK_K=block_k, TARGET_IS_LOGITS=target_is_logits, EXCLUDE_SAME=exclude_same,
        WITH_TARGET_SUM=with_target_sum, num_warps=num_warps,
    )
    block_rows, block_tiles, block_cols = _merge_shape(n_tiles)
    n_s_blocks = triton.cdiv(n_crops * B, block_rows)
    n_t_blocks = triton.cdiv(n_targets * B, block_rows)
    n_programs = n_s_blocks + n_t_blocks + (triton.cdiv(K, block_cols) if with_target_sum else 0)
    lse_s = torch.empty(n_crops * B, **f32)
    norm_t = torch.empty(n_targets * B, **f32)
    loss_parts = torch.empty(n_programs, **f32)
    t_sum = torch.empty(K if with_target_sum else 0, **f32)
    _dino_loss_merge_kernel[(n_programs,)](
        s_stats, t_stats, t_parts, lse_s, norm_t, loss_parts, t_sum,
        B, K, n_crops, n_targets, n_tiles, n_groups, n_s_blocks, n_t_blocks,
        1.0 / (_n_pairs(n_crops, n_targets, exclude_same) * B),
        BLOCK_ROWS=block_rows, BLOCK_TILES=block_tiles, BLOCK_COLS=block_cols, EXCLUDE_SAME=exclude_same,
    )
    loss = loss_parts.sum()
    out_dtype = torch.promote_types(student.dtype, torch.float32)
    return loss.to(out_dtype), lse_s, norm_t, t_sum


def dino_loss_bwd(
    grad: Tensor, student: Tensor, target: Tensor, center: Tensor, lse_s: Tensor, norm_t: Tensor,
    n_crops: int, n_targets: int, student_temp: float, target_temp: float, target_is_logits: bool,
    exclude_same: bool,
) -> Tensor:
    """Launch the backward kernel: d loss / d student, a contiguous [n_crops*B, K] in the student's dtype."""
    # grad may be a stride-0 expanded view of a scalar: the kernel reads one value from its pointer
    student, target = _unit_last_dim(student), _unit_last_dim(target)
    K = student.shape[1]
    B = student.shape[0] // n_crops
    block_k, n_tiles, per_group, num_warps = _launch_shape(
        K, B, max(student.element_size(), target.element_size()))
    grad_student = student.new_empty(student.shape)
    scale = 1.0 / (student_temp * _n_pairs(n_crops, n_targets, exclude_same) * B)
    _dino_loss_bwd_kernel[(n_tiles, triton.cdiv(B, per_group))](
        student, target, center, lse_s, norm_t, grad, grad_student,
        B, K, n_crops, n_targets, per_group, student.stride(0), target.stride(0),
        1.0 / student_temp, 1.0 / target_temp, scale,
        BLOCK_K=block_k, TARGET_IS_LOGITS=target_is_logits, EXCLUDE_SAME=exclude_same, num_warps=num_warps,
    )
    return grad_student


# Registered as custom ops (not triton_op) so that opcheck and torch.compile also run on CPU
# tensors under TRITON_INTERPRET=1 (see shared/NOTES.md).
@torch.library.custom_op("fastssl::dino_soft_ce_fwd", mutates_args=())
def _fwd_op(
    student: Tensor, target: Tensor, center: Tensor, n_crops: int, n_targets: int, student_temp: float,
    target_temp: float, target_is_logits: bool, exclude_same: bool, with_target_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dino_loss_fwd(student, target, center, n_crops, n_targets, student_temp, target_temp,
                         target_is_logits, exclude_same, with_target_sum)


@_fwd_op.register_fake
def _(student, target, center, n_crops, n_targets, student_temp, target_temp, target_is_logits,
      exclude_same, with_target_sum):
    f32 = dict(device=student.device, dtype=torch.float32)
    loss = student.new_empty((), dtype=torch.promote_types(student.dtype, torch.float32))
    K = student.shape[1] if with_target_sum else 0
    return loss, torch.empty(student.shape[0], **f32), torch.empty(target.shape[0], **f32), torch.empty(K, **f32)


@torch.library.custom_op("fastssl::dino_soft_ce_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, student: Tensor, target: Tensor, center: Tensor, lse_s: Tensor, norm_t: Tensor,
    n_crops: int, n_targets: int, student_temp: float, target_temp: float, target_is_logits: bool,
    exclude_same: bool,
) -> Tensor:
    return dino_loss_bwd(grad, student, target, center, lse_s, norm_t, n_crops, n_targets, student_temp,
                         target_temp, target_is_logits, exclude_same)


@_bwd_op.register_fake
def _(grad, student, *args):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, target, center, *params = inputs
    ctx.save_for_backward(student, target, center, output[1], output[2])
    ctx.params = params[:6]  # n_crops .. exclude_same


def _backward(ctx, grad_loss, *unused_grads):
    student, target, center, lse_s, norm_t = ctx.saved_tensors
    grad_student = _bwd_op(grad_loss, student, target, center, lse_s, norm_t, *ctx.params)
    # The target (teacher) and center get no gradient, as in DINO's teacher.detach().
    return grad_student, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("fastssl::dino_soft_ce_fwd", _backward, setup_context=_setup_context)


def soft_cross_entropy_ref(
    student: Tensor, probs: Tensor, *, n_crops: int, n_targets: int, student_temp: float, exclude_same: bool
) -> Tensor:
    """Mean over pairs (i, v) (v != i when exclude_same) of the batch mean of
    -sum_k probs_i[k] * log_softmax(s_v / student_temp)[k]; float32 math for half inputs."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_q = (student.to(dtype) / student_temp).log_softmax(dim=-1).chunk(n_crops)
    p = probs.to(dtype).detach().chunk(n_targets)
    terms = [-(p[i] * log_q[v]).sum(dim=-1).mean()
             for i in range(n_targets) for v in range(n_crops) if not (exclude_same and v == i)]
    return torch.stack(terms).mean()


def dino_loss_ref(
    student: Tensor, teacher: Tensor, center: Tensor, *, n_crops: int, n_global: int = 2,
    student_temp: float = 0.1, teacher_temp: float = 0.04,
) -> Tensor:
    """The DINO loss as the official DINOLoss computes it (float32 math for half inputs)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    probs = ((teacher.to(dtype) - center.to(dtype).reshape(1, -1)) / teacher_temp).softmax(dim=-1)
    return soft_cross_entropy_ref(student, probs, n_crops=n_crops, n_targets=n_global,
                                  student_temp=student_temp, exclude_same=True)


def _check_count(name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_blocks(student: Tensor, target: Tensor, n_crops: int, n_targets: int, target_name: str,
                  targets_name: str) -> int:
    """Validate the row-block layout; return B."""
    check_tensor("student", student, ndim=2)
    check_tensor(target_name, target, ndim=2, device=student.device, like="student")
    if n_targets > n_crops:
        raise ValueError(f"{targets_name} must be <= n_crops, got {targets_name}={n_targets} > n_crops={n_crops}")
    if student.shape[0] % n_crops:
        raise ValueError(f"student rows must be divisible by n_crops={n_crops}, got shape {tuple(student.shape)}")
    B = student.shape[0] // n_crops
    if tuple(target.shape) != (n_targets * B, student.shape[1]):
        raise ValueError(f"{target_name} must have shape ({targets_name} * B, K) = ({n_targets * B}, "
                         f"{student.shape[1]}) for student {tuple(student.shape)} and n_crops={n_crops}, "
                         f"got {tuple(target.shape)}")
    return B


def _dino_loss(student, teacher, center, n_crops, n_global, student_temp, teacher_temp, backend,
               with_teacher_sum):
    n_crops = _check_count("n_crops", n_crops, 2)
    n_global = _check_count("n_global", n_global, 1)
    _check_blocks(student, teacher, n_crops, n_global, "teacher", "n_global")
    check_tensor("center", center, ndim=(1, 2), device=student.device, like="student")
    K = student.shape[1]
    if center.numel() != K or (center.ndim == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape [1, K] or [K] with K={K}, got {tuple(center.shape)}")
    student_temp = check_positive("student_temp", student_temp)
    teacher_temp = check_positive("teacher_temp", teacher_temp)
    if resolve_backend(backend, student, teacher, center) == "torch":
        loss = dino_loss_ref(student, teacher, center, n_crops=n_crops, n_global=n_global,
                             student_temp=student_temp, teacher_temp=teacher_temp)
        teacher_sum = teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32)).sum(dim=0)
        return loss, (teacher_sum if with_teacher_sum else None)
    # The op saves the center for backward; a copy lets callers update theirs in place before
    # backward (DINO's loop does), which autograd would otherwise reject.
    center = center.detach().reshape(-1).clone()
    loss, _, _, t_sum = _fwd_op(student, teacher, center, n_crops, n_global, student_temp,
                                teacher_temp, True, True, with_teacher_sum)
    return loss, (t_sum if with_teacher_sum else None)


def dino_loss(
    student: Tensor, teacher: Tensor, center: Tensor, *, n_crops: int, n_global: int = 2,
    student_temp: float = 0.1, teacher_temp: float = 0.04, backend: str = "auto",
) -> Tensor:
    """DINO's multi-crop cross-entropy (Caron et al. 2021, eq. 3), fused.

    student: [n_crops * B, K] logits, crop-major (rows [v*B, (v+1)*B) are crop v, as
    ``chunk(n_crops)`` splits them; the first n_global crops are the teacher's views).
    teacher: [n_global * B, K] logits, same layout. center: [1, K] or [K].
    Returns the scalar mean over pairs (i, v != i) of the batch mean of
    -sum_k softmax((t_i - center)/teacher_temp)_k * log_softmax(s_v/student_temp)_k,
    in float32 (float64 for float64 input). Gradient flows to `student` only.
    Any float dtype is accepted; the kernel computes in float32.
    """
    return _dino_loss(student, teacher, center, n_crops, n_global, student_temp, teacher_temp, backend,
                      False)[0]


def soft_cross_entropy(
    student: Tensor, target: Tensor, *, n_crops: int = 1, n_targets: int = 1, student_temp: float = 1.0,
    exclude_same: bool = False, backend: str = "auto",
) -> Tensor:
    """Cross-entropy of student row blocks against given non-negative target weights.

    student: [n_crops * B, K]; target: [n_targets * B, K], each row a non-negative weight vector
    normalised to a distribution p_i = w_i / sum(w_i) (a multi-hot row gives 1/k on its k labels).
    Returns the mean over pairs (i, v) (v != i when exclude_same) of the batch mean of
    -sum_k p_i[k] * log_softmax(s_v / student_temp)[k]. Gradient flows to `student` only.
    Rows of `target` must not sum to 0 (the callers check; the result is NaN otherwise).
    """
    n_crops = _check_count("n_crops", n_crops, 2 if exclude_same else 1)
    n_targets = _check_count("n_targets", n_targets, 1)
    _check_blocks(student, target, n_crops, n_targets, "target", "n_targets")
    student_temp = check_positive("student_temp", student_temp)
    if resolve_backend(backend, student, target) == "torch":
        probs = target.to(torch.promote_types(target.dtype, torch.float32))
        probs = probs / probs.sum(dim=-1, keepdim=True)
        return soft_cross_entropy_ref(student, probs, n_crops=n_crops, n_targets=n_targets,
                                      student_temp=student_temp, exclude_same=exclude_same)
    dummy_center = target.new_zeros(1)
    return _fwd_op(student, target, dummy_center, n_crops, n_targets, student_temp, 1.0, False, exclude_same,
                   False)[0]


@torch.no_grad()
def dino_update_center_(center: Tensor, teacher: Tensor | None, momentum: float = 0.9, *,
                        teacher_sum: Tensor | None = None, n_rows: int | None = None) -> Tensor:
    """center <- momentum * center + (1 - momentum) * mean over all ranks' teacher rows; in place.

    center: [1, K] or [K] (float). teacher: [N, K] this rank's teacher logits. Instead of
    `teacher`, a precomputed column sum `teacher_sum` [K] of `n_rows` rows may be given (the fused
    loss produces it). The sum is all-reduced when torch.distributed is initialised, as in DINO.
    """
    check_tensor("center", center, ndim=(1, 2))
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    if teacher_sum is None:
        check_tensor("teacher", teacher, ndim=2, device=center.device, like="center")
        n_rows = teacher.shape[0]
        teacher_sum = teacher.to(torch.promote_types(teacher.dtype, torch.float32)).sum(dim=0)
    elif n_rows is None or n_rows < 1:
        raise ValueError(f"n_rows must be a positive int when teacher_sum is given, got {n_rows}")
    if teacher_sum.numel() != center.numel() or (center.ndim == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape [1, K] or [K] with K={teacher_sum.numel()} (teacher's last "
                         f"dim), got {tuple(center.shape)}")
    batch_sum = teacher_sum.to(torch.promote_types(teacher_sum.dtype, torch.float32)).clone()
    all_reduce_sum_(batch_sum)
    batch_mean = batch_sum / (n_rows * get_world_size())
    center.mul_(momentum).add_(batch_mean.view_as(center).to(center.dtype), alpha=1.0 - momentum)
    return center
