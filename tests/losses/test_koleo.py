"""KoLeo against its definition (Sablayrolles et al. 2019 as DINOv2's KoLeoLoss computes it), restated
with explicit loops in float64: u_i = x_i / max(||x_i||, eps); n(i) = argmax_{j != i} <u_i, u_j>;
loss = -mean_i log(||u_i - u_n(i) + eps|| + eps)."""

import math

import pytest
import torch

from fastssl.losses.koleo import KoLeoLoss, koleo_loss
from tests.dist_utils import run_gloo


def definition(x, eps=1e-8):
    u = [row / row.norm().clamp(min=eps) for row in x.double()]
    total = 0.0
    for i, ui in enumerate(u):
        j = max((j for j in range(len(u)) if j != i), key=lambda j: (ui @ u[j]).item())
        total = total - torch.log((ui - u[j] + eps).norm() + eps)
    return total / len(u)


@pytest.mark.parametrize("B,D", [(2, 3), (5, 8), (33, 16)])
def test_matches_the_definition_in_value_and_gradient(B, D):
    x = torch.randn(B, D, dtype=torch.float64, generator=torch.Generator().manual_seed(B))
    a = x.clone().requires_grad_(True)
    b = x.clone().requires_grad_(True)
    got, want = KoLeoLoss()(a), definition(b)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-12)


def test_duplicates_and_tiny_batches_stay_finite():
    row = torch.randn(1, 16)
    dup = row.repeat(2, 1).requires_grad_(True)
    loss = koleo_loss(dup)
    loss.backward()
    # equal rows sit at distance eps * sqrt(D)
    assert math.isclose(loss.item(), -math.log(1e-8 * 4 + 1e-8), rel_tol=1e-3)
    assert torch.isfinite(dup.grad).all()
    pair = torch.randn(2, 16, requires_grad=True)
    koleo_loss(pair).backward()
    assert torch.isfinite(pair.grad).all()
    with pytest.raises(ValueError, match="x must have at least 2 rows"):
        koleo_loss(row)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_and_autocast_compute_in_float32(dtype):
    x = torch.randn(4, 8).to(dtype)
    x[1] = x[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = koleo_loss(x)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    torch.testing.assert_close(loss.double(), definition(x.double()), rtol=1e-5, atol=1e-5)


def test_module_has_no_state_and_finds_neighbours():
    assert KoLeoLoss().state_dict() == {}
    u = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.2]]), dim=-1)
    assert KoLeoLoss().pairwise_NNs_inner(u).tolist() == [1, 0, 1]


def _rank(rank, world):
    x = torch.randn(4 * world, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mine = x[4 * rank:4 * (rank + 1)].clone().requires_grad_(True)
    loss = KoLeoLoss(distributed=True)(mine)
    loss.backward()
    return loss.detach(), mine.grad


def test_distributed_variant_over_two_gloo_ranks():
    results = run_gloo(_rank, 2)
    x = torch.randn(8, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x.requires_grad_(True)
    want = definition(x)
    want.backward()
    torch.testing.assert_close((results[0][0] + results[1][0]) / 2, want.detach(), rtol=1e-12, atol=1e-12)
    # each rank's gradient is that of the sum of the ranks' losses; DDP's average makes it the global one
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]) / 2, x.grad, rtol=1e-9, atol=1e-12)
