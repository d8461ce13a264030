"""ClipLoss against open_clip's ClipLoss: value and the gradients of both feature sets, the scale
and the bias, on 1 process and on 2 and 3 gloo processes for every local_loss / gather_with_grad
combination, in float64 (the reference path: equal to round-off) and in float32 through the
Triton kernels (under the interpreter on a CPU: within float32 rounding)."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_gloo
from open_clip_reference import assert_same_output_dict, open_clip_loss

from fastssl.losses.clip import ClipLoss
from fastssl.ops.backend import triton_interpreting

N, D = 5, 16
COMBOS = list(itertools.product((False, True), (False, True)))  # (local_loss, gather_with_grad)


def batch(world, seed=0):
    """Every rank's features (rank r: rows [r N, (r+1) N)), the log-scale and the bias, float64."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(world * N, D, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(world * N, D, generator=g, dtype=torch.float64), dim=1)
    return x, y, torch.tensor(20.0, dtype=torch.float64).log(), torch.tensor(-3.0, dtype=torch.float64)


def value_and_grads(criterion, rank, world, dtype=torch.float64):
    """criterion(x_r, y_r, exp(log_scale), bias) on rank r; its value and the gradients of x_r, y_r,
    the log-scale parameter and the bias (float64; a bias without gradient counts as zero)."""
    x, y, log_scale, bias = batch(world)
    rows = slice(rank * N, (rank + 1) * N)
    leaves = [v.clone().to(dtype).requires_grad_() for v in (x[rows], y[rows], log_scale, bias)]
    loss = criterion(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach().double()] + [torch.zeros(()) if g is None else g.double() for g in grads]


def _on_ranks(rank, world):
    official = open_clip_loss()
    out = {}
    for local_loss, with_grad in COMBOS:
        kw = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)
        runs = {"official": value_and_grads(official.ClipLoss(**kw), rank, world),
                "float64": value_and_grads(ClipLoss(**kw), rank, world)}
        if triton_interpreting():
            runs["kernel"] = value_and_grads(ClipLoss(**kw, backend="triton"), rank, world, torch.float32)
        out[local_loss, with_grad] = runs
    return out


def assert_all_close(got, want, rtol, atol, what):
    for name, g, w in zip(("loss", "dimage", "dtext", "dlog_scale", "dbias"), got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}")


def test_distributed_equals_open_clip():
    for world in (2, 3):
        for rank, result in enumerate(run_gloo(_on_ranks, world)):
            for (local_loss, with_grad), runs in result.items():
                what = f"{world} ranks, rank {rank}, local_loss={local_loss}, gather_with_grad={with_grad}"
                assert_all_close(runs["float64"], runs["official"], 1e-12, 1e-12, what)
                if "kernel" in runs:
                    assert_all_close(runs["kernel"], runs["official"], 2e-5, 2e-5, f"{what}, kernel")


def test_single_process_equals_open_clip(device):
    official = open_clip_loss().ClipLoss()
    want = value_and_grads(official, 0, 1)
    assert_all_close(value_and_grads(ClipLoss(), 0, 1), want, 1e-12, 1e-12, "float64")
    kernel = ClipLoss(backend="triton")
    got = value_and_grads(lambda *a: kernel(*(v.to(device) for v in a)).cpu(), 0, 1, torch.float32)
    assert_all_close(got, want, 2e-5, 2e-5, "kernel")
    # no bias: the same loss, as open_clip gives
    x, y, log_scale, _ = batch(1)
    torch.testing.assert_close(ClipLoss()(x, y, log_scale.exp()), official(x, y, log_scale.exp()),
                               rtol=1e-12, atol=1e-12)


def test_drop_in_surface():
    official = open_clip_loss().ClipLoss
    ours = ClipLoss(local_loss=True, gather_with_grad=True, cache_labels=True, rank=1, world_size=4)
    assert (ours.local_loss, ours.gather_with_grad, ours.cache_labels, ours.rank, ours.world_size) == (
        True, True, True, 1, 4)
    assert ours.state_dict().keys() == official().state_dict().keys()
    x, y, log_scale, bias = batch(1)
    assert_same_output_dict(ClipLoss(), official(), x, y, log_scale.exp(), bias)


def test_errors():
    with pytest.raises(ValueError, match="use_horovod"):
        ClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="rank"):
        ClipLoss(rank=3, world_size=2)
    with pytest.raises(TypeError, match="local_loss"):
        ClipLoss(local_loss=1)
    x, y, log_scale, _ = batch(1)
    with pytest.raises(RuntimeError, match="process group"):
        ClipLoss(rank=0, world_size=2)(x, y, log_scale.exp())
    with pytest.raises(ValueError, match="logit_scale"):
        ClipLoss()(x, y, torch.ones(3))
