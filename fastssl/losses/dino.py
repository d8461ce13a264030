"""DINOLoss: a drop-in for the official DINO loss module (Caron et al. 2021), on the fused op.

State: the teacher-temperature schedule and the `center` buffer [1, out_dim]. Options beyond
the official class: an asynchronous center update (DINOv2: the all-reduce of the teacher batch
sum is launched after step n and applied at the start of step n+1, so values are unchanged
while the communication overlaps the backward) and DINOv2's Sinkhorn-Knopp teacher
(`teacher_centering="sinkhorn_knopp"`), which replaces centering + softmax.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fastssl.distributed import all_reduce_sum_, get_world_size, is_distributed
from fastssl.ops.backend import BACKENDS
from fastssl.ops.dino_loss import dino_loss_with_teacher_sum, soft_cross_entropy
from fastssl.validation import check_bool, check_choice, check_int, check_number, check_positive, check_tensor

CENTERINGS = ("center", "sinkhorn_knopp")


@torch.no_grad()
def dino_update_center_(center: Tensor, teacher: Tensor | None, momentum: float = 0.9, *,
                        teacher_sum: Tensor | None = None, n_rows: int | None = None) -> Tensor:
    """center <- momentum * center + (1 - momentum) * mean over all ranks' teacher rows; in place.

    center: [1, K] or [K] (float). teacher: [N, K] this rank's teacher logits. Instead of
    `teacher`, a precomputed column sum `teacher_sum` [K] of `n_rows` rows may be given (the fused
    loss produces it). The sum is all-reduced when torch.distributed is initialised, as in DINO.
    """
    check_tensor("center", center, ndim=(1, 2))
    check_number("momentum", momentum, low=0.0, high=1.0)
    if teacher_sum is None:
        check_tensor("teacher", teacher, ndim=2, device=center.device, like="center")
        n_rows = teacher.shape[0]
        teacher_sum = teacher.to(torch.promote_types(teacher.dtype, torch.float32)).sum(dim=0)
    elif n_rows is None:
        raise ValueError("n_rows must be a positive int when teacher_sum is given, got None")
    else:
        n_rows = check_int("n_rows", n_rows, low=1)
    if teacher_sum.numel() != center.numel() or (center.ndim == 2 and center.shape[0] != 1):
        raise ValueError(f"center must have shape [1, K] or [K] with K={teacher_sum.numel()} (teacher's last "
                         f"dim), got {tuple(center.shape)}")
    batch_sum = teacher_sum.to(torch.promote_types(teacher_sum.dtype, torch.float32)).clone()
    all_reduce_sum_(batch_sum)
    batch_mean = batch_sum / (n_rows * get_world_size())
    center.mul_(momentum).add_(batch_mean.view_as(center).to(center.dtype), alpha=1.0 - momentum)
    return center


def teacher_temp_schedule(warmup_teacher_temp: float, teacher_temp: float, warmup_teacher_temp_epochs: int,
                          nepochs: int) -> np.ndarray:
    """DINO's teacher temperature per epoch [nepochs]: linear from warmup_teacher_temp to teacher_temp
    over warmup_teacher_temp_epochs epochs, then teacher_temp (the official array)."""
    return np.concatenate((
        np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
        np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
    ))


def _logsumexp_all_ranks(x: Tensor, dim: int | None = None) -> Tensor:
    """logsumexp over `dim` (all elements when None) of the rows of all ranks together."""
    local = x.logsumexp(dim=dim) if dim is not None else x.flatten().logsumexp(dim=0)
    if not is_distributed():
        return local
    shift = local.clone()
    dist.all_reduce(shift, op=dist.ReduceOp.MAX)
    total = all_reduce_sum_((local - shift).exp())
    return shift + total.log()


@torch.no_grad()
def sinkhorn_knopp_teacher(teacher_output: Tensor, teacher_temp: float, n_iterations: int = 3, *,
                           n_samples: Tensor | None = None) -> Tensor:
    """DINOv2's Sinkhorn-Knopp teacher (after SwAV): [N, K] logits -> [N, K] assignments.

    Q = exp(t / teacher_temp), normalised to total mass 1, then `n_iterations` times: each
    prototype's mass to 1/K, each sample's mass to 1/B, with B the number of samples over all
    ranks (N * world size, or `n_samples`, a tensor already summed over ranks: iBOT's masked-token
    count); finally each sample's row sums to B times its share of the mass (1 when every rank's
    rows are all samples). The prototype sums and the total are reduced over
    ranks, so W ranks with N rows each compute what one process computes on all W*N rows.
    Computed in the log domain, in float32 (float64 for float64 input): DINOv2's exp(t / T)
    overflows for t / T > 88, and any shifted version underflows whole prototypes to 0.
    """
    check_tensor("teacher_output", teacher_output, ndim=2)
    teacher_temp = check_positive("teacher_temp", teacher_temp)
    n_iterations = check_int("n_iterations", n_iterations, low=1)
    log_q = teacher_output.to(torch.promote_types(teacher_output.dtype, torch.float32)) / teacher_temp
    if n_samples is None:
        log_n_samples = math.log(log_q.shape[0] * get_world_size())
    else:
        log_n_samples = n_samples.to(device=log_q.device, dtype=log_q.dtype).reshape(()).log()
    log_n_prototypes = math.log(log_q.shape[1])
    log_q -= _logsumexp_all_ranks(log_q)
    for _ in range(n_iterations):
        log_q -= _logsumexp_all_ranks(log_q, dim=0) + log_n_prototypes  # each prototype (column) to 1/K
        log_q -= log_q.logsumexp(dim=1, keepdim=True) + log_n_samples  # each sample (row) to 1/B
    return (log_q + log_n_samples).exp()


class DINOLoss(nn.Module):
    """The DINO loss with its teacher-temperature schedule and center.

    Same constructor and forward as facebookresearch/dino's DINOLoss:
    ``DINOLoss(out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs,
    nepochs, student_temp=0.1, center_momentum=0.9)``, ``loss = criterion(student_output,
    teacher_output, epoch)`` with student_output [ncrops * B, out_dim] and teacher_output
    [n_global_crops * B, out_dim], both crop-major; ncrops = n_global_crops (no local crops, the
    official --local_crops_number 0) and n_global_crops = 1 work too. The teacher temperature rises
    linearly from warmup_teacher_temp to teacher_temp over warmup_teacher_temp_epochs epochs, then
    stays. After each forward the center moves towards the teacher batch mean (all ranks) with
    `center_momentum`. A caller that owns the schedule (fastssl's DINO method, through
    `Method.schedules`) passes ``criterion(student_output, teacher_output, teacher_temp=t)`` instead.

    Extra keyword options: n_global_crops (teacher crops, 2 in DINO); teacher_centering "center"
    (DINO) or "sinkhorn_knopp" (DINOv2; the center is then left alone, as DINOv2 does);
    async_center (DINOv2's overlapped all-reduce: the update from step n is applied at the
    start of step n+1, or by apply_center_update() — call it before reading or saving `center`);
    sinkhorn_iterations; backend ("auto" | "triton" | "torch", see fastssl.ops.backend), fixed here.

    Arguments are validated here, once; the forward checks only shapes, so
    torch.compile(fullgraph=True) traces it with a few graphs in all, not one per epoch.
    state_dict() is {"center"}, as the official class's: its checkpoints' "dino_loss" loads as is.
    """

    center: Tensor

    def __init__(
        self, out_dim: int, ncrops: int, warmup_teacher_temp: float, teacher_temp: float,
        warmup_teacher_temp_epochs: int, nepochs: int, student_temp: float = 0.1,
        center_momentum: float = 0.9, *, n_global_crops: int = 2, teacher_centering: str = "center",
        async_center: bool = False, sinkhorn_iterations: int = 3, backend: str = "auto",
    ):
        super().__init__()
        out_dim = check_int("out_dim", out_dim, low=1)
        nepochs = check_int("nepochs", nepochs, low=1)
        n_global_crops = check_int("n_global_crops", n_global_crops, low=1)
        ncrops = check_int("ncrops", ncrops)
        if ncrops < max(2, n_global_crops):
            raise ValueError(f"ncrops must be >= n_global_crops={n_global_crops} and >= 2 (each teacher "
                             f"crop is compared with every other student crop), got {ncrops}")
        warmup_teacher_temp_epochs = check_int("warmup_teacher_temp_epochs", warmup_teacher_temp_epochs,
                                               low=0, high=nepochs)
        check_positive("warmup_teacher_temp", warmup_teacher_temp)
        check_positive("teacher_temp", teacher_temp)
        check_positive("student_temp", student_temp)
        check_number("center_momentum", center_momentum, low=0.0, high=1.0)
        check_choice("teacher_centering", teacher_centering, CENTERINGS)
        check_bool("async_center", async_center)
        sinkhorn_iterations = check_int("sinkhorn_iterations", sinkhorn_iterations, low=1)
        check_choice("backend", backend, BACKENDS)
        self.out_dim, self.ncrops, self.n_global_crops = out_dim, ncrops, n_global_crops
        self.student_temp, self.center_momentum = float(student_temp), float(center_momentum)
        self.teacher_centering, self.async_center = teacher_centering, async_center
        self.sinkhorn_iterations, self.backend = sinkhorn_iterations, backend
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.teacher_temp_schedule = teacher_temp_schedule(warmup_teacher_temp, teacher_temp,
                                                           warmup_teacher_temp_epochs, nepochs)
        # The schedule as arithmetic on Python floats (what np.linspace computes: start + i * step,
        # the last warm-up epoch exactly teacher_temp): under torch.compile the temperature is then
        # a function of the epoch, not a traced numpy element no check can branch on.
        self._warmup = (int(warmup_teacher_temp_epochs), float(warmup_teacher_temp), float(teacher_temp))
        self._pending: tuple[Tensor, object, int] | None = None  # (batch sum, all-reduce handle, rows)
        self._held: tuple[Tensor, int] | None = None  # (teacher column sum, rows) of held micro-batches

    def teacher_temp_at(self, epoch: int) -> float:
        """The teacher temperature used in `epoch` (0-based)."""
        epoch = check_int("epoch", epoch, low=0, high=len(self.teacher_temp_schedule) - 1)
        n_warmup, start, stop = self._warmup
        if epoch >= n_warmup:
            return stop
        if n_warmup == 1:
            return start
        if epoch == n_warmup - 1:
            return stop
        return start + epoch * ((stop - start) / (n_warmup - 1))

    def forward(self, student_output: Tensor, teacher_output: Tensor, epoch: int | None = None, *,
                teacher_temp: float | None = None, update_center: bool = True) -> Tensor:
        """Scalar loss (float32; float64 for float64 input); updates the center (center mode).

        The teacher temperature is the schedule's at `epoch` (the official call), or `teacher_temp`
        as given (a caller's per-step schedule); pass exactly one.
        update_center=False (gradient accumulation's micro-batches): the center stays as it is
        and the teacher rows are added to a held sum that commit_center_update() applies once,
        so accum_steps micro-batches move the center as one batch of all their rows would."""
        if (epoch is None) == (teacher_temp is None):
            raise ValueError(f"pass epoch (the schedule's temperature) or teacher_temp, exactly one; got "
                             f"epoch={epoch!r}, teacher_temp={teacher_temp!r}")
        if teacher_temp is None:
            temp = self.teacher_temp_at(epoch)
        else:
            temp = check_positive("teacher_temp", teacher_temp)
        if self.teacher_centering == "sinkhorn_knopp":
            check_tensor("student_output", student_output, ndim=2)
            check_tensor("teacher_output", teacher_output, ndim=2)
            if teacher_output.shape[1] != self.out_dim or student_output.shape[1] != self.out_dim:
                got = f"{tuple(student_output.shape)} and {tuple(teacher_output.shape)}"
                raise ValueError(f"student_output and teacher_output must have out_dim={self.out_dim} "
                                 f"columns, got {got}")
            probs = sinkhorn_knopp_teacher(teacher_output, temp, self.sinkhorn_iterations)
            return soft_cross_entropy(student_output, probs, n_crops=self.ncrops,
                                      n_targets=self.n_global_crops, student_temp=self.student_temp,
                                      exclude_same=True, backend=self.backend)
        # The pending (async) update is computed aside and committed only once the inputs passed
        # validation: a rejected call leaves the module as it was.
        center = self._center_with_pending_update()
        loss, teacher_sum = dino_loss_with_teacher_sum(
            student_output, teacher_output, center, n_crops=self.ncrops, n_global_crops=self.n_global_crops,
            student_temp=self.student_temp, teacher_temp=temp, backend=self.backend)
        if center is not self.center:
            self.center.copy_(center)
            self._pending = None
        if update_center:
            self._update_center(teacher_sum, teacher_output.shape[0])
        else:
            held_sum, held_rows = self._held or (0.0, 0)
            self._held = (held_sum + teacher_sum.detach(), held_rows + teacher_output.shape[0])
        return loss

    @torch.no_grad()
    def commit_center_update(self) -> None:
        """Move the center once with every row held by update_center=False calls (no-op when none)."""
        if self._held is not None:
            teacher_sum, n_rows = self._held
            self._held = None
            self._update_center(teacher_sum, n_rows)

    @torch.no_grad()
    def _update_center(self, teacher_sum: Tensor, n_rows: int) -> None:
        if not self.async_center:
            dino_update_center_(self.center, None, self.center_momentum, teacher_sum=teacher_sum,
                                n_rows=n_rows)
            return
        batch_sum = teacher_sum.to(torch.promote_types(teacher_sum.dtype, torch.float32)).clone()
        handle = dist.all_reduce(batch_sum, async_op=True) if is_distributed() else None
        self._pending = (batch_sum, handle, n_rows)

    @torch.no_grad()
    def _center_with_pending_update(self) -> Tensor:
        if self._pending is None:
            return self.center
        batch_sum, handle, n_rows = self._pending
        if handle is not None:
            handle.wait()
            self._pending = (batch_sum, None, n_rows)  # reduced once; a retry must not wait again
        batch_mean = (batch_sum / (n_rows * get_world_size())).view_as(self.center)
        return self.center * self.center_momentum + batch_mean * (1.0 - self.center_momentum)

    @torch.no_grad()
    def apply_center_update(self) -> None:
        """Apply a pending asynchronous center update now (no-op when none is pending)."""
        center = self._center_with_pending_update()
        if center is not self.center:
            self.center.copy_(center)
        self._pending = None

    def extra_repr(self) -> str:
        return (f"out_dim={self.out_dim}, ncrops={self.ncrops}, n_global_crops={self.n_global_crops}, "
                f"student_temp={self.student_temp}, center_momentum={self.center_momentum}, "
                f"teacher_centering={self.teacher_centering!r}, async_center={self.async_center}")
