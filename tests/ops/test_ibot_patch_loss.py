"""fastssl.ops.ibot_patch_loss against a float64 oracle written from DINOv2's iBOTPatchLoss.

The oracle restates the official forward_masked: for the masked tokens (in the order of
masks.flatten().nonzero()), per-token sum_k t * log_softmax(s / tau_s) with t = softmax((t - c) /
tau_t) (softmax_center_teacher), weighted by masks_weight = 1 / clamp(masked tokens of the image,
1), summed, negated and divided by the number of images B."""

import pytest
import torch

from fastssl.ops.ibot_patch_loss import (
    ibot_patch_cross_entropy,
    ibot_patch_loss,
    ibot_patch_loss_ref,
    ibot_patch_loss_with_teacher_sum,
)


def official_forward_masked(s_masked, t_probs, masks, student_temp):
    per_token = torch.sum(t_probs * torch.log_softmax(s_masked / student_temp, dim=-1), dim=-1)
    counts = masks.sum(-1).clamp(min=1.0)
    weight = (1 / counts).unsqueeze(-1).expand_as(masks)[masks]
    return -(per_token * weight).sum() / masks.shape[0]


def make(B, L, K, p=0.4, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a leading class token, sliced off: the token tensor is a strided view
    student = (3 * torch.randn(B, L + 1, K, generator=g, dtype=torch.float64)).to(dtype)[:, 1:]
    teacher = (3 * torch.randn(B, L, K, generator=g, dtype=torch.float64)).to(dtype)
    center = (0.5 * torch.randn(1, 1, K, generator=g, dtype=torch.float64)).to(dtype)
    masks = torch.rand(B, L, generator=g) < p
    masks[0] = False  # an unmasked image: weight counted in B, no terms
    return student, teacher, center, masks


def official(student, teacher, center, masks, student_temp=0.1, teacher_temp=0.04):
    idx = masks.flatten().nonzero().flatten()
    s = student.double().flatten(0, 1)[idx]
    logits = teacher.double().flatten(0, 1)[idx] - center.double().reshape(1, -1)
    t = torch.softmax(logits / teacher_temp, dim=-1)
    return official_forward_masked(s, t, masks, student_temp)


def on(device, fn):
    """fn with its tensor arguments moved to `device` (CUDA when present, else the CPU, where
    backend='triton' runs under the interpreter); gradients flow back to the CPU originals."""
    def move(a):
        return a.to(device) if isinstance(a, torch.Tensor) else a

    def call(*args, **kw):
        out = fn(*map(move, args), **{k: move(v) for k, v in kw.items()})
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return call


def value_and_grad(fn, x, *args, **kw):
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


SHAPES = [(3, 5, 7), (4, 9, 130), (2, 20, 256)]


@pytest.mark.parametrize("B,L,K", SHAPES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_centering_matches_official_value_and_gradient(B, L, K, backend, device):
    student, teacher, center, masks = make(B, L, K)
    assert masks.sum() <= 40
    want, want_grad = value_and_grad(official, student, teacher, center, masks)
    dtype = torch.float64 if backend == "torch" else torch.float32
    inputs = (x.to(dtype) for x in (student, teacher, center))
    got, grad = value_and_grad(on(device, ibot_patch_loss), *inputs, masks=masks, backend=backend)
    tol = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.double(), want, **tol)
    torch.testing.assert_close(grad.double(), want_grad, **tol)
    assert grad.shape == student.shape and (grad[~masks] == 0).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compact_rows_with_padding_and_given_weights(backend, device):
    """DINOv2's layout: the masked tokens first in [upperbound, K] buffers, masks_weight from the collate."""
    student, teacher, center, masks = make(3, 8, 33)
    idx = masks.flatten().nonzero().flatten()
    pad = torch.randn(4, 33, dtype=torch.float64)
    s_rows = torch.cat([student.flatten(0, 1)[idx], pad]).float()
    t_rows = torch.cat([teacher.flatten(0, 1)[idx], pad]).float()
    weight = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks].float()
    want, want_grad = value_and_grad(official, student, teacher, center, masks)
    got, grad = value_and_grad(on(device, ibot_patch_loss), s_rows, t_rows, center.float(), masks=masks,
                               masks_weight=weight, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad[:len(idx)].double(), want_grad.flatten(0, 1)[idx], rtol=2e-5, atol=2e-5)
    assert (grad[len(idx):] == 0).all()
    # mixed: full student tokens, compact teacher rows
    got_mixed = on(device, ibot_patch_loss)(student.float(), t_rows, center.float(), masks=masks,
                                            mask_indices=idx, backend=backend)
    torch.testing.assert_close(got_mixed.double(), want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_given_targets_and_teacher_sum(backend, device):
    student, teacher, center, masks = make(4, 6, 40)
    idx = masks.flatten().nonzero().flatten()
    probs = torch.rand(4, 6, 40, dtype=torch.float64)
    probs = probs / probs.sum(-1, keepdim=True)
    want = official_forward_masked(student.flatten(0, 1)[idx], probs.flatten(0, 1)[idx], masks, 0.1)
    got = on(device, ibot_patch_cross_entropy)(student.float(), probs.float(), masks=masks, backend=backend)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=2e-5)
    _, t_sum = on(device, ibot_patch_loss_with_teacher_sum)(student.float(), teacher.float(), center.float(),
                                                            masks=masks, backend=backend)
    torch.testing.assert_close(t_sum.double(), teacher.flatten(0, 1)[idx].sum(0), rtol=1e-5, atol=1e-5)


def test_float64_reference_and_no_masked_token():
    student, teacher, center, masks = make(2, 5, 9)
    assert ibot_patch_loss_ref(student, teacher, center, masks=masks).dtype == torch.float64
    none = torch.zeros_like(masks)
    loss, grad = value_and_grad(ibot_patch_loss, student, teacher, center, masks=none, backend="torch")
    assert loss.item() == 0.0 and (grad == 0).all()


def test_bf16_within_twice_the_torch_error(device):
    student, teacher, center, masks = make(3, 12, 200)
    want = official(student, teacher, center, masks)
    low = [x.bfloat16() for x in (student, teacher, center)]
    torch_low = ibot_patch_loss_ref(*low, masks=masks)
    got = on(device, ibot_patch_loss)(*low, masks=masks, backend="triton")
    assert (got.double() - want).abs() <= 2 * (torch_low.double() - want).abs() + 1e-5


def test_nan_in_gives_nan_out(device):
    student, teacher, center, masks = make(2, 5, 9, dtype=torch.float32)
    masks[1, 2] = True
    student = student.clone()
    student[1, 2, 3] = float("nan")
    assert torch.isnan(on(device, ibot_patch_loss)(student, teacher, center, masks=masks, backend="triton"))


def test_opcheck_and_compile_fullgraph(device):
    student, teacher, center, masks = (x.to(device) for x in make(2, 6, 16, dtype=torch.float32))
    idx = masks.flatten().nonzero().flatten()
    weight = torch.rand(len(idx), device=device) / 2
    op_args = (student.contiguous(), teacher, center.reshape(-1), idx, idx, weight)
    torch.library.opcheck(torch.ops.fastssl.ibot_patch_loss_fwd.default,
                          (*op_args, 0.1, 0.04, True, True), test_utils=("test_schema", "test_faketensor"))
    def loss(s, t, c, m, i):
        return ibot_patch_loss(s, t, c, masks=m, mask_indices=i, backend="triton")

    fn = torch.compile(loss, fullgraph=True)
    want, want_grad = value_and_grad(ibot_patch_loss, student, teacher, center, masks=masks, mask_indices=idx,
                                     backend="triton")
    got, grad = value_and_grad(fn, student, teacher, center, masks, idx)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("kw,error,match", [
    (dict(masks=torch.ones(2, 4)), TypeError, "masks must have dtype"),
    (dict(masks=torch.ones(2, 5, dtype=torch.bool)), ValueError, "student .B, L, K. must match masks"),
    (dict(masks_weight=torch.ones(3)), ValueError, "masks_weight must have one weight per masked token"),
    (dict(student_temp=0.0), ValueError, "student_temp"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
])
def test_clear_errors(kw, error, match):
    student, teacher, center, _ = make(2, 4, 8, dtype=torch.float32)
    args = {"masks": torch.ones(2, 4, dtype=torch.bool), **kw}
    with pytest.raises(error, match=match):
        ibot_patch_loss(student, teacher, center, **args)
