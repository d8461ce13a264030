"""Fused soft-target cross-entropy over row blocks: the DINO loss and the multi-label softmax loss.

DINO (Caron et al., 2021) compares every teacher crop i (n_global_crops of them) with every student
crop v != i (n_crops of them) for each of B samples:

    p_i  = softmax((t_i - center) / tau_t)                 (teacher, no gradient)
    loss = 1/(n_pairs * B) * sum_b sum_{(i, v), v != i} [ lse(s_v / tau_s) - <p_i, s_v> / tau_s ]

The official code materialises softmax / log-softmax / product tensors for each of the
n_pairs = n_global_crops * (n_crops - 1) pairs. Here the pair sum is regrouped so that no per-pair
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
last dimension that is not unit-stride is copied. Kernels, launchers and their traffic formulas are in
_dino_loss_kernels.py; the center update (an all-reduce) is fastssl.losses.dino_update_center_.

The same kernels, with the target given as non-negative weights (p_i = w_i / sum w_i) instead of
teacher logits, compute the multi-label softmax loss (n_crops = n_targets = 1, the pair (0, 0)
included) and DINOv2's Sinkhorn-Knopp-teacher loss; with a row table and per-row weights, iBOT's
masked-patch loss (fastssl.ops.ibot_patch_loss).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.ops.backend import HAS_TRITON, resolve_backend
from fastssl.validation import check_bool, check_int, check_positive, check_tensor

if HAS_TRITON:  # without triton only the reference runs (resolve_backend refuses "triton")
    from fastssl.ops._dino_loss_kernels import dino_loss_bwd, dino_loss_fwd


# Registered as custom ops (not triton_op) so that opcheck and torch.compile also run on CPU
# tensors under TRITON_INTERPRET=1.
@torch.library.custom_op("fastssl::dino_loss_fwd", mutates_args=())
def _fwd_op(
    student: Tensor, target: Tensor, center: Tensor, n_crops: int, n_targets: int, student_temp: float,
    target_temp: float, target_is_logits: bool, exclude_same: bool, with_target_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dino_loss_fwd(student, target, center, n_crops=n_crops, n_targets=n_targets, student_temp=student_temp,
                         target_temp=target_temp, target_is_logits=target_is_logits, exclude_same=exclude_same,
                         with_target_sum=with_target_sum)


def dino_loss_fwd_fake(student: Tensor, *, student_rows: int, target_rows: int,
                       with_target_sum: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Empty tensors shaped as the forward kernel's outputs (the fake of every custom op that runs
    it, iBOT's included): the loss (fp32; fp64 for fp64 input), then in fp32 the log-sum-exp of
    each student row, the normaliser of each target row and the target column sum ([K], or [0]
    without with_target_sum)."""
    f32 = dict(device=student.device, dtype=torch.float32)
    loss = student.new_empty((), dtype=torch.promote_types(student.dtype, torch.float32))
    K = student.shape[-1] if with_target_sum else 0
    return loss, torch.empty(student_rows, **f32), torch.empty(target_rows, **f32), torch.empty(K, **f32)


@_fwd_op.register_fake
def _(student, target, center, n_crops, n_targets, student_temp, target_temp, target_is_logits,
      exclude_same, with_target_sum):
    return dino_loss_fwd_fake(student, student_rows=student.shape[0], target_rows=target.shape[0],
                              with_target_sum=with_target_sum)


@torch.library.custom_op("fastssl::dino_loss_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, student: Tensor, target: Tensor, center: Tensor, lse_s: Tensor, norm_t: Tensor,
    n_crops: int, n_targets: int, student_temp: float, target_temp: float, target_is_logits: bool,
    exclude_same: bool,
) -> Tensor:
    return dino_loss_bwd(grad, student, target, center, lse_s, norm_t, n_crops=n_crops, n_targets=n_targets,
                         student_temp=student_temp, target_temp=target_temp, target_is_logits=target_is_logits,
                         exclude_same=exclude_same)


@_bwd_op.register_fake
def _(grad, student, *args):
    return torch.empty_like(student)


_FLAGS = ("n_crops", "n_targets", "student_temp", "target_temp", "target_is_logits", "exclude_same")


def _setup_context(ctx, inputs, output):
    student, target, center, *params = inputs
    ctx.save_for_backward(student, target, center, output[1], output[2])
    ctx.flags = dict(zip(_FLAGS, params))


def _backward(ctx, grad_loss, *unused_grads):
    student, target, center, lse_s, norm_t = ctx.saved_tensors
    grad_student = _bwd_op(grad_loss, student, target, center, lse_s, norm_t, **ctx.flags)
    # The target (teacher) and center get no gradient, as in DINO's teacher.detach().
    return grad_student, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- references


def soft_cross_entropy_ref(
    student: Tensor, target: Tensor, *, n_crops: int = 1, n_targets: int = 1, student_temp: float = 1.0,
    exclude_same: bool = False,
) -> Tensor:
    """`soft_cross_entropy` in plain PyTorch: p_i = w_i / sum(w_i), then the mean over pairs (i, v)
    (v != i when exclude_same) of the batch mean of -sum_k p_i[k] * log_softmax(s_v / student_temp)[k];
    float32 math for half inputs."""
    probs = target.to(torch.promote_types(target.dtype, torch.float32))
    return _pair_mean(student, probs / probs.sum(dim=-1, keepdim=True), n_crops=n_crops, n_targets=n_targets,
                      student_temp=student_temp, exclude_same=exclude_same)


def _pair_mean(student: Tensor, probs: Tensor, *, n_crops: int, n_targets: int, student_temp: float,
               exclude_same: bool) -> Tensor:
    dtype = torch.promote_types(student.dtype, torch.float32)
    log_q = (student.to(dtype) / student_temp).log_softmax(dim=-1).chunk(n_crops)
    p = probs.to(dtype).detach().chunk(n_targets)
    terms = [-(p[i] * log_q[v]).sum(dim=-1).mean()
             for i in range(n_targets) for v in range(n_crops) if not (exclude_same and v == i)]
    return torch.stack(terms).mean()


def dino_loss_ref(
    student: Tensor, teacher: Tensor, center: Tensor, *, n_crops: int, n_global_crops: int = 2,
    student_temp: float = 0.1, teacher_temp: float = 0.04,
) -> Tensor:
    """The DINO loss as the official DINOLoss computes it (float32 math for half inputs)."""
    dtype = torch.promote_types(student.dtype, torch.float32)
    probs = ((teacher.to(dtype) - center.to(dtype).reshape(1, -1)) / teacher_temp).softmax(dim=-1)
    return _pair_mean(student, probs, n_crops=n_crops, n_targets=n_global_crops, student_temp=student_temp,
                      exclude_same=True)


# ----------------------------------------------------------------------------- public functions


def _check_blocks(student: Tensor, target: Tensor, n_crops: int, n_targets: int, *, target_name: str,
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


def _dino_loss(student: Tensor, teacher: Tensor, center: Tensor, *, n_crops: int, n_global_crops: int,
               student_temp: float, teacher_temp: float, backend: str,
               with_teacher_sum: bool) -> tuple[Tensor, Tensor | None]:
    n_crops = check_int("n_crops", n_crops, low=2)
    n_global_crops = check_int("n_global_crops", n_global_crops, low=1)
    _check_blocks(student, teacher, n_crops, n_global_crops, target_name="teacher", targets_name="n_global_crops")
    check_tensor("center", center, ndim=(1, 2), device=student.device, like="student")
    K = student.shape[1]
    if center.numel() != K or (center.ndim == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape [1, K] or [K] with K={K}, got {tuple(center.shape)}")
    student_temp = check_positive("student_temp", student_temp)
    teacher_temp = check_positive("teacher_temp", teacher_temp)
    if resolve_backend(backend, student, teacher, center) == "torch":
        loss = dino_loss_ref(student, teacher, center, n_crops=n_crops, n_global_crops=n_global_crops,
                             student_temp=student_temp, teacher_temp=teacher_temp)
        teacher_sum = teacher.detach().to(torch.promote_types(teacher.dtype, torch.float32)).sum(dim=0)
        return loss, (teacher_sum if with_teacher_sum else None)
    # The op saves the center for backward; a copy lets callers update theirs in place before
    # backward (DINO's loop does), which autograd would otherwise reject.
    center = center.detach().reshape(-1).clone()
    loss, _, _, t_sum = _fwd_op(student, teacher, center, n_crops=n_crops, n_targets=n_global_crops,
                                student_temp=student_temp, target_temp=teacher_temp, target_is_logits=True,
                                exclude_same=True, with_target_sum=with_teacher_sum)
    return loss, (t_sum if with_teacher_sum else None)


def dino_loss(
    student: Tensor, teacher: Tensor, center: Tensor, *, n_crops: int, n_global_crops: int = 2,
    student_temp: float = 0.1, teacher_temp: float = 0.04, backend: str = "auto",
) -> Tensor:
    """DINO's multi-crop cross-entropy (Caron et al. 2021, eq. 3), fused.

    student: [n_crops * B, K] logits, crop-major (rows [v*B, (v+1)*B) are crop v, as
    ``chunk(n_crops)`` splits them; the first n_global_crops crops are the teacher's views).
    teacher: [n_global_crops * B, K] logits, same layout. center: [1, K] or [K].
    Returns the scalar mean over pairs (i, v != i) of the batch mean of
    -sum_k softmax((t_i - center)/teacher_temp)_k * log_softmax(s_v/student_temp)_k,
    in float32 (float64 for float64 input). Gradient flows to `student` only.
    Any float dtype is accepted; the kernel computes in float32.
    """
    return _dino_loss(student, teacher, center, n_crops=n_crops, n_global_crops=n_global_crops,
                      student_temp=student_temp, teacher_temp=teacher_temp, backend=backend,
                      with_teacher_sum=False)[0]


def dino_loss_with_teacher_sum(
    student: Tensor, teacher: Tensor, center: Tensor, *, n_crops: int, n_global_crops: int = 2,
    student_temp: float = 0.1, teacher_temp: float = 0.04, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """`dino_loss` and the column sum [K] (fp32; fp64 for fp64 input) of the teacher rows, which the
    kernel reads anyway: what the center update needs, without another pass over the teacher."""
    loss, teacher_sum = _dino_loss(student, teacher, center, n_crops=n_crops, n_global_crops=n_global_crops,
                                   student_temp=student_temp, teacher_temp=teacher_temp, backend=backend,
                                   with_teacher_sum=True)
    return loss, teacher_sum


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
    exclude_same = check_bool("exclude_same", exclude_same)
    n_crops = check_int("n_crops", n_crops, low=2 if exclude_same else 1)
    n_targets = check_int("n_targets", n_targets, low=1)
    _check_blocks(student, target, n_crops, n_targets, target_name="target", targets_name="n_targets")
    student_temp = check_positive("student_temp", student_temp)
    if resolve_backend(backend, student, target) == "torch":
        return soft_cross_entropy_ref(student, target, n_crops=n_crops, n_targets=n_targets,
                                      student_temp=student_temp, exclude_same=exclude_same)
    unused_center = target.new_zeros(1)
    return _fwd_op(student, target, unused_center, n_crops=n_crops, n_targets=n_targets, student_temp=student_temp,
                   target_temp=1.0, target_is_logits=False, exclude_same=exclude_same, with_target_sum=False)[0]
