"""iBOT's masked-patch loss (Zhou et al. 2022; DINOv2, Oquab et al. 2023), fused through the DINO kernels.

For B images of L patch tokens with a boolean mask m [B, L] (n_b = max(1, sum_l m[b, l]) masked
tokens in image b), each masked token r (of image b_r) compares its student logits s_r with its
teacher target p_r:

    p_r  = softmax((t_r - center) / tau_t)                       (teacher logits, centering)
       or  p_r = q_r / sum(q_r)                                  (given targets, e.g. Sinkhorn-Knopp's)
    loss = -1/B * sum_r w_r * sum_k p_r[k] * log_softmax(s_r / tau_s)[k],   w_r = 1 / n_{b_r}

so each image's masked tokens are averaged and the images' terms are averaged over all B images,
masked or not (DINOv2's forward_masked with its default masks_weight). The masked rows are
read in place: the kernels of fastssl.ops.dino_loss (one row block, n_crops = n_targets = 1) take
a table of flat token indices b * L + l and address each row of a [B, L, K] tensor through its
strides, and the per-token weights w_r / B; no [masked tokens, K] copy, probability or gradient
tensor is made besides the gradient itself. The backward writes

    grad s_r = w_r * (softmax(s_r / tau_s) - p_r) / (tau_s * B) * grad_out

into a zero tensor of the student's shape. The teacher's center update and the Sinkhorn-Knopp
targets (which all-reduce over ranks) are fastssl.losses.ibot's.

Inputs: `student` and `teacher` are each either [B, L, K] (all tokens; the masked ones are
read) or [N, K] with N >= n (the n masked tokens first, in the order of m.flatten().nonzero(), as
DINOv2's buffers hold them).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastssl.ops.backend import HAS_TRITON, resolve_backend
from fastssl.ops.dino_loss import dino_loss_fwd_fake
from fastssl.validation import check_positive, check_tensor

if HAS_TRITON:  # without triton only the reference runs (resolve_backend refuses "triton")
    from fastssl.ops._dino_loss_kernels import dino_loss_bwd, dino_loss_fwd


@torch.library.custom_op("fastssl::ibot_patch_loss_fwd", mutates_args=())
def _fwd_op(
    student: Tensor, target: Tensor, center: Tensor, student_rows: Tensor | None, target_rows: Tensor | None,
    row_weight: Tensor, student_temp: float, target_temp: float, target_is_logits: bool, with_target_sum: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return dino_loss_fwd(student, target, center, n_crops=1, n_targets=1, student_temp=student_temp,
                         target_temp=target_temp, target_is_logits=target_is_logits, exclude_same=False,
                         with_target_sum=with_target_sum, student_rows=student_rows, target_rows=target_rows,
                         row_weight=row_weight)


@_fwd_op.register_fake
def _(student, target, center, student_rows, target_rows, row_weight, student_temp, target_temp,
      target_is_logits, with_target_sum):
    n = row_weight.shape[0]
    return dino_loss_fwd_fake(student, student_rows=n, target_rows=n, with_target_sum=with_target_sum)


@torch.library.custom_op("fastssl::ibot_patch_loss_bwd", mutates_args=())
def _bwd_op(
    grad: Tensor, student: Tensor, target: Tensor, center: Tensor, student_rows: Tensor | None,
    target_rows: Tensor | None, row_weight: Tensor, lse_s: Tensor, norm_t: Tensor, student_temp: float,
    target_temp: float, target_is_logits: bool,
) -> Tensor:
    return dino_loss_bwd(grad, student, target, center, lse_s, norm_t, n_crops=1, n_targets=1,
                         student_temp=student_temp, target_temp=target_temp, target_is_logits=target_is_logits,
                         exclude_same=False, student_rows=student_rows, target_rows=target_rows,
                         row_weight=row_weight)


@_bwd_op.register_fake
def _(grad, student, *args):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx, inputs, output):
    student, target, center, student_rows, target_rows, row_weight, student_temp, target_temp, is_logits, _ = inputs
    ctx.save_for_backward(student, target, center, student_rows, target_rows, row_weight, output[1], output[2])
    ctx.flags = dict(student_temp=student_temp, target_temp=target_temp, target_is_logits=is_logits)


def _backward(ctx, grad_loss, *unused_grads):
    student, target, center, student_rows, target_rows, row_weight, lse_s, norm_t = ctx.saved_tensors
    grad_student = _bwd_op(grad_loss, student, target, center, student_rows, target_rows, row_weight, lse_s,
                           norm_t, **ctx.flags)
    # The teacher targets, the center, the rows and the weights get no gradient (DINOv2's no_grad teacher).
    return grad_student, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- masks and rows


def masks_weight_from_masks(masks: Tensor, mask_indices: Tensor) -> Tensor:
    """w_r = 1 / max(1, masked tokens of token r's image) for each flat masked index r [n] (fp32),
    what DINOv2's collate computes as masks_weight; no host sync."""
    counts = masks.sum(dim=-1).clamp(min=1).to(torch.float32)
    return counts.reciprocal()[mask_indices // masks.shape[1]]


def _masked_rows(x: Tensor, mask_indices: Tensor | None, n: int) -> Tensor:
    """The n masked tokens of x: rows of [B, L, K] at the flat indices, or the first n of [N, K]."""
    if x.ndim == 3:
        return x.flatten(0, 1)[mask_indices]
    return x[:n]


def ibot_patch_loss_ref(
    student: Tensor, teacher: Tensor, center: Tensor | None, *, masks: Tensor, mask_indices: Tensor | None = None,
    masks_weight: Tensor | None = None, student_temp: float = 0.1, teacher_temp: float = 0.04,
) -> Tensor:
    """The iBOT patch loss in plain PyTorch (the module docstring's formula): with a center, the
    teacher rows are logits (softmax centering); without, they are target weights q_r normalised to
    p_r = q_r / sum(q_r) (teacher_temp unused). float32 math for half inputs, float64 for float64."""
    if mask_indices is None:
        mask_indices = masks.flatten().nonzero().flatten()
    if masks_weight is None:
        masks_weight = masks_weight_from_masks(masks, mask_indices)
    n = mask_indices.shape[0]
    dtype = torch.promote_types(student.dtype, torch.float32)
    s = _masked_rows(student, mask_indices, n).to(dtype)
    t = _masked_rows(teacher, mask_indices, n).detach().to(dtype)
    return _ref_rows(s, t, center, masks_weight.to(dtype), student_temp=student_temp,
                     teacher_temp=teacher_temp) / masks.shape[0]


def _ref_rows(s: Tensor, t: Tensor, center: Tensor | None, weight: Tensor, *, student_temp: float,
              teacher_temp: float) -> Tensor:
    """sum_r w_r * CE(p_r, s_r) over gathered rows s, t [n, K]."""
    if center is not None:
        p = ((t - center.detach().to(t.dtype).reshape(1, -1)) / teacher_temp).softmax(dim=-1)
    else:
        p = t / t.sum(dim=-1, keepdim=True)
    per_token = -(p * (s / student_temp).log_softmax(dim=-1)).sum(dim=-1)
    return (per_token * weight).sum()


# ----------------------------------------------------------------------------- public functions


def _check_tokens(name: str, x: Tensor, masks: Tensor, n: int, K: int | None, like: str | None) -> None:
    check_tensor(name, x, ndim=(2, 3), device=masks.device, like=like)
    if x.ndim == 3 and tuple(x.shape[:2]) != tuple(masks.shape):
        raise ValueError(f"{name} [B, L, K] must match masks [B, L] = {tuple(masks.shape)} in its first two dims, "
                         f"got {tuple(x.shape)}; or pass the masked tokens as [N, K]")
    if x.ndim == 2 and x.shape[0] < n:
        raise ValueError(f"{name} [N, K] must hold at least the n={n} masked tokens (rows), got {tuple(x.shape)}")
    if K is not None and x.shape[-1] != K:
        raise ValueError(f"{name} must have K={K} columns like student, got {tuple(x.shape)}")


def _ibot(student: Tensor, teacher: Tensor, center: Tensor | None, *, masks: Tensor, mask_indices: Tensor | None,
          masks_weight: Tensor | None, student_temp: float, teacher_temp: float, backend: str,
          with_teacher_sum: bool) -> tuple[Tensor, Tensor | None]:
    check_tensor("masks", masks, ndim=2, dtypes=(torch.bool,))
    needs_indices = masks_weight is None or student.ndim == 3 or teacher.ndim == 3
    if mask_indices is None and needs_indices:
        mask_indices = masks.flatten().nonzero().flatten()  # a host sync on CUDA: loaders pass mask_indices
    if mask_indices is not None:
        check_tensor("mask_indices", mask_indices, ndim=1, dtypes=(torch.int64,), device=masks.device,
                     nonempty=False)
    n = mask_indices.shape[0] if mask_indices is not None else masks_weight.shape[0]
    _check_tokens("student", student, masks, n, None, None)
    _check_tokens("teacher", teacher, masks, n, student.shape[-1], "student")
    K = student.shape[-1]
    if masks_weight is None:
        masks_weight = masks_weight_from_masks(masks, mask_indices)
    check_tensor("masks_weight", masks_weight, ndim=1, device=masks.device, nonempty=False)
    if masks_weight.shape[0] != n:
        raise ValueError(f"masks_weight must have one weight per masked token (n={n}), got {tuple(masks_weight.shape)}")
    if center is not None:
        check_tensor("center", center, device=student.device, like="student")
        if center.numel() != K:
            raise ValueError(f"center must have K={K} elements ([1, 1, K], [1, K] or [K]), got {tuple(center.shape)}")
        teacher_temp = check_positive("teacher_temp", teacher_temp)
    student_temp = check_positive("student_temp", student_temp)
    if resolve_backend(backend, student, teacher, masks) == "torch" or n == 0:
        dtype = torch.promote_types(student.dtype, torch.float32)
        s = _masked_rows(student, mask_indices, n).to(dtype)
        rows = _masked_rows(teacher, mask_indices, n).detach()
        loss = _ref_rows(s, rows.to(dtype), center, masks_weight.to(dtype), student_temp=student_temp,
                         teacher_temp=teacher_temp) / masks.shape[0]
        teacher_sum = rows.to(torch.promote_types(rows.dtype, torch.float32)).sum(dim=0) if with_teacher_sum else None
        return loss, teacher_sum
    gather = student.ndim == 3 or teacher.ndim == 3
    arange = torch.arange(n, device=masks.device)
    student_rows = (mask_indices if student.ndim == 3 else arange) if gather else None
    target_rows = (mask_indices if teacher.ndim == 3 else arange) if gather else None
    row_weight = masks_weight.to(torch.float32) / masks.shape[0]
    is_logits = center is not None
    # a copy, as dino_loss's: callers may update their center in place before backward
    center = center.detach().reshape(-1).clone() if is_logits else teacher.new_zeros(1)
    loss, _, _, t_sum = _fwd_op(student, teacher, center, student_rows, target_rows, row_weight,
                                student_temp=student_temp, target_temp=teacher_temp, target_is_logits=is_logits,
                                with_target_sum=with_teacher_sum)
    return loss, (t_sum if with_teacher_sum else None)


def ibot_patch_loss(
    student: Tensor, teacher: Tensor, center: Tensor, *, masks: Tensor, mask_indices: Tensor | None = None,
    masks_weight: Tensor | None = None, student_temp: float = 0.1, teacher_temp: float = 0.04, backend: str = "auto",
) -> Tensor:
    """iBOT's masked-patch cross-entropy with a softmax-centered teacher, fused (module docstring).

    student, teacher: [B, L, K] token logits, or [N, K] with the n masked tokens first; center:
    K elements ([1, 1, K] as DINOv2 keeps it). masks: bool [B, L]. mask_indices: int64 [n], the
    flat indices of the masked tokens (masks.flatten().nonzero(); computed when omitted, a host
    sync on CUDA: DINOv2's collate and fastssl's masking produce it on the CPU). masks_weight:
    [n], default 1 / (masked tokens of the token's image). Returns the float32 scalar (float64 for
    float64 input); gradient flows to `student` only."""
    return _ibot(student, teacher, center, masks=masks, mask_indices=mask_indices, masks_weight=masks_weight,
                 student_temp=student_temp, teacher_temp=teacher_temp, backend=backend, with_teacher_sum=False)[0]


def ibot_patch_loss_with_teacher_sum(
    student: Tensor, teacher: Tensor, center: Tensor, *, masks: Tensor, mask_indices: Tensor | None = None,
    masks_weight: Tensor | None = None, student_temp: float = 0.1, teacher_temp: float = 0.04, backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """`ibot_patch_loss` and the column sum [K] (fp32; fp64 for fp64 input) of the n masked teacher
    rows, which the kernel reads anyway: what the center update needs."""
    loss, teacher_sum = _ibot(student, teacher, center, masks=masks, mask_indices=mask_indices,
                              masks_weight=masks_weight, student_temp=student_temp, teacher_temp=teacher_temp,
                              backend=backend, with_teacher_sum=True)
    return loss, teacher_sum


def ibot_patch_cross_entropy(
    student: Tensor, target: Tensor, *, masks: Tensor, mask_indices: Tensor | None = None,
    masks_weight: Tensor | None = None, student_temp: float = 0.1, backend: str = "auto",
) -> Tensor:
    """iBOT's masked-patch cross-entropy against given non-negative targets (each masked row
    normalised to a distribution: Sinkhorn-Knopp's assignments, or DINOv2's softmaxed teacher).
    Same layouts and weights as `ibot_patch_loss`; rows of `target` must not sum to 0."""
    return _ibot(student, target, None, masks=masks, mask_indices=mask_indices, masks_weight=masks_weight,
                 student_temp=student_temp, teacher_temp=1.0, backend=backend, with_teacher_sum=False)[0]
