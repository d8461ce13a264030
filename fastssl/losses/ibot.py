"""iBOTPatchLoss: a drop-in for DINOv2's iBOT patch loss module, on the fused op.

State: the `center` buffer [1, 1, patch_out_dim] and DINOv2's asynchronous center update (the
all-reduce of the teacher's batch center is launched by update_center after step n and applied
at the start of step n+1, by softmax_center_teacher or apply_center_update). Beyond the official
methods, `masked_loss` takes teacher LOGITS and runs centering + softmax inside the fused kernel
(no [masked tokens, K] probability tensor), or Sinkhorn-Knopp with the masked-token count summed
over ranks, as DINOv2 does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastssl.distributed import all_reduce_sum_, get_world_size, is_distributed
from fastssl.losses.dino import CENTERINGS, sinkhorn_knopp_teacher
from fastssl.ops.backend import BACKENDS
from fastssl.ops.ibot_patch_loss import (
    ibot_patch_cross_entropy,
    ibot_patch_loss_with_teacher_sum,
    masks_weight_from_masks,
)
from fastssl.validation import check_choice, check_int, check_number, check_positive, check_tensor


def _as_rows(x: Tensor) -> Tensor:
    """Masked tokens as [N, K] (DINOv2 passes them as [N, K] or [1, N, K])."""
    return x.reshape(-1, x.shape[-1]) if x.ndim == 3 else x


class iBOTPatchLoss(nn.Module):  # noqa: N801 (the official class name)
    """iBOT's masked-patch loss with its center (see fastssl.ops.ibot_patch_loss for the formula).

    Same constructor, methods and state as facebookresearch/dinov2's iBOTPatchLoss:
    ``iBOTPatchLoss(patch_out_dim, student_temp=0.1, center_momentum=0.9)``;
    ``forward(student_patch_tokens [B, N, K], teacher_patch_tokens [B, N, K] (probabilities),
    student_masks_flat [B, N])``; ``forward_masked(student_patch_tokens_masked [N_s, K],
    teacher_patch_tokens_masked [N_t, K] (probabilities), student_masks_flat, n_masked_patches=None,
    masks_weight=None)``; ``softmax_center_teacher``, ``sinkhorn_knopp_teacher``,
    ``update_center``, ``apply_center_update``. state_dict() is {"center": [1, 1, K]}, so an official
    checkpoint's ibot_patch_loss loads strictly and ours loads into theirs.

    Differences, all on inputs the official code leaves undefined: target rows are normalised to
    sum 1 (probabilities, the official inputs, are unchanged up to rounding); a step with no masked
    token on a rank adds a zero batch center, not NaN; sinkhorn_knopp_teacher leaves its
    n_masked_patches_tensor as it was (the official all-reduces it in place). backend (keyword,
    "auto" | "triton" | "torch") picks the kernel path.
    """

    center: Tensor

    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9, *,
                 backend: str = "auto"):
        super().__init__()
        patch_out_dim = check_int("patch_out_dim", patch_out_dim, low=1)
        self.student_temp = check_positive("student_temp", student_temp)
        self.center_momentum = check_number("center_momentum", center_momentum, low=0.0, high=1.0)
        self.backend = check_choice("backend", backend, BACKENDS)
        self.register_buffer("center", torch.zeros(1, 1, patch_out_dim))
        self.updated = True
        self.reduce_handle = None
        self.len_teacher_patch_tokens: int | None = None
        self.async_batch_center: Tensor | None = None
        self._held: tuple[Tensor, int] | None = None  # masked teacher tokens' sum and count, not yet applied

    # ------------------------------------------------------------------------- teacher targets

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_patch_tokens: Tensor, teacher_temp: float) -> Tensor:
        """softmax((t - center) / teacher_temp) over the last dim, after applying a pending update."""
        teacher_temp = check_positive("teacher_temp", teacher_temp)
        self.apply_center_update()
        dtype = torch.promote_types(teacher_patch_tokens.dtype, torch.float32)
        return ((teacher_patch_tokens.to(dtype) - self.center.to(dtype)) / teacher_temp).softmax(dim=-1)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_output: Tensor, teacher_temp: float,
                               n_masked_patches_tensor: Tensor, n_iterations: int = 3) -> Tensor:
        """DINOv2's Sinkhorn-Knopp targets [N, K] for the masked teacher tokens [N, K] (or [1, N, K]),
        the number of samples being n_masked_patches_tensor summed over ranks."""
        check_tensor("n_masked_patches_tensor", n_masked_patches_tensor, dtypes=None)
        n_samples = all_reduce_sum_(n_masked_patches_tensor.detach().clone())
        return sinkhorn_knopp_teacher(_as_rows(teacher_output), teacher_temp, n_iterations,
                                      n_samples=n_samples)

    # ------------------------------------------------------------------------- losses

    def forward(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor,
                student_masks_flat: Tensor) -> Tensor:
        """-1/B sum_b mean over image b's masked tokens of sum_k t * log_softmax(s / student_temp);
        student_patch_tokens [B, N, K] logits, teacher_patch_tokens [B, N, K] target probabilities,
        student_masks_flat bool [B, N]. Only the masked tokens are read."""
        return ibot_patch_cross_entropy(student_patch_tokens, teacher_patch_tokens, masks=student_masks_flat,
                                        student_temp=self.student_temp, backend=self.backend)

    def forward_masked(self, student_patch_tokens_masked: Tensor, teacher_patch_tokens_masked: Tensor,
                       student_masks_flat: Tensor, n_masked_patches: int | Tensor | None = None,
                       masks_weight: Tensor | None = None) -> Tensor:
        """The loss over masked tokens already gathered (DINOv2's training path): row r of each
        input is masked token r (student rows beyond n_masked_patches, a padded buffer, are
        ignored); teacher rows are target probabilities; masks_weight [n] defaults to 1 / (masked
        tokens of the token's image). A tensor n_masked_patches is read once (a host sync)."""
        check_tensor("student_masks_flat", student_masks_flat, ndim=2, dtypes=(torch.bool,))
        if n_masked_patches is not None:
            n = check_int("n_masked_patches", int(n_masked_patches), low=0)
            if masks_weight is None:
                masks_weight = masks_weight_from_masks(student_masks_flat,
                                                       student_masks_flat.flatten().nonzero().flatten())
            masks_weight = masks_weight[:n]
        return ibot_patch_cross_entropy(_as_rows(student_patch_tokens_masked),
                                        _as_rows(teacher_patch_tokens_masked), masks=student_masks_flat,
                                        masks_weight=masks_weight, student_temp=self.student_temp,
                                        backend=self.backend)

    def masked_loss(self, student_patch_tokens: Tensor, teacher_patch_tokens: Tensor, masks: Tensor, *,
                    teacher_temp: float, mask_indices: Tensor | None = None,
                    masks_weight: Tensor | None = None, centering: str = "center",
                    sinkhorn_iterations: int = 3, update_center: bool = True) -> Tensor:
        """The fused path: student and teacher LOGITS, each [B, L, K] (the masked tokens are read in
        place) or [N, K] (the n masked tokens first); masks bool [B, L]; mask_indices [n] as the
        loader produces them (computed when omitted: a host sync on CUDA).

        centering="center": softmax((t - center) / teacher_temp) inside the kernel, after applying
        a pending center update; with update_center, the masked teacher tokens' mean then starts
        the asynchronous center update (DINOv2's update_center on them). "sinkhorn_knopp": the
        targets are Sinkhorn-Knopp's over the masked teacher tokens, their count summed over ranks.
        update_center=False holds the masked tokens for commit_center_update instead."""
        check_choice("centering", centering, CENTERINGS)
        check_tensor("masks", masks, ndim=2, dtypes=(torch.bool,))
        if mask_indices is None:
            mask_indices = masks.flatten().nonzero().flatten()
        n = mask_indices.shape[0]
        if centering == "sinkhorn_knopp":
            rows = (teacher_patch_tokens.flatten(0, 1)[mask_indices] if teacher_patch_tokens.ndim == 3
                    else teacher_patch_tokens[:n])
            count = torch.full((1,), n, dtype=torch.int64, device=rows.device)
            targets = self.sinkhorn_knopp_teacher(rows, teacher_temp, count, n_iterations=sinkhorn_iterations)
            return ibot_patch_cross_entropy(student_patch_tokens, targets, masks=masks,
                                            mask_indices=mask_indices, masks_weight=masks_weight,
                                            student_temp=self.student_temp, backend=self.backend)
        self.apply_center_update()
        loss, teacher_sum = ibot_patch_loss_with_teacher_sum(
            student_patch_tokens, teacher_patch_tokens, self.center, masks=masks, mask_indices=mask_indices,
            masks_weight=masks_weight, student_temp=self.student_temp, teacher_temp=teacher_temp,
            backend=self.backend)
        if update_center:
            # the masked tokens' mean, DINOv2's update_center on them as [1, n, K]; a rank with no
            # masked token still joins the all-reduce, with a zero center
            self._reduce_batch_center((teacher_sum / max(n, 1)).reshape(1, -1), 1)
        else:
            held_sum, held_n = self._held or (0.0, 0)
            self._held = (held_sum + teacher_sum.detach(), held_n + n)
        return loss

    @torch.no_grad()
    def commit_center_update(self) -> None:
        """Start the center update with every masked token held by masked_loss(update_center=False)
        calls (gradient accumulation's micro-batches move the center as one batch of all their
        masked tokens would); no-op when none is held."""
        if self._held is not None:
            teacher_sum, n = self._held
            self._held = None
            self._reduce_batch_center((teacher_sum / max(n, 1)).reshape(1, -1), 1)

    # ------------------------------------------------------------------------- center

    @torch.no_grad()
    def update_center(self, teacher_patch_tokens: Tensor) -> None:
        """Start the center update with teacher_patch_tokens [B, N, K]: the batch center is the sum
        over B of each row's mean over N, all-reduced, divided by B * world size when applied."""
        self.reduce_center_update(teacher_patch_tokens)

    @torch.no_grad()
    def reduce_center_update(self, teacher_patch_tokens: Tensor) -> None:
        check_tensor("teacher_patch_tokens", teacher_patch_tokens, ndim=3)
        tokens = teacher_patch_tokens.to(torch.promote_types(teacher_patch_tokens.dtype, torch.float32))
        self._reduce_batch_center(tokens.mean(dim=1).sum(dim=0, keepdim=True), len(teacher_patch_tokens))

    @torch.no_grad()
    def _reduce_batch_center(self, batch_center: Tensor, n_items: int) -> None:
        self.apply_center_update()  # a second update before the first was applied must not drop it
        self.updated = False
        self.len_teacher_patch_tokens = n_items
        self.async_batch_center = batch_center.detach().clone()
        self.reduce_handle = (dist.all_reduce(self.async_batch_center, async_op=True) if is_distributed()
                              else None)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply a pending center update (no-op when none): center <- m * center + (1 - m) * batch center."""
        if self.updated:
            return
        if self.reduce_handle is not None:
            self.reduce_handle.wait()
            self.reduce_handle = None
        batch_center = self.async_batch_center / (self.len_teacher_patch_tokens * get_world_size())
        self.center.mul_(self.center_momentum).add_(batch_center.view(1, 1, -1).to(self.center.dtype),
                                                    alpha=1.0 - self.center_momentum)
        self.updated = True

    def extra_repr(self) -> str:
        return (f"patch_out_dim={self.center.shape[-1]}, student_temp={self.student_temp}, "
                f"center_momentum={self.center_momentum}")
