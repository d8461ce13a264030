"""Gram anchoring against its formula (DINOv3's GramLoss, restated entry by entry in float64):
u = x / ||x|| per patch; G[i, j] = <u_i, u_j> per image (or over the batch's patches);
negatives set to 0 as the options say; loss = mean of (G_s - G_t)^2 over all entries."""

import pytest
import torch

from fastssl.losses.gram import GramLoss, gram_loss


def formula(s, t, img_level=True, remove_neg=True, only_teacher=False):
    s, t = (x.double() / x.double().norm(dim=-1, keepdim=True) for x in (s, t))
    if not img_level:
        s, t = s.reshape(1, -1, s.shape[-1]), t.reshape(1, -1, t.shape[-1])
    total, count = 0.0, 0
    for b in range(s.shape[0]):
        for i in range(s.shape[1]):
            for j in range(s.shape[1]):
                gs, gt = s[b, i] @ s[b, j], t[b, i] @ t[b, j]
                if remove_neg:
                    gs, gt = gs.clamp(min=0), gt.clamp(min=0)
                elif only_teacher:
                    gs = gs * 0 if (gs < 0 and gt < 0) else gs
                    gt = gt.clamp(min=0)
                total = total + (gs - gt) ** 2
                count += 1
    return total / count


@pytest.mark.parametrize("img_level,remove_neg,only_teacher", [
    (True, True, False), (True, False, True), (True, False, False), (False, True, False)])
def test_matches_the_formula_in_value_and_gradient(img_level, remove_neg, only_teacher):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    t = torch.randn(2, 5, 4, dtype=torch.float64, generator=g)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    module = GramLoss(remove_neg=remove_neg, remove_only_teacher_neg=only_teacher)
    got = module(a, t, img_level=img_level)
    want = formula(b, t, img_level, remove_neg, only_teacher)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    got.backward()
    want.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)


def test_half_inputs_compute_in_float32_and_errors():
    s, t = torch.randn(2, 3, 8).bfloat16(), torch.randn(2, 3, 8).bfloat16()
    assert gram_loss(s, t).dtype == torch.float32
    assert GramLoss().state_dict() == {}
    with pytest.raises(ValueError, match="exclude each other"):
        GramLoss(remove_neg=True, remove_only_teacher_neg=True)
    with pytest.raises(ValueError, match="must have one shape"):
        gram_loss(s, t[:, :2])
