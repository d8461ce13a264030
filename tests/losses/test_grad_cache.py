"""GradCache with the contrastive losses: micro-batches encoded without a graph, the loss over the
full batch from the cached features, the feature gradients replayed per micro-batch, equal to one
full-batch step in loss and in every parameter's gradient (float64)."""

import pytest
import torch
import torch.nn.functional as F

from fastssl.losses import ClipLoss, InfoNCELoss, SigLipLoss
from fastssl.losses.grad_cache import cached_loss_and_feature_grads

N, D_IN, D, MICRO = 12, 10, 8, 4


def towers(seed=0):
    torch.manual_seed(seed)
    image, text = torch.nn.Linear(D_IN, D).double(), torch.nn.Linear(D_IN, D).double()
    log_scale = torch.nn.Parameter(torch.tensor(10.0, dtype=torch.float64).log())
    bias = torch.nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    return image, text, log_scale, bias


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return x, x + 0.5 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)


CRITERIA = {  # name -> (criterion, keyword arguments from (log_scale, bias))
    "clip": (ClipLoss(), lambda s, b: dict(logit_scale=s.exp(), logit_bias=b)),
    "siglip": (SigLipLoss(), lambda s, b: dict(logit_scale=s.exp(), logit_bias=b)),
    "info_nce": (InfoNCELoss(temperature=0.2), lambda s, b: {}),
}


def encode(tower, x):
    return F.normalize(tower(x), dim=1)


def grads(params):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("name", list(CRITERIA))
def test_grad_cache_equals_the_full_batch(name):
    criterion, extra = CRITERIA[name]
    x, y = batch()

    image, text, log_scale, bias = towers()
    params = [*image.parameters(), *text.parameters(), log_scale, bias]
    full = criterion(encode(image, x), encode(text, y), **extra(log_scale, bias))
    full.backward()
    want = grads(params)

    image, text, log_scale, bias = towers()
    params = [*image.parameters(), *text.parameters(), log_scale, bias]
    micro = [slice(i, i + MICRO) for i in range(0, N, MICRO)]
    with torch.no_grad():  # step 1: features only, no graph
        cached = [torch.cat([encode(tower, v[m]) for m in micro]) for tower, v in ((image, x), (text, y))]
    loss, (g_image, g_text) = cached_loss_and_feature_grads(criterion, *cached, **extra(log_scale, bias))
    for m in micro:  # step 3: one micro-batch's graph at a time
        encode(image, x[m]).backward(g_image[m])
        encode(text, y[m]).backward(g_text[m])
    torch.testing.assert_close(loss, full.detach(), rtol=1e-12, atol=1e-12)
    for got, exp in zip(grads(params), want):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)

    # What accumulating micro-batch losses gives instead (fewer negatives per row): another loss.
    image, text, log_scale, bias = towers()
    small = sum(criterion(encode(image, x[m]), encode(text, y[m]), **extra(log_scale, bias)) for m in micro)
    assert (small / len(micro) - full).abs() > 1e-3


def test_errors():
    with pytest.raises(TypeError, match=r"features\[1\] must be a torch.Tensor"):
        cached_loss_and_feature_grads(ClipLoss(), torch.randn(2, 3), [[1.0]], logit_scale=1.0)
