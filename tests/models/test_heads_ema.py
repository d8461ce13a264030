"""Heads (MoCo v2/v3 MLPs, DINO head), the multi-crop wrapper, EMA and the momentum ramp,
each against the paper's formula written out here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.models import (
    DINOHead,
    MultiCropWrapper,
    build_backbone,
    cosine_momentum,
    ema_update_,
    frozen_copy,
    moco_v2_head,
    moco_v3_mlp,
    sincos_pos_embed_2d,
)


def test_moco_v2_head_is_linear_relu_linear():
    head = moco_v2_head(16, 32, 8)
    x = torch.randn(5, 16)
    expected = F.linear(F.relu(F.linear(x, head[0].weight, head[0].bias)), head[2].weight, head[2].bias)
    torch.testing.assert_close(head(x), expected)


def test_moco_v3_mlp_structure():
    proj = moco_v3_mlp(3, 16, 32, 8)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    bns = [m for m in proj if isinstance(m, nn.BatchNorm1d)]
    assert [(m.in_features, m.out_features) for m in linears] == [(16, 32), (32, 32), (32, 8)]
    assert all(m.bias is None for m in linears)
    assert len(bns) == 3 and bns[-1].num_features == 8 and not bns[-1].affine and bns[0].affine
    pred = moco_v3_mlp(2, 8, 32, 8, last_bn=False)
    assert isinstance(pred[-1], nn.Linear)


def test_dino_head_formula_and_frozen_gain():
    torch.manual_seed(0)
    head = DINOHead(16, out_dim=10, hidden_dim=32, bottleneck_dim=8)
    x = torch.randn(4, 16)
    h = x
    for layer in head.mlp:
        h = layer(h)
    # g = 1: logits = normalize(bottleneck) @ normalize(v rows)^T
    v = head.last_layer.parametrizations.weight.original1
    expected = F.normalize(h, dim=-1) @ F.normalize(v, dim=1).T
    torch.testing.assert_close(head(x), expected)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    gain = head.last_layer.parametrizations.weight.original0
    assert not gain.requires_grad and torch.all(gain == 1)
    free = DINOHead(16, 10, 32, 8, norm_last_layer=False)
    assert free.last_layer.parametrizations.weight.original0.requires_grad


def test_multicrop_wrapper_one_backbone_pass_per_resolution():
    torch.manual_seed(0)
    backbone, dim = build_backbone("vit_tiny_patch4", 16, depth=1)
    head = nn.Linear(dim, 5)
    wrapper = MultiCropWrapper(backbone, head).eval()
    calls = []
    backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    crops = [torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16), torch.randn(2, 3, 8, 8),
             torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)]
    out = wrapper(crops)
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    with torch.no_grad():
        expected = torch.cat([head(backbone(c)) for c in crops])  # crop-major rows
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_ema_update_formula_and_buffers_untouched():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = frozen_copy(student)
    assert all(not p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    student(torch.randn(8, 4))  # moves the student's running stats only
    before = [p.clone() for p in teacher.parameters()]
    buffers = [b.clone() for b in teacher.buffers()]
    ema_update_(teacher, student, 0.9)
    for t, t0, s in zip(teacher.parameters(), before, student.parameters()):
        torch.testing.assert_close(t, 0.9 * t0 + 0.1 * s)
    for b, b0 in zip(teacher.buffers(), buffers):
        assert torch.equal(b, b0)


def test_ema_update_errors():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2, bias=False)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\], got 1.5"):
        ema_update_(a, nn.Linear(2, 2), 1.5)
    with pytest.raises(ValueError, match="same parameters, got 2 and 1"):
        ema_update_(a, b, 0.9)


def test_cosine_momentum_ramp():
    m = cosine_momentum(0.996, 100)
    assert m.shape == (100,) and m[0] == pytest.approx(0.996)
    assert np.all(np.diff(m) > 0) and m[-1] < 1.0 and m[-1] > 0.99999
    # halfway: 1 - (1 - m0) * (cos(pi/2) + 1) / 2
    assert m[50] == pytest.approx(1 - 0.004 * (math.cos(math.pi / 2) + 1) / 2)


def test_sincos_pos_embed_matches_the_formula():
    dim, grid = 8, 3
    emb = sincos_pos_embed_2d(dim, grid, cls_token=True)
    assert emb.shape == (1 + grid * grid, dim) and torch.all(emb[0] == 0)
    omega = [1.0 / 10000 ** (k / 2) for k in range(2)]  # dim/4 = 2 frequencies
    for row in range(grid):
        for col in range(grid):
            # first half: the column index (the official code's first grid axis), second: the row
            want = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
            want += [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
            torch.testing.assert_close(emb[1 + row * grid + col], torch.tensor(want, dtype=torch.float32))
    with pytest.raises(ValueError, match="multiple of 4 .* got 6"):
        sincos_pos_embed_2d(6, 2)


def test_split_batch_norm_normalizes_each_split_alone():
    from fastssl.models.heads import SplitBatchNorm2d, split_batch_norm_

    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    split = SplitBatchNorm2d(3, 4)
    split.load_state_dict(bn.state_dict())
    out = split(x)
    # each sub-batch {i : i % 4 == s} through its own copy of the BN, running stats averaged
    refs = [nn.BatchNorm2d(3) for _ in range(4)]
    for s, ref in enumerate(refs):
        ref.load_state_dict(bn.state_dict())
        torch.testing.assert_close(out[s::4], ref(x[s::4]))
    torch.testing.assert_close(split.running_mean, torch.stack([r.running_mean for r in refs]).mean(0))
    torch.testing.assert_close(split.running_var, torch.stack([r.running_var for r in refs]).mean(0))
    split.eval()
    bn.load_state_dict(split.state_dict())
    torch.testing.assert_close(split(x), bn.eval()(x))
    with pytest.raises(ValueError, match="multiple of splits=4, got 6"):
        split.train()(x[:6])
    net = split_batch_norm_(nn.Sequential(nn.Conv2d(3, 3, 1), nn.Sequential(nn.BatchNorm2d(3))), 2)
    assert isinstance(net[1][0], SplitBatchNorm2d) and net[1][0].splits == 2
