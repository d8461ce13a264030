"""grad_cache_encode with the contrastive losses: micro-batches encoded without activations, the loss
over the full batch, one backward replaying each micro-batch; equal to one batch of those
micro-batches (each encoded once with its graph) in loss, in every parameter's gradient and in the
BatchNorm buffers, with the same dropout masks (float64). Under no_grad it only splits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.losses import ClipLoss, InfoNCELoss, SigLipLoss, grad_cache_encode
from fastssl.losses.grad_cache import _running_stats_kept

N, D_IN, D, MICRO = 12, 10, 8, 3


def towers(seed=0):
    torch.manual_seed(seed)
    image = nn.Sequential(nn.Linear(D_IN, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(0.3),
                          nn.Linear(16, D))
    model = nn.ModuleDict({"image": image, "text": nn.Linear(D_IN, D)}).double()
    log_scale = nn.Parameter(torch.tensor(10.0, dtype=torch.float64).log())
    bias = nn.Parameter(torch.tensor(-2.0, dtype=torch.float64))
    return model, log_scale, bias


def batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    return x, x + 0.5 * torch.randn(N, D_IN, generator=g, dtype=torch.float64)


CRITERIA = {  # name -> (criterion, keyword arguments from (log_scale, bias))
    "clip": (ClipLoss(), lambda s, b: dict(logit_scale=s.exp(), logit_bias=b)),
    "siglip": (SigLipLoss(), lambda s, b: dict(logit_scale=s.exp(), logit_bias=b)),
    "info_nce": (InfoNCELoss(temperature=0.2), lambda s, b: {}),
}


def encode(model, x, y):
    return F.normalize(model["image"](x), dim=1), F.normalize(model["text"](y), dim=1)


def step(name, cached):
    criterion, extra = CRITERIA[name]
    x, y = batch()
    model, log_scale, bias = towers()
    torch.manual_seed(5)  # the dropout masks
    if cached:
        image, text = grad_cache_encode(lambda a, b: encode(model, a, b), x, y, micro_batches=N // MICRO,
                                        module=model)
    else:
        parts = [encode(model, x[i:i + MICRO], y[i:i + MICRO]) for i in range(0, N, MICRO)]
        image, text = (torch.cat(p) for p in zip(*parts))
    loss = criterion(image, text, **extra(log_scale, bias))
    loss.backward()
    grads = [p.grad for p in (*model.parameters(), log_scale) if p.grad is not None]
    return loss.detach(), grads, list(model.buffers())


@pytest.mark.parametrize("name", list(CRITERIA))
def test_grad_cache_equals_one_batch_of_the_micro_batches(name):
    want_loss, want_grads, want_buffers = step(name, cached=False)
    loss, grads, buffers = step(name, cached=True)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert len(grads) == len(want_grads) >= 7
    for got, exp in zip(grads, want_grads):
        torch.testing.assert_close(got, exp, rtol=1e-10, atol=1e-12)
    for got, exp in zip(buffers, want_buffers):  # running mean, var and 4 batches counted, once each
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
    assert int(buffers[2]) == N // MICRO


def test_without_grad_the_micro_batches_are_only_split():
    model, _, _ = towers()
    model.eval()
    x, y = batch()
    with torch.no_grad():
        image = grad_cache_encode(model["image"], x, micro_batches=4, module=model)
    torch.testing.assert_close(image, model["image"](x).detach(), rtol=1e-12, atol=1e-12)
    assert image.grad_fn is None


def test_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"micro_batches \(accum_steps\): expected a divisor of the batch's "
                                         r"6 rows, got 4; set batch_size to a multiple of world size x "
                                         r"accum_steps"):
        grad_cache_encode(model, torch.randn(6, 2), micro_batches=4, module=model)
    with pytest.raises(ValueError, match=r"inputs\[1\]: expected 6 rows as inputs\[0\], got 5"):
        grad_cache_encode(model, torch.randn(6, 2), torch.randn(5, 2), micro_batches=2, module=model)
    with pytest.raises(TypeError, match=r"inputs\[0\] must be a torch.Tensor"):
        grad_cache_encode(model, [[1.0]], micro_batches=2, module=model)
    with pytest.raises(ValueError, match="micro_batches must be an integer >= 1, got 0"):
        grad_cache_encode(model, torch.randn(6, 2), micro_batches=0, module=model)


def test_the_replay_restores_sync_batch_norm_statistics():
    """SyncBatchNorm (what sync_bn=true converts to) runs only on CUDA tensors, so the replay's
    restore is shown on its buffers directly: the running statistics of every normalization layer,
    synchronised or not, come back after the replay moved them."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(1, 2, 1), nn.BatchNorm2d(2)))
    assert isinstance(model[1], nn.SyncBatchNorm)
    before = [b.clone() for b in model.buffers()]
    with _running_stats_kept(model):
        for b in model.buffers():
            b.add_(1)
    for got, exp in zip(model.buffers(), before, strict=True):
        torch.testing.assert_close(got, exp, rtol=0, atol=0)
