"""MAELoss: the official MAE forward_loss(imgs, pred, mask) call shape (targets read from imgs),
against the official function restated from the paper and repository, in float64."""

import pytest
import torch

from fastssl.losses import MAELoss
from fastssl.ops import mae_loss, patchify


def official_forward_loss(imgs, pred, mask, p, norm_pix_loss):
    """MaskedAutoencoderViT.forward_loss, restated: patchify ('nchpwq->nhwpqc'), optional
    per-patch normalization with the unbiased variance + 1e-6, masked mean of the patch MSE."""
    N, C, H, W = imgs.shape
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p)
    target = torch.einsum("nchpwq->nhwpqc", x).reshape(N, h * w, p * p * C)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    return (loss * mask).sum() / mask.sum()


@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("C,H,W,p", [(3, 32, 32, 16), (3, 28, 28, 4), (1, 12, 20, 4)])
def test_matches_official_forward_loss(C, H, W, p, norm_pix_loss):
    g = torch.Generator().manual_seed(C * 100 + H + p)
    N, L, P = 3, (H // p) * (W // p), p * p * C
    imgs = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    pred = torch.randn(N, L, P, generator=g, dtype=torch.float64, requires_grad=True)
    mask = (torch.rand(N, L, generator=g) < 0.75).double()
    mask[0, 0] = 1.0
    criterion = MAELoss(patch_size=p, norm_pix_loss=norm_pix_loss)
    loss = criterion(imgs, pred, mask)
    (grad,) = torch.autograd.grad(loss, pred)
    pred_ref = pred.detach().clone().requires_grad_()
    want = official_forward_loss(imgs, pred_ref, mask, p, norm_pix_loss)
    (grad_ref,) = torch.autograd.grad(want, pred_ref)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-12, atol=1e-15)
    same = mae_loss(pred.detach(), patchify(imgs, p), mask, norm_pix_loss=norm_pix_loss)
    assert torch.equal(loss.detach(), same)


def test_defaults_and_errors():
    assert MAELoss(16).norm_pix_loss is False  # the official class's default
    assert "patch_size=16" in repr(MAELoss(16))
    with pytest.raises(ValueError, match="patch_size"):
        MAELoss(0)
    with pytest.raises(TypeError, match="norm_pix_loss"):
        MAELoss(16, norm_pix_loss=1)
    with pytest.raises(ValueError, match="patches of patch_size=16"):
        MAELoss(16)(torch.randn(1, 3, 24, 24), torch.randn(1, 1, 768), torch.ones(1, 1))
