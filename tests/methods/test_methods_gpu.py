"""On a GPU (benchmarks/gpu_check.sh): every method trains a step under bf16 autocast, and its
fused path ("auto" = the Triton kernels on CUDA) gives the reference's loss on the same batch."""

import copy

import pytest
import torch
from method_helpers import build, context, make_batch

NAMES = ["mocov2", "mocov3", "rotnet", "dino", "mae"]


def _loss(method, batch, fused: bool, seed: int = 0):
    method = copy.deepcopy(method)
    method.cfg.model.fused = fused
    if hasattr(method, "criterion"):
        method.criterion.backend = method.backend
    torch.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = method(batch, context(epoch=1))["loss"]
    loss.float().backward()
    grads = [p.grad for p in method.parameters() if p.grad is not None]
    return loss.detach().float(), grads


@pytest.mark.gpu
@pytest.mark.parametrize("name", NAMES)
def test_bf16_step_fused_matches_reference_on_cuda(name):
    method = build(name).cuda()
    batch = make_batch(method, batch_size=16)
    batch["views"] = [v.cuda() for v in batch["views"]]
    fused, grads_fused = _loss(method, batch, True)
    ref, grads_ref = _loss(method, batch, False)
    assert torch.isfinite(fused) and all(torch.isfinite(g).all() for g in grads_fused)
    assert len(grads_fused) == len(grads_ref)
    # bf16 activations: both paths round differently, so a loose relative tolerance
    torch.testing.assert_close(fused, ref, rtol=3e-2, atol=3e-2)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        method(batch, context(epoch=1))
    method.after_optimizer_step(context(epoch=1, teacher_momentum=0.99))  # EMA / queue push on CUDA
