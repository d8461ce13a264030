"""MoCo v2, MoCo v3 and RotNet against their papers' formulas, written out here."""

import pytest
import torch
import torch.nn.functional as F
from method_helpers import build, context, make_batch, one_thread  # noqa: F401 (autouse fixture)
from torch import nn

from fastssl.models import sincos_pos_embed_2d
from fastssl.models.backbones import RESNETS


def capture(module: nn.Module, store: list) -> None:
    module.register_forward_hook(lambda m, i, o: store.append(o) and None)


def moco_v2_reference(q, k, queue, T):
    """Official MoCo: l_pos = q·k, l_neg = q·queue^T on normalized rows, CE with label 0."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], dim=1) / T
    return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))


def test_mocov2_loss_queue_push_and_momentum_update():
    method = build("mocov2")
    qs, ks = [], []
    capture(method.encoder_q, qs)
    capture(method.encoder_k, ks)
    queue = method.queue.keys.clone()
    batch = make_batch(method, batch_size=8)
    loss = method(batch, context())["loss"]
    torch.testing.assert_close(loss, moco_v2_reference(qs[0], ks[0], queue, 0.2))
    loss.backward()
    assert all(p.grad is None for p in method.encoder_k.parameters())
    assert all(p.grad is not None for p in method.encoder_q.parameters())

    with torch.no_grad():
        for p in method.encoder_q.parameters():
            p.add_(0.01)  # stands in for an optimizer step
    old_k = [p.clone() for p in method.encoder_k.parameters()]
    ptr = int(method.queue.ptr)
    method.after_optimizer_step(context())
    # keys of this step in slots ptr .. ptr+B (normalized), the rest untouched
    torch.testing.assert_close(method.queue.keys[ptr:ptr + 8], F.normalize(ks[0], dim=1))
    assert torch.equal(method.queue.keys[ptr + 8:], queue[ptr + 8:])
    assert int(method.queue.ptr) == (ptr + 8) % 64
    for new, old, q in zip(method.encoder_k.parameters(), old_k, method.encoder_q.parameters()):
        torch.testing.assert_close(new, 0.999 * old + 0.001 * q)


def test_mocov2_symmetric_pushes_both_key_sets():
    method = build("mocov2", symmetric=True)
    qs, ks = [], []
    capture(method.encoder_q, qs)
    capture(method.encoder_k, ks)
    queue = method.queue.keys.clone()
    loss = method(make_batch(method, batch_size=4), context())["loss"]
    # q1 = f_q(view 1), k2 = f_k(view 2), then q2 = f_q(view 2), k1 = f_k(view 1)
    want = 0.5 * (moco_v2_reference(qs[0], ks[0], queue, 0.2) + moco_v2_reference(qs[1], ks[1], queue, 0.2))
    torch.testing.assert_close(loss, want)
    method.after_optimizer_step(context())
    torch.testing.assert_close(method.queue.keys[:8], F.normalize(torch.cat([ks[0], ks[1]]), dim=1))


def moco_v3_reference(q, k, T):
    """Official MoCo v3 contrastive_loss: in-batch CE of q k^T / T with labels arange, times 2T."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    return F.cross_entropy(q @ k.T / T, torch.arange(q.shape[0])) * 2 * T


def test_mocov3_symmetric_loss_and_momentum_schedule():
    method = build("mocov3")
    qs, ks = [], []
    capture(method.predictor, qs)
    capture(method.momentum_encoder, ks)
    loss = method(make_batch(method, batch_size=8), context())["loss"]
    q1, q2 = qs
    k1, k2 = ks
    torch.testing.assert_close(loss, moco_v3_reference(q1, k2, 0.2) + moco_v3_reference(q2, k1, 0.2))
    loss.backward()
    assert all(p.grad is None for p in method.momentum_encoder.parameters())

    schedule = method.schedules(total_steps=50, steps_per_epoch=10)["teacher_momentum"]
    assert schedule.shape == (50,) and schedule[0] == pytest.approx(0.99) and schedule[-1] > 0.9999
    with torch.no_grad():
        for p in method.base_encoder.parameters():
            p.add_(0.01)
    old = [p.clone() for p in method.momentum_encoder.parameters()]
    method.after_optimizer_step(context(teacher_momentum=0.95))
    for new, o, b in zip(method.momentum_encoder.parameters(), old, method.base_encoder.parameters()):
        torch.testing.assert_close(new, 0.95 * o + 0.05 * b)


def test_mocov3_heads_follow_the_backbone_type():
    resnet = build("mocov3")
    assert resnet.cfg.model.backbone in RESNETS
    linears = lambda seq: [m for m in seq if isinstance(m, nn.Linear)]  # noqa: E731
    assert len(linears(resnet.base_encoder[1])) == 2 and len(linears(resnet.predictor)) == 2
    assert isinstance(resnet.predictor[-1], nn.Linear)  # no BN after the predictor
    vit = build("mocov3", backbone="vit_tiny_patch4", image_size=16, vit_depth=1)
    assert len(linears(vit.base_encoder[1])) == 3
    # the paper's random patch projection: frozen, so no gradient and no optimizer state
    assert not any(p.requires_grad for p in vit.base_encoder[0].patch_embed.parameters())
    # and the fixed 2-D sin-cos position embedding (16x16 image, patch 4: a 4x4 grid)
    pos = vit.base_encoder[0].pos_embed
    assert not pos.requires_grad
    torch.testing.assert_close(pos[0], sincos_pos_embed_2d(192, 4, cls_token=True))
    assert vit.encoder() is vit.base_encoder[0]


def test_rotnet_predicts_the_quarter_turn_of_each_view():
    method = build("rotnet")
    logits = []
    capture(method.head, logits)
    batch = make_batch(method, batch_size=3)
    out = method(batch, context())
    target = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    torch.testing.assert_close(out["loss"], F.cross_entropy(logits[0], target))
    acc = (logits[0].argmax(1) == target).float().mean()
    torch.testing.assert_close(out["rotation_accuracy"], acc)
    assert logits[0].shape == (12, 4)
    with pytest.raises(ValueError, match="with at least 4 views, got 2 views"):
        method({"views": batch["views"][:2]}, context())


def test_mocov2_shuffled_split_bn_keys():
    from fastssl.models.heads import SplitBatchNorm2d

    method = build("mocov2", bn_splits=2)
    assert any(isinstance(m, SplitBatchNorm2d) for m in method.encoder_k.modules())
    x = make_batch(method, batch_size=8)["views"][1]
    torch.manual_seed(3)
    keys = method._keys_of(x)
    # the same permutation by hand: keys come back in the batch's order
    torch.manual_seed(3)
    perm = torch.randperm(8)
    with torch.no_grad():
        want = method.encoder_k(x[perm])[torch.argsort(perm)]
    torch.testing.assert_close(keys, want)
    with torch.no_grad():
        unshuffled = method.encoder_k(x)
    assert not torch.allclose(keys, unshuffled)  # other split statistics for each key
    loss = method(make_batch(method, batch_size=8), context())["loss"]
    assert torch.isfinite(loss)
