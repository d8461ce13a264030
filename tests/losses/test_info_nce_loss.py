"""InfoNCELoss: the module form, and gather_distributed on 2 gloo processes against the
MoCo v3 formula evaluated in one process on the concatenated batch (float64)."""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_gloo

from fastssl.losses import InfoNCELoss
from fastssl.ops import info_nce
from fastssl.ops.backend import triton_interpreting

WORLD, N, D, T = 2, 5, 16, 0.1


def full_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)
    k = q + 0.5 * torch.randn(WORLD * N, D, generator=g, dtype=torch.float64)
    return q, k


def moco_v3_full(q, k, T):
    """MoCo v3's contrastive_loss on one device: logits = q̂ k̂ᵀ / T, labels = arange."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = q @ k.T / T
    return F.cross_entropy(logits, torch.arange(q.shape[0]))


def _gathered_step(rank, world, backend):
    q_all, k_all = full_batch()
    rows = slice(rank * N, (rank + 1) * N)
    q = q_all[rows].float().requires_grad_()
    k = k_all[rows].float().requires_grad_()
    criterion = InfoNCELoss(temperature=T, gather_distributed=True, backend=backend)
    loss = criterion(q, k)
    loss.backward()
    try:
        criterion(q, k, torch.randn(3, D))
        queue_error = None
    except ValueError as exc:
        queue_error = str(exc)
    scaled = InfoNCELoss(temperature=T, gather_distributed=True, backend=backend, scale_by_2t=True)
    return loss.detach(), q.grad, k.grad, queue_error, scaled(q, k).detach()


def moco_v3_official_on_rank(q_all, k_all, rank, T):
    """MoCo v3's contrastive_loss as rank `rank` computes it: its own N queries against all
    gathered keys, labels arange(N) + N * rank, cross-entropy times 2T."""
    q, k = F.normalize(q_all[rank * N:(rank + 1) * N], dim=1), F.normalize(k_all, dim=1)
    return F.cross_entropy(q @ k.T / T, torch.arange(N) + N * rank) * (2 * T)


def test_gather_distributed_equals_concatenated_batch():
    # gloo works on CPU tensors: the kernel runs there under the interpreter (CI); on a GPU
    # machine, where it is not on, the processes use the reference and tests/ops covers the kernel.
    results = run_gloo(_gathered_step, WORLD, "triton" if triton_interpreting() else "torch")
    q_all, k_all = full_batch()
    q_all.requires_grad_()
    k_all.requires_grad_()
    full = moco_v3_full(q_all, k_all, T)
    full.backward()
    # DDP averages gradients over ranks: mean of the ranks' losses / grads = the full batch's.
    mean_loss = sum(r[0].double() for r in results) / WORLD
    torch.testing.assert_close(mean_loss, full.detach(), rtol=1e-5, atol=1e-6)
    for rank, (_, gq, gk, queue_error, scaled) in enumerate(results):
        want = moco_v3_official_on_rank(q_all.detach(), k_all.detach(), rank, T)
        torch.testing.assert_close(scaled.double(), want, rtol=1e-5, atol=1e-6)
        rows = slice(rank * N, (rank + 1) * N)
        torch.testing.assert_close(gq.double() / WORLD, q_all.grad[rows], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(gk.double() / WORLD, k_all.grad[rows], rtol=1e-4, atol=1e-6)
        assert queue_error is not None and "gather_distributed" in queue_error


@pytest.mark.parametrize("with_queue", [False, True])
def test_module_matches_functional(with_queue):
    torch.manual_seed(0)
    q, k = torch.randn(6, D), torch.randn(6, D)
    queue = F.normalize(torch.randn(9, D), dim=1) if with_queue else None
    for normalize in (True, False):
        # No process group: gather_distributed is a no-op, the loss is the local one.
        criterion = InfoNCELoss(temperature=0.3, normalize=normalize, gather_distributed=True)
        want = info_nce(q, k, queue, temperature=0.3, normalize=normalize)
        torch.testing.assert_close(criterion(q, k, queue), want)
        # Hand-written MoCo v2 / v3 value in float64.
        qn, kn = q.double(), k.double()
        if normalize:
            qn, kn = F.normalize(qn, dim=1), F.normalize(kn, dim=1)
        if with_queue:
            logits = torch.cat([(qn * kn).sum(1, keepdim=True), qn @ queue.double().T], 1) / 0.3
            target = torch.zeros(6, dtype=torch.long)
        else:
            logits, target = qn @ kn.T / 0.3, torch.arange(6)
        torch.testing.assert_close(want.double(), F.cross_entropy(logits, target), rtol=1e-5, atol=1e-6)


def test_module_kernel_backend_and_reduction(device):
    torch.manual_seed(1)
    q = torch.randn(4, D, device=device, requires_grad=True)
    k = torch.randn(4, D, device=device, requires_grad=True)
    per_row = InfoNCELoss(reduction="none", backend="triton")(q, k)
    assert per_row.shape == (4,)
    ref = InfoNCELoss(reduction="none", backend="torch")(q, k)
    torch.testing.assert_close(per_row, ref, rtol=1e-5, atol=1e-6)


def test_scale_by_2t_is_moco_v3s_scaling():
    q, k = full_batch(seed=3)
    q, k = q[:N].float(), k[:N].float()
    for reduction in ("mean", "none"):
        plain = InfoNCELoss(temperature=0.2, reduction=reduction)(q, k)
        scaled = InfoNCELoss(temperature=0.2, reduction=reduction, scale_by_2t=True)(q, k)
        torch.testing.assert_close(scaled, plain * 0.4)
    # One process, no group: the official contrastive_loss with rank 0 and world size 1.
    want = moco_v3_official_on_rank(q.double(), k.double(), 0, 0.2)
    got = InfoNCELoss(temperature=0.2, gather_distributed=True, scale_by_2t=True)(q, k)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert "scale_by_2t=True" in repr(InfoNCELoss(scale_by_2t=True))


def test_module_errors():
    with pytest.raises(TypeError, match="gather_distributed must be True or False"):
        InfoNCELoss(gather_distributed="yes")
    with pytest.raises(TypeError, match="scale_by_2t must be True or False"):
        InfoNCELoss(scale_by_2t=1)
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)(torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match="M == N"):
        InfoNCELoss()(torch.randn(2, 4), torch.randn(3, 4), torch.randn(5, 4))
