"""SigLipLoss against open_clip's SigLipLoss: value and the gradients of both feature sets, the
scale and the bias, on 1 process and on 2 and 3 gloo processes for every dist_impl, in float64
(the reference path: equal to round-off) and in float32 through the Triton kernel (under the
interpreter on a CPU: within float32 rounding)."""

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_gloo
from open_clip_reference import assert_same_output_dict, open_clip_loss

from fastssl.losses.siglip import DIST_IMPLS, SigLipLoss
from fastssl.ops.backend import triton_interpreting

N, D = 5, 16


def batch(world, seed=0):
    """Every rank's features (rank r: rows [r N, (r+1) N)), the exp'd scale and the bias, float64."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(world * N, D, generator=g, dtype=torch.float64), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(world * N, D, generator=g, dtype=torch.float64), dim=1)
    return x, y, torch.tensor(10.0, dtype=torch.float64).log(), torch.tensor(-3.0, dtype=torch.float64)


def value_and_grads(criterion, rank, world, dtype=torch.float64, seed=0, with_bias=True):
    """criterion(x_r, y_r, exp(log_scale), bias or None) on rank r; its value and the gradients of
    x_r, y_r, the log-scale parameter and the bias (float64; 0 when no bias is passed)."""
    x, y, log_scale, bias = batch(world, seed)
    rows = slice(rank * N, (rank + 1) * N)
    leaves = [x[rows].to(dtype), y[rows].to(dtype), log_scale.to(dtype), bias.to(dtype)]
    leaves = [v.clone().requires_grad_() for v in leaves]
    loss = criterion(leaves[0], leaves[1], leaves[2].exp(), leaves[3] if with_bias else None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [loss.detach().double()] + [torch.zeros(()) if g is None else g.double() for g in grads]


def saved_elements(criterion, rank, world):
    """Elements autograd keeps for backward across criterion's forward (each saved tensor once)."""
    seen = {}

    def pack(t):
        seen[(t.data_ptr(), t.shape)] = t.numel()
        return t

    x, y, log_scale, bias = (v.requires_grad_() for v in batch(world))
    rows = slice(rank * N, (rank + 1) * N)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = criterion(x[rows], y[rows], log_scale.exp(), bias)
    loss.backward()  # every rank takes part in the backward's exchanges
    return sum(seen.values())


def _on_ranks(rank, world):
    official = open_clip_loss()
    out = {}
    for impl in DIST_IMPLS:
        kw = dict(rank=rank, world_size=world, dist_impl=impl)
        out[impl] = {
            "official": value_and_grads(official.SigLipLoss(**kw), rank, world),
            "float64": value_and_grads(SigLipLoss(**kw), rank, world),
            "official without bias": value_and_grads(official.SigLipLoss(**kw), rank, world, with_bias=False),
            "without bias": value_and_grads(SigLipLoss(**kw), rank, world, with_bias=False),
            "saved": saved_elements(SigLipLoss(**kw), rank, world),
            "official saved": saved_elements(official.SigLipLoss(**kw), rank, world),
        }
        if triton_interpreting():
            kernel = SigLipLoss(**kw, backend="triton")
            out[impl]["kernel"] = value_and_grads(kernel, rank, world, torch.float32)
    return out


def assert_all_close(got, want, rtol, atol, what):
    for name, g, w in zip(("loss", "dimage", "dtext", "dlog_scale", "dbias"), got, want):
        torch.testing.assert_close(g, w, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{what} {name}: {m}")


def test_distributed_equals_open_clip_and_saves_no_remote_block():
    """bidir on 2 ranks is one rightward hop, on 3 one hop each way; shift is the one-way ring.
    The ring forms keep nothing of the other ranks' texts for backward, whatever the world size."""
    saved = {}
    for world in (2, 3):
        for rank, result in enumerate(run_gloo(_on_ranks, world)):
            for impl, runs in result.items():
                what = f"{world} ranks, rank {rank}, {impl}"
                assert_all_close(runs["float64"], runs["official"], 1e-12, 1e-12, what)
                assert_all_close(runs["without bias"], runs["official without bias"], 1e-12, 1e-12, what)
                if "kernel" in runs:
                    assert_all_close(runs["kernel"], runs["official"], 1e-5, 1e-5, f"{what}, kernel")
                saved[world, rank, impl] = runs["saved"], runs["official saved"]
    for impl in ("bidir", "shift"):
        assert saved[2, 0, impl][0] == saved[3, 0, impl][0]
        assert saved[3, 0, impl][1] > saved[2, 0, impl][1]  # open_clip keeps every received block


def test_single_process_equals_open_clip(device):
    official = open_clip_loss().SigLipLoss()
    want = value_and_grads(official, 0, 1)
    assert_all_close(value_and_grads(SigLipLoss(), 0, 1), want, 1e-12, 1e-12, "float64")
    kernel = SigLipLoss(backend="triton").to(device)
    got = value_and_grads(lambda *a: kernel(*(v.to(device) for v in a)), 0, 1, torch.float32)
    assert_all_close([g.cpu() for g in got], want, 1e-5, 1e-5, "kernel")


def test_drop_in_surface():
    official = open_clip_loss().SigLipLoss
    ours = SigLipLoss(cache_labels=True, rank=1, world_size=4, dist_impl="shift")
    assert (ours.cache_labels, ours.rank, ours.world_size, ours.dist_impl) == (True, 1, 4, "shift")
    assert SigLipLoss().dist_impl == official().dist_impl == "bidir"
    assert ours.state_dict().keys() == official().state_dict().keys()
    x, y, log_scale, bias = batch(1)
    assert_same_output_dict(SigLipLoss(), official(), x, y, log_scale.exp(), bias)


def test_errors():
    with pytest.raises(ValueError, match="dist_impl"):
        SigLipLoss(dist_impl="ring")
    with pytest.raises(ValueError, match="rank"):
        SigLipLoss(rank=2, world_size=2)
    with pytest.raises(TypeError, match="cache_labels"):
        SigLipLoss(cache_labels="no")
    x, y, _, bias = batch(1)
    with pytest.raises(RuntimeError, match="process group"):
        SigLipLoss(rank=0, world_size=2)(x, y, torch.tensor(10.0), bias)
    with pytest.raises(ValueError, match="logit_scale"):
        SigLipLoss()(x, y, torch.ones(3), bias)
