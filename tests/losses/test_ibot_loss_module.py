"""iBOTPatchLoss against DINOv2's iBOTPatchLoss behaviour, restated in float64.

Restated from the official module: softmax_center_teacher = softmax((t - center) / T);
sinkhorn_knopp_teacher: Q = exp(t / T)^T, B = masked-token count summed over ranks, Q /= sum(Q)
(all ranks), then per iteration rows (prototypes) /= their all-rank sums and / K, columns
(tokens) /= their sums and / B, finally Q *= B; update_center(t [b, n, K]) then
apply_center_update: center = m * center + (1 - m) * (all-rank sum of sum_b mean_n t) / (b * W);
forward_masked = -sum(per-token CE * masks_weight) / B_images."""

import pytest
import torch

from fastssl.losses.ibot import iBOTPatchLoss
from tests.dist_utils import run_gloo


def official_sinkhorn(t, temp, n_total, n_iterations=3):
    Q = torch.exp(t.double() / temp).t()
    K = Q.shape[0]
    Q /= Q.sum()
    for _ in range(n_iterations):
        Q /= Q.sum(dim=1, keepdim=True)
        Q /= K
        Q /= Q.sum(dim=0, keepdim=True)
        Q /= n_total
    return (Q * n_total).t()


def official_forward_masked(s, t, masks, student_temp=0.1):
    per_token = torch.sum(t * torch.log_softmax(s / student_temp, dim=-1), dim=-1)
    weight = (1 / masks.sum(-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(per_token * weight).sum() / masks.shape[0]


def batch(seed, B=3, L=6, K=24, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    s = 2 * torch.randn(B, L, K, generator=g, dtype=dtype)
    t = 2 * torch.randn(B, L, K, generator=g, dtype=dtype)
    masks = torch.rand(B, L, generator=g) < 0.5
    masks[-1, :2] = True
    return s, t, masks


def test_state_dict_both_ways_and_official_methods():
    ours = iBOTPatchLoss(24)
    assert list(ours.state_dict()) == ["center"] and ours.center.shape == (1, 1, 24)
    official_state = {"center": torch.randn(1, 1, 24)}
    ours.load_state_dict(official_state, strict=True)
    torch.testing.assert_close(ours.center, official_state["center"])
    back = iBOTPatchLoss(24)
    back.load_state_dict(ours.state_dict(), strict=True)
    torch.testing.assert_close(back.center, official_state["center"])
    s, t, masks = batch(0)
    probs = ours.softmax_center_teacher(t, 0.05)
    torch.testing.assert_close(probs, torch.softmax((t - official_state["center"].double()) / 0.05, dim=-1))
    idx = masks.flatten().nonzero().flatten()
    want = official_forward_masked(s.flatten(0, 1)[idx], probs.flatten(0, 1)[idx], masks)
    torch.testing.assert_close(ours(s, probs, masks), want, rtol=1e-12, atol=1e-12)
    padded = torch.cat([s.flatten(0, 1)[idx], torch.randn(5, 24, dtype=torch.float64)])
    got = ours.forward_masked(padded, probs.flatten(0, 1)[idx], masks, n_masked_patches=len(idx))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_centering_path_and_async_center_over_steps(backend):
    K, m = 24, 0.9
    ours = iBOTPatchLoss(K, center_momentum=m, backend=backend)
    center = torch.zeros(1, 1, K, dtype=torch.float64)
    for step in range(3):
        s, t, masks = batch(step)
        idx = masks.flatten().nonzero().flatten()
        probs = torch.softmax((t.flatten(0, 1)[idx] - center.reshape(1, -1)) / 0.05, dim=-1)
        want = official_forward_masked(s.flatten(0, 1)[idx], probs, masks)
        dtype = torch.float64 if backend == "torch" else torch.float32
        got = ours.masked_loss(s.to(dtype), t.to(dtype), masks, teacher_temp=0.05, mask_indices=idx)
        tol = 1e-6 if backend == "torch" else 2e-5
        torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
        # the official update_center on the masked tokens as [1, n, K], applied at the next step
        center = center * m + t.flatten(0, 1)[idx].mean(0).reshape(1, 1, K) * (1 - m)
        assert not ours.updated
    ours.apply_center_update()
    torch.testing.assert_close(ours.center.double(), center, rtol=1e-5, atol=1e-6)


def test_accumulated_micro_batches_move_the_center_once_as_their_union():
    """update_center=False holds each micro-batch's masked teacher tokens; commit_center_update
    then moves the center once by the mean of all of them (as one batch of their union would)."""
    s, t, masks = batch(2, B=4)
    idx = masks.flatten().nonzero().flatten()
    whole = iBOTPatchLoss(24, center_momentum=0.7)
    whole.masked_loss(s, t, masks, teacher_temp=0.05)
    whole.apply_center_update()
    parts = iBOTPatchLoss(24, center_momentum=0.7)
    for half in (slice(0, 2), slice(2, 4)):
        parts.masked_loss(s[half], t[half], masks[half], teacher_temp=0.05, update_center=False)
        assert torch.equal(parts.center, torch.zeros(1, 1, 24))  # nothing moves before the commit
    parts.commit_center_update()
    parts.apply_center_update()
    want = 0.3 * t.flatten(0, 1)[idx].mean(0)
    torch.testing.assert_close(parts.center.reshape(-1).double(), want, rtol=1e-6, atol=1e-7)  # fp32 buffer
    torch.testing.assert_close(parts.center, whole.center, rtol=1e-6, atol=1e-7)
    parts.commit_center_update()  # nothing held: no-op
    torch.testing.assert_close(parts.center, whole.center, rtol=0, atol=0)


def test_update_center_official_semantics():
    ours = iBOTPatchLoss(8, center_momentum=0.8)
    ours.center.fill_(1.0)
    t = torch.randn(4, 5, 8)
    ours.update_center(t)
    torch.testing.assert_close(ours.center, torch.ones(1, 1, 8))  # pending until applied
    ours.apply_center_update()
    torch.testing.assert_close(ours.center, 0.8 + 0.2 * t.mean(1).sum(0, keepdim=True).unsqueeze(0) / 4)


def test_sinkhorn_knopp_targets_and_loss():
    ours = iBOTPatchLoss(24)
    s, t, masks = batch(1)
    idx = masks.flatten().nonzero().flatten()
    rows = t.flatten(0, 1)[idx]
    count = torch.tensor([len(idx)])
    want_q = official_sinkhorn(rows, 0.07, len(idx))
    torch.testing.assert_close(ours.sinkhorn_knopp_teacher(rows, 0.07, count), want_q, rtol=1e-10, atol=1e-12)
    assert count.item() == len(idx)
    want = official_forward_masked(s.flatten(0, 1)[idx], want_q, masks)
    got = ours.masked_loss(s, t, masks, teacher_temp=0.07, centering="sinkhorn_knopp")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def _ranks(rank, world):
    s, t, masks = batch(10 + rank, B=2)
    ours = iBOTPatchLoss(24)
    sk = ours.masked_loss(s, t, masks, teacher_temp=0.07, centering="sinkhorn_knopp")
    center_loss = ours.masked_loss(s, t, masks, teacher_temp=0.05)
    ours.apply_center_update()
    return sk, center_loss, ours.center


def test_two_gloo_ranks_equal_the_official_counts():
    results = run_gloo(_ranks, 2)
    parts = [batch(10 + r, B=2) for r in range(2)]
    idxs = [m.flatten().nonzero().flatten() for _, _, m in parts]
    rows = torch.cat([t.flatten(0, 1)[i] for (_, t, _), i in zip(parts, idxs)])
    q = official_sinkhorn(rows, 0.07, rows.shape[0]).split([len(i) for i in idxs])
    means = [t.flatten(0, 1)[i].mean(0) for (_, t, _), i in zip(parts, idxs)]
    center = 0.1 * (means[0] + means[1]).reshape(1, 1, -1) / 2
    for r, (sk, center_loss, got_center) in enumerate(results):
        s, t, masks = parts[r]
        torch.testing.assert_close(sk, official_forward_masked(s.flatten(0, 1)[idxs[r]], q[r], masks),
                                   rtol=1e-10, atol=1e-12)
        probs = torch.softmax(t.flatten(0, 1)[idxs[r]] / 0.05, dim=-1)
        want = official_forward_masked(s.flatten(0, 1)[idxs[r]], probs, masks)
        torch.testing.assert_close(center_loss, want, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got_center.double(), center, rtol=1e-6, atol=1e-7)
