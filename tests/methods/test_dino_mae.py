"""DINO and MAE against their papers' formulas, written out here: DINO's teacher gets no
gradient and sees only the global crops, its last layer is frozen in epoch 0, the center
moves; MAE's encoder sees exactly len_keep tokens and its loss counts only masked patches."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_helpers import build, context, make_batch, one_thread, optimizer, train_step  # noqa: F401
from torch import nn


def capture(module: nn.Module, store: list) -> None:
    module.register_forward_hook(lambda m, i, o: store.append(o) and None)


def dino_reference(student, teacher, center, n_crops, teacher_temp, student_temp=0.1):
    """Official DINOLoss.forward: CE between each global crop's centered, sharpened teacher
    softmax and every other crop's student log-softmax, averaged over pairs and samples."""
    s = (student / student_temp).chunk(n_crops)
    t = F.softmax((teacher - center) / teacher_temp, dim=-1).chunk(2)
    total, pairs = 0.0, 0
    for i, ti in enumerate(t):
        for v, sv in enumerate(s):
            if v != i:
                total = total + (-ti * F.log_softmax(sv, dim=-1)).sum(-1).mean()
                pairs += 1
    return total / pairs


def test_dino_loss_teacher_and_center():
    method = build("dino", warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                   epochs=4)
    students, teachers, teacher_inputs = [], [], []
    capture(method.student.head, students)
    capture(method.teacher.head, teachers)
    method.teacher.backbone.register_forward_hook(lambda m, i, o: teacher_inputs.append(i[0].shape) and None)
    batch = make_batch(method, batch_size=3)
    with torch.no_grad():  # a first step moves the center away from zero
        method(make_batch(method, batch_size=3, seed=1), context(epoch=1))
    students.clear(), teachers.clear(), teacher_inputs.clear()
    center = method.criterion.center.clone()
    assert center.abs().sum() > 0
    loss = method(batch, context(epoch=1))["loss"]
    # teacher: only the 2 global crops, in one backbone pass
    assert teacher_inputs == [(6, 3, 16, 16)]
    assert students[0].shape == (4 * 3, 32) and teachers[0].shape == (6, 32)
    # epoch 1 of a 2-epoch warm-up from 0.04 to 0.07 (linspace): 0.07
    torch.testing.assert_close(loss, dino_reference(students[0], teachers[0], center, 4, 0.07))
    # center <- 0.9 * center + 0.1 * mean of the teacher rows (both global crops)
    want_center = 0.9 * center + 0.1 * teachers[0].mean(0, keepdim=True)
    torch.testing.assert_close(method.criterion.center, want_center)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in method.teacher.parameters())
    assert method.encoder() is method.teacher.backbone


def test_dino_last_layer_frozen_in_epoch_0_only():
    method = build("dino")
    opt = optimizer(method, 1e-2)
    batch = make_batch(method, batch_size=4)
    last = method.student.head.last_layer.parametrizations.weight.original1
    mlp = method.student.head.mlp[0].weight
    last0, mlp0 = last.clone(), mlp.clone()
    train_step(method, opt, batch, context(step=0, epoch=0))
    assert last.grad is None and torch.equal(last, last0)
    assert not torch.equal(mlp, mlp0)
    train_step(method, opt, batch, context(step=10, epoch=1))
    assert not torch.equal(last, last0)


def test_dino_teacher_follows_the_momentum_schedule():
    method = build("dino")
    schedule = method.schedules(total_steps=20, steps_per_epoch=10)["teacher_momentum"]
    assert schedule[0] == pytest.approx(0.996) and 0.99997 < schedule[-1] < 1.0
    with torch.no_grad():
        for p in method.student.parameters():
            p.add_(0.01)
    old = [p.clone() for p in method.teacher.parameters()]
    method.after_optimizer_step(context(teacher_momentum=0.9))
    for new, o, s in zip(method.teacher.parameters(), old, method.student.parameters()):
        torch.testing.assert_close(new, 0.9 * o + 0.1 * s)


def test_dino_sinkhorn_knopp_centering_runs():
    method = build("dino", teacher_centering="sinkhorn_knopp")
    center = method.criterion.center.clone()
    loss = method(make_batch(method, batch_size=4), context())["loss"]
    loss.backward()
    assert torch.isfinite(loss) and torch.equal(method.criterion.center, center)


def patchify_reference(imgs, p):
    """Official MAE patchify: (N, 3, h*p, w*p) -> (N, h*w, p*p*3) via 'nchpwq->nhwpqc'."""
    n, c, H, W = imgs.shape
    x = imgs.reshape(n, c, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (H // p) * (W // p), p * p * c)


def test_mae_encoder_sees_len_keep_tokens_and_loss_counts_masked_patches():
    method = build("mae")
    model = method.model
    L, len_keep = 16, int(16 * (1 - 0.75))  # 16x16 image, patch 4
    encoder_in, decoder_in, preds = [], [], []
    model.blocks[0].register_forward_hook(lambda m, i, o: encoder_in.append(i[0]) and None)
    model.decoder_blocks[0].register_forward_hook(lambda m, i, o: decoder_in.append(i[0].shape) and None)

    def keep_pred(m, i, o):
        o.retain_grad()
        preds.append(o)

    model.decoder_pred.register_forward_hook(keep_pred)
    imgs = make_batch(method, batch_size=3)["views"][0]
    noise = torch.rand(3, L, generator=torch.Generator().manual_seed(1))
    loss, pred, mask = model(imgs, 0.75, noise=noise)
    assert encoder_in[0].shape == (3, 1 + len_keep, 192)  # class token + kept patches only
    assert decoder_in == [(3, 1 + L, 32)]             # class token + every position
    # official masking: keep the len_keep lowest-noise patches, mask 1 = removed
    want_mask = torch.ones(3, L)
    want_mask.scatter_(1, noise.argsort(1)[:, :len_keep], 0.0)
    assert torch.equal(mask, want_mask)
    # position embedding added before masking, class token (with its position) prepended after
    with torch.no_grad():
        tokens = model.patch_embed(imgs) + model.pos_embed[:, 1:]
        kept = torch.gather(tokens, 1, noise.argsort(1)[:, :len_keep, None].expand(-1, -1, 192))
        cls = (model.cls_token + model.pos_embed[:, :1]).expand(3, -1, -1)
    torch.testing.assert_close(encoder_in[0], torch.cat([cls, kept], dim=1))

    target = patchify_reference(imgs, 4)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    torch.testing.assert_close(loss, (per_patch * want_mask).sum() / want_mask.sum())
    loss.backward()
    grad = preds[0].grad[:, 1:]  # drop the class token row
    assert torch.all(grad[want_mask == 0] == 0)       # kept patches do not count
    assert torch.all(grad[want_mask == 1].abs().sum(-1) > 0)


def test_mae_method_and_encoder_features():
    method = build("mae")
    out = method(make_batch(method, batch_size=2), context())
    assert out["loss"].ndim == 0 and torch.isfinite(out["loss"])
    encoder = method.encoder()
    assert encoder(torch.randn(2, 3, 16, 16)).shape == (2, 192)
    # fixed sin-cos position embeddings are buffers, not parameters
    names = {n for n, _ in method.named_parameters()}
    assert not any("pos_embed" in n for n in names)
    with pytest.raises(ValueError, match=r"mask_ratio must be a number > 0 and < 1, got 1.0"):
        build("mae", mask_ratio=1.0)


def test_dino_clips_each_gradient_tensor_to_norm_3():
    method = build("dino")
    params = [p for p in method.student.parameters() if p.requires_grad]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 10.0 if i % 2 else 1e-4)
    before = [p.grad.clone() for p in params]
    method.before_optimizer_step(context(epoch=1))
    for p, g in zip(params, before):
        norm = g.norm()
        want = g * (3.0 / (norm + 1e-6)) if 3.0 / (norm + 1e-6) < 1 else g
        torch.testing.assert_close(p.grad, want)


def test_dino_rejects_a_wrong_number_of_crops():
    method = build("dino")
    batch = make_batch(method, batch_size=2)
    center = method.criterion.center.clone()
    with pytest.raises(ValueError, match=r"dino: expected 4 views \(2 global \+ n_local_crops=2\), got 5"):
        method({"views": batch["views"] + batch["views"][-1:]}, context())
    assert torch.equal(method.criterion.center, center)


def test_dino_teacher_temperature_comes_through_the_step_schedules():
    """The official per-epoch teacher temperature (linear warm-up, then constant), held for every step
    of its epoch, in Method.schedules beside the teacher momentum; a step uses the value passed in."""
    method = build("dino", warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=2,
                   epochs=3)
    schedules = method.schedules(total_steps=30, steps_per_epoch=10)
    official = np.concatenate((np.linspace(0.04, 0.07, 2), np.ones(1) * 0.07))
    assert np.array_equal(schedules["teacher_temp"], np.repeat(official, 10))
    batch = make_batch(method, batch_size=4)
    losses = []
    for temp in (0.04, 0.07):
        torch.manual_seed(0)
        probe = copy.deepcopy(method)
        losses.append(probe(batch, context(epoch=0, teacher_temp=temp))["loss"].item())
    torch.manual_seed(0)
    at_epoch_2 = copy.deepcopy(method)(batch, context(epoch=2))["loss"].item()  # no schedule: the epoch's
    assert losses[0] != losses[1] and losses[1] == at_epoch_2
