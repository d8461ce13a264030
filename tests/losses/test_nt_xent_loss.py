"""NTXentLoss: SimCLR's NT-Xent as a drop-in for lightly's NTXentLoss, against the paper's
formula (Chen et al. 2020, eq. 1, averaged over the 2N rows) and lightly's own class, in one
process and over 2 gloo ranks with gather_distributed=True (float64 reference, fp32 kernel)."""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_gloo

from fastssl.losses import NTXentLoss

WORLD, B, D, T = 2, 3, 16, 0.1


def paper_loss(out0, out1, T):
    """ℓ(i, j) = −log exp(s_ij/T) / Σ_{k≠i} exp(s_ik/T) over z = [out0; out1], mean of the 2N terms."""
    z = F.normalize(torch.cat([out0, out1]), dim=1)
    n = out0.shape[0]
    sim = (z @ z.T / T).masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
    target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, target)


def views(seed=0, rows=WORLD * B):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, D, generator=g, dtype=torch.float64)
    return a, a + 0.7 * torch.randn(rows, D, generator=g, dtype=torch.float64)


def loss_and_grads(criterion, a, b, dtype):
    a, b = a.detach().to(dtype).requires_grad_(), b.detach().to(dtype).requires_grad_()
    loss = criterion(a, b)
    loss.backward()
    return loss.detach().double(), a.grad.double(), b.grad.double()


PATHS = [("torch", torch.float64, 1e-12), ("triton", torch.float32, 2e-5)]  # fp64 reference, fp32 kernel


@pytest.mark.parametrize("backend,dtype,tol", PATHS)
def test_one_process_matches_the_paper(backend, dtype, tol):
    a, b = views()
    truth = loss_and_grads(lambda x, y: paper_loss(x, y, T), a, b, torch.float64)
    got = loss_and_grads(NTXentLoss(temperature=T, backend=backend), a, b, dtype)
    for g, t in zip(got, truth):
        torch.testing.assert_close(g, t, rtol=tol, atol=tol)


def test_one_process_matches_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    a, b = views(1)
    official = lightly_loss.NTXentLoss(temperature=0.5)
    ours = NTXentLoss(temperature=0.5, memory_bank_size=0, gather_distributed=False)
    for g, t in zip(loss_and_grads(ours, a, b, torch.float64), loss_and_grads(official, a, b, torch.float64)):
        torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)
    assert ours.state_dict().keys() == official.state_dict().keys()


def _rank_step(rank, world, backend, dtype, with_lightly):
    a, b = views(2)
    rows = slice(rank * B, (rank + 1) * B)
    criterion = NTXentLoss(temperature=T, gather_distributed=True, backend=backend)
    ours = loss_and_grads(criterion, a[rows], b[rows], dtype)
    official = None
    if with_lightly:
        from lightly.loss import NTXentLoss as LightlyNTXentLoss

        official = loss_and_grads(LightlyNTXentLoss(temperature=T, gather_distributed=True), a[rows], b[rows],
                                  torch.float64)
    return ours, official


@pytest.mark.parametrize("backend,dtype,tol", PATHS)
def test_two_ranks_equal_the_concatenated_batch(backend, dtype, tol):
    try:
        import lightly.loss  # noqa: F401

        with_lightly = backend == "torch"
    except ImportError:
        with_lightly = False
    results = run_gloo(_rank_step, WORLD, backend, dtype, with_lightly)
    a, b = views(2)
    loss, ga, gb = loss_and_grads(lambda x, y: paper_loss(x, y, T), a, b, torch.float64)
    # each rank's loss is the mean over its 2B rows; DDP averages the ranks' gradients
    torch.testing.assert_close(sum(r[0][0] for r in results) / WORLD, loss, rtol=tol, atol=tol)
    for rank, (ours, official) in enumerate(results):
        rows = slice(rank * B, (rank + 1) * B)
        torch.testing.assert_close(ours[1] / WORLD, ga[rows], rtol=tol, atol=tol)
        torch.testing.assert_close(ours[2] / WORLD, gb[rows], rtol=tol, atol=tol)
        if official is not None:
            for g, t in zip(ours, official):
                torch.testing.assert_close(g, t, rtol=1e-12, atol=1e-12)


def multi_crop_loss(out0, out1, crops, T):
    """The mean over the view pairs: NT-Xent of the global pair, then each (crop, global view) pair's
    cross-entropy of the crop's rows over one global view's rows, target the same image."""
    terms = [paper_loss(out0, out1, T)]
    for view in (out0, out1):
        for crop in crops:
            sim = F.normalize(crop, dim=1) @ F.normalize(view, dim=1).T / T
            terms.append(F.cross_entropy(sim, torch.arange(crop.shape[0])))
    return sum(terms) / len(terms)


def crops_of(seed, count, rows=WORLD * B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, D, generator=g, dtype=torch.float64) for _ in range(count)]


def multi_crop_grads(criterion, a, b, crops, dtype):
    inputs = [t.detach().to(dtype).requires_grad_() for t in (a, b, *crops)]
    loss = criterion(inputs[0], inputs[1], inputs[2:])
    loss.backward()
    return [loss.detach().double()] + [t.grad.double() for t in inputs]


@pytest.mark.parametrize("backend,dtype,tol", PATHS)
def test_local_crops_match_the_mean_over_view_pairs(backend, dtype, tol):
    a, b = views(3)
    crops = crops_of(4, 2)
    truth = multi_crop_grads(lambda x, y, c: multi_crop_loss(x, y, c, T), a, b, crops, torch.float64)
    got = multi_crop_grads(NTXentLoss(temperature=T, backend=backend), a, b, crops, dtype)
    for g, t in zip(got, truth):
        torch.testing.assert_close(g, t, rtol=tol, atol=tol)


def _multi_crop_rank_step(rank, world, backend, dtype):
    a, b = views(5)
    rows = slice(rank * B, (rank + 1) * B)
    crops = [c[rows] for c in crops_of(6, 2)]
    criterion = NTXentLoss(temperature=T, gather_distributed=True, backend=backend)
    return multi_crop_grads(criterion, a[rows], b[rows], crops, dtype)


@pytest.mark.parametrize("backend,dtype,tol", PATHS)
def test_local_crops_on_two_ranks_equal_the_concatenated_batch(backend, dtype, tol):
    results = run_gloo(_multi_crop_rank_step, WORLD, backend, dtype)
    a, b = views(5)
    truth = multi_crop_grads(lambda x, y, c: multi_crop_loss(x, y, c, T), a, b, crops_of(6, 2), torch.float64)
    torch.testing.assert_close(sum(r[0] for r in results) / WORLD, truth[0], rtol=tol, atol=tol)
    for rank, got in enumerate(results):
        rows = slice(rank * B, (rank + 1) * B)
        for g, t in zip(got[1:], truth[1:]):
            torch.testing.assert_close(g / WORLD, t[rows], rtol=tol, atol=tol)


def test_bad_arguments_are_refused_by_name():
    with pytest.raises(ValueError, match="memory_bank_size must be 0"):
        NTXentLoss(memory_bank_size=4096)
    with pytest.raises(ValueError, match="memory_bank_size must be 0"):
        NTXentLoss(memory_bank_size=(4096, 128))
    with pytest.raises(ValueError, match="temperature"):
        NTXentLoss(temperature=0.0)
    with pytest.raises(ValueError, match="out1 must have out0's shape"):
        NTXentLoss()(torch.randn(4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"local_crops\[1\] must have out0's shape"):
        NTXentLoss()(torch.randn(4, 8), torch.randn(4, 8), [torch.randn(4, 8), torch.randn(4, 6)])
    NTXentLoss(memory_bank_size=(0, 128))  # lightly's disabled bank as a pair
