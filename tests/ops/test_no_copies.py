"""The fused paths dispatch no copy of a full activation: every tensor reaches the kernels through
its strides, in the forward and in the backward.

Each step runs its kernels (backend="triton", under TRITON_INTERPRET=1 on a CPU) inside a
DispatchCounter, which records every aten op, including those the fused ops' launchers dispatch.
A `copy_`, `clone`, `contiguous`, `_to_copy` or slice/select backward whose output is as large as
the step's smallest activation fails the test."""

import pytest
import torch
from timm.layers import PatchEmbed
from torch import nn

from fastssl import ops
from fastssl.bench.counter import DispatchCounter, interpreted_kernels_uncounted
from fastssl.engine import resolve_config
from fastssl.losses.dino import DINOLoss
from fastssl.losses.ibot import iBOTPatchLoss
from fastssl.methods import METHODS


def count(step):
    with interpreted_kernels_uncounted(), DispatchCounter() as counter:
        step()
    return counter


def test_the_counter_sees_a_copy_inside_a_launcher():
    """The counter's own check: an op whose launcher copies (a transposed DINO student: its last
    dim is not unit-stride) is caught; the same op on row slices is not."""
    s = torch.randn(8, 6).t().requires_grad_()  # [6, 8] with stride (1, 6)
    t, c = torch.randn(2, 8), torch.zeros(8)

    def step(leaf, student):  # autograd.grad: no accumulation into the leaf's layout
        torch.autograd.grad(ops.dino_loss(student, t, c, n_crops=3, n_global_crops=1, backend="triton"), leaf)

    copies = count(lambda: step(s, s)).copies(48)
    assert [r.name for r in copies] == ["contiguous", "contiguous"]  # forward and backward launchers
    rows = torch.randn(6, 12, requires_grad=True)[:, 2:10]  # row stride 12, unit-stride rows
    assert count(lambda: step(rows, rows)).copies(48) == []


def test_mae_masking_unshuffle_loss_step_has_no_copies():
    """Patch embedding output (a transposed view) -> masking with position embedding and class
    token -> decoder embedding -> unshuffle with class token and position embedding -> prediction
    -> loss against the images, forward and backward: no copy, no slice backward."""
    torch.manual_seed(0)
    N, img, p, D, Dd = 8, 8, 2, 8, 8
    L, P = (img // p) ** 2, p * p * 3
    embed = PatchEmbed(img, p, 3, D)
    imgs = torch.randn(N, 3, img, img)
    conv_out = embed.proj(imgs).flatten(2).detach().requires_grad_()  # [N, D, L]
    x = conv_out.transpose(1, 2)  # what timm's PatchEmbed returns: [N, L, D], last-dim stride L
    assert torch.equal(x, embed(imgs)) and x.stride(2) != 1
    pos, dec_pos = torch.randn(1, 1 + L, D), torch.randn(1, 1 + L, Dd)
    cls, mask_token = nn.Parameter(torch.randn(1, 1, D)), nn.Parameter(torch.randn(1, 1, Dd))
    decoder_embed, decoder_pred = nn.Linear(D, Dd), nn.Linear(Dd, P)
    noise = torch.rand(N, L)

    def step():
        kept, mask, ids = ops.random_masking(x, 0.75, noise=noise, pos_embed=pos[:, 1:],
                                             cls_token=cls + pos[:, :1], backend="triton")
        tokens = ops.unshuffle_tokens(decoder_embed(kept), mask_token, ids, pos_embed=dec_pos,
                                      with_cls_token=True, backend="triton")
        pred = decoder_pred(tokens)
        ops.mae_loss(pred, imgs, mask, patch_size=p, with_cls_token=True, backend="triton").backward()

    counter = count(step)
    smallest_activation = N * (1 + L // 4) * min(D, Dd)  # the encoder's kept tokens
    assert counter.copies(smallest_activation) == [], counter.copies(smallest_activation)
    assert conv_out.grad is not None and cls.grad is not None and mask_token.grad is not None
    names = {r.name for r in counter.records}
    assert "gather" not in names and "cat" not in names  # the official concat and gathers are fused


def test_dino_loss_step_has_no_copies():
    """DINOLoss (center, teacher temperature) on 2 global + 4 local crops, forward, backward and the
    center update from the kernel's teacher column sum."""
    n_crops, B, K = 6, 4, 300
    criterion = DINOLoss(K, n_crops, 0.04, 0.04, 0, 10, backend="triton")
    student = torch.randn(n_crops * B, K, requires_grad=True)
    teacher = torch.randn(2 * B, K)
    counter = count(lambda: criterion(student, teacher, epoch=0).backward())
    assert counter.copies(teacher.numel()) == [], counter.copies(teacher.numel())
    assert student.grad is not None and criterion.center.abs().sum() > 0


def test_ibot_patch_loss_step_has_no_copies():
    """iBOTPatchLoss.masked_loss on the patch tokens of [images, 1 + L, K] head outputs (the class
    token sliced off: a strided view), forward, backward and the center update: only the masked
    rows are read; nothing as large as the masked rows is copied."""
    B, L, K = 4, 9, 300
    criterion = iBOTPatchLoss(K, backend="triton")
    tokens = torch.randn(B, 1 + L, K, requires_grad=True)
    teacher = torch.randn(B, 1 + L, K)
    masks = torch.rand(B, L, generator=torch.Generator().manual_seed(0)) < 0.4
    idx = masks.flatten().nonzero().flatten()
    student = tokens[:, 1:]
    grads = []

    def step():  # autograd.grad of the view: the slice's own backward is the caller's, not the op's
        loss = criterion.masked_loss(student, teacher[:, 1:], masks, teacher_temp=0.04, mask_indices=idx)
        grads.extend(torch.autograd.grad(loss, student))

    counter = count(step)
    assert counter.copies(len(idx) * K) == [], counter.copies(len(idx) * K)
    criterion.apply_center_update()
    assert grads[0][masks].abs().sum() > 0 and (grads[0][~masks] == 0).all()
    assert criterion.center.abs().sum() > 0


@pytest.fixture
def mocov2(monkeypatch):
    """A small MoCo v2 (its key queue included) whose ops run the Triton kernels."""
    cls = METHODS["mocov2"]
    torch.manual_seed(0)
    cfg = resolve_config(cls.config_class, overrides=dict(backbone="resnet18", image_size=8, moco_dim=16,
                                                          mlp_hidden_dim=32, queue_size=64))
    method = cls(cfg)
    monkeypatch.setattr(cls, "backend", property(lambda self: "triton"))
    return method


def test_mocov2_loss_step_has_no_copies(mocov2):
    """MoCo v2's loss exactly as the method computes it (queries, keys, the key queue), fp32."""
    N, D = 8, mocov2.cfg.method.moco_dim
    q = torch.randn(N, D, requires_grad=True)
    k = torch.randn(N, D)
    counter = count(lambda: mocov2._loss(q, k).backward())
    assert counter.copies(q.numel()) == [], counter.copies(q.numel())
    assert q.grad is not None


def test_mocov2_loss_on_row_strided_queries_has_no_copies(mocov2):
    """Queries and keys as column halves of one projection output (row stride 2 D, unit-stride rows):
    a launcher that passes strides reads them in place."""
    N, D = 8, mocov2.cfg.method.moco_dim
    qk = torch.randn(N, 2 * D, requires_grad=True)
    q, k = qk[:, :D], qk[:, D:].detach()
    counter = count(lambda: torch.autograd.grad(mocov2._loss(q, k), q))
    assert counter.copies(q.numel()) == [], counter.copies(q.numel())
