"""fastssl.ops.siglip_loss against the SigLIP paper's formula in float64.

The Triton kernels run on the CPU under TRITON_INTERPRET=1 (conftest), so shapes stay small;
on a GPU machine the same tests run on the card (the `device` fixture). bf16 kernel runs are
GPU-only (the interpreter's tl.dot gets bf16 tiles wrong, see test_info_nce.py).
"""

import math

import pytest
import torch
import torch.nn.functional as F
from bad_inputs import bad_input_test, image_text_bad_calls

from fastssl.ops.siglip_loss import siglip_loss, siglip_loss_ref

F64 = torch.float64


def paper_loss(x, y, t, b, offset=0):
    """Zhai et al. 2023, eq. 1, pair by pair: -(1/N) Σ_i Σ_j log σ(z_ij (t x_i·y_j + b)),
    z_ij = 1 for the pair's own text (j = i + offset), -1 otherwise."""
    total = 0.0
    for i in range(x.shape[0]):
        for j in range(y.shape[0]):
            z = 1.0 if offset is not None and j == i + offset else -1.0
            total = total - F.logsigmoid(z * (t * (x[i] @ y[j]) + (0.0 if b is None else b)))
    return total / x.shape[0]


def make(N, M, D, seed, t=10.0, b=-5.0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(N, D, generator=g, dtype=F64), dim=1)
    y = F.normalize(x[torch.arange(M) % N] + torch.randn(M, D, generator=g, dtype=F64), dim=1)
    return [v.to(device) for v in (x, y, torch.tensor(t, dtype=F64), torch.tensor(b, dtype=F64))]


def value_and_grads(fn, inputs, dtype, grad_out=1.0):
    """fn's value and its gradients w.r.t. every input; the features cast to dtype, t and b to fp32
    (fp64 with fp64 features)."""
    feat = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    leaves = [v.detach().to(dtype if i < 2 else feat).requires_grad_() for i, v in enumerate(inputs)]
    loss = fn(*leaves)
    grads = torch.autograd.grad(loss, leaves, grad_outputs=torch.tensor(grad_out, dtype=loss.dtype,
                                                                         device=loss.device))
    return [loss.double()] + [g.double() for g in grads]


def assert_within_rule(got, low, truth, rel_atol, scales):
    """DESIGN.md's rule: error vs the fp64 truth <= 2x the PyTorch reference's error in the same
    precision + a small atol (relative to each quantity's natural size)."""
    for name, g, lo, tr, sc in zip(("loss", "dimage", "dtext", "dscale", "dbias"), got, low, truth, scales):
        assert torch.isfinite(g).all(), name
        err, ref_err = (g - tr).abs().max().item(), (lo - tr).abs().max().item()
        atol = rel_atol * sc
        assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g} > 2 x {ref_err:.3g} + {atol:.3g}"


def natural_scales(truth, t):
    """The loss's rounding scales with its largest logit (about t, unit features); the gradients'
    with their size."""
    return [truth[0].abs().item() + t] + [g.abs().max().item() + 1e-30 for g in truth[1:]]


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("offset", [0, 2, None])
def test_ref_matches_the_paper_pair_by_pair(offset):
    x, y, t, b = make(3, 5, 4, seed=1)
    torch.testing.assert_close(siglip_loss_ref(x, y, t, b, label_offset=offset),
                               paper_loss(x, y, t, b, offset), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(siglip_loss_ref(x, y, t, None, label_offset=offset),
                               paper_loss(x, y, t, None, offset), rtol=1e-12, atol=1e-12)


def test_hand_computed_value(device):
    # x = y = e1 (one pair): logit = t + b = 2, loss = -log σ(2) = log(1 + e^-2).
    x = torch.tensor([[1.0, 0.0]], device=device)
    want = math.log1p(math.exp(-2.0))
    for backend in ("torch", "triton"):
        got = siglip_loss(x, x.clone(), torch.tensor(3.0, device=device), torch.tensor(-1.0, device=device),
                          backend=backend)
        assert abs(got.item() - want) < 1e-6, backend


# ---------------------------------------------------------------- the kernels vs fp64


CASES = [  # (N, M, D, t, b, offset)
    (1, 1, 1, 10.0, -10.0, 0),
    (3, 3, 17, 10.0, -10.0, 0),
    (17, 17, 32, 1.0, 0.0, 0),
    (3, 17, 3, 5.0, -2.0, 14),   # a rank's images against gathered texts
    (17, 3, 16, 5.0, -2.0, None),  # another rank's texts: negatives only
    (64, 64, 32, 100.0, -10.0, 0),  # 2 row tiles, 2 splits; the largest scale open_clip allows
    (40, 64, 24, 30.0, 4.0, 7),
    (3, 300, 16, 10.0, -10.0, 290),  # > 128 streamed texts: 2 splits of the forward
    (130, 130, 16, 10.0, -10.0, 0),  # > 128 streamed images: 2 splits of the text gradient
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "N{}-M{}-D{}-t{}-b{}-off{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_vs_fp64(case, dtype, device):
    N, M, D, t, b, offset = case
    inputs = make(N, M, D, seed=N * 7 + M, t=t, b=b, device=device)
    kw = dict(label_offset=offset)
    truth = value_and_grads(lambda *a: paper_loss(*a, offset) if N * M <= 9 else siglip_loss_ref(*a, **kw),
                            inputs, F64, grad_out=-2.5)
    low = value_and_grads(lambda *a: siglip_loss_ref(*a, **kw), inputs, dtype, grad_out=-2.5)
    got = value_and_grads(lambda *a: siglip_loss(*a, **kw, backend="triton"), inputs, dtype, grad_out=-2.5)
    assert_within_rule(got, low, truth, 2e-6 if dtype == torch.float32 else 2e-3, natural_scales(truth, t))


def test_kernel_without_bias_and_python_scale(device):
    x, y, _, _ = make(9, 9, 16, seed=3, device=device)
    x, y = x.float().requires_grad_(), y.float().requires_grad_()
    got = siglip_loss(x, y, 7.0, None, backend="triton")
    gx, gy = torch.autograd.grad(got, [x, y])
    x64, y64 = x.detach().double().requires_grad_(), y.detach().double().requires_grad_()
    want = paper_loss(x64, y64, 7.0, None)
    wx, wy = torch.autograd.grad(want, [x64, y64])
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx.double(), wx, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gy.double(), wy, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("t,b", [(1000.0, 0.0), (1e-3, 30.0), (50.0, -80.0)])
def test_extreme_scales_stay_finite_and_accurate(t, b, device):
    # |logits| up to 1000: exp would overflow fp32; tiny σ(-u) terms must keep their digits.
    inputs = make(17, 17, 16, seed=5, t=t, b=b, device=device)
    truth = value_and_grads(siglip_loss_ref, inputs, F64)
    low = value_and_grads(siglip_loss_ref, inputs, torch.float32)
    got = value_and_grads(lambda *a: siglip_loss(*a, backend="triton"), inputs, torch.float32)
    assert_within_rule(got, low, truth, 2e-6, natural_scales(truth, t))


def test_views_reach_the_kernels(device):
    # Sliced rows and every other row are read through their strides; a transposed buffer
    # (last dim not unit-stride) is copied. Same result as dense inputs.
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40, generator=g)[:, 4:28].to(device).requires_grad_()
    y = torch.randn(12, 24, generator=g)[::2].to(device).requires_grad_()
    assert x.stride() == (40, 1) and y.stride() == (48, 1)
    t, b = torch.tensor(4.0, device=device), torch.tensor(-1.0, device=device)
    got = siglip_loss(x, y, t, b, backend="triton")
    dense = [v.detach().contiguous().requires_grad_() for v in (x, y)]
    want = siglip_loss(*dense, t, b, backend="triton")
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, [x, y]), torch.autograd.grad(want, dense)):
        torch.testing.assert_close(a, c)
    transposed = dense[1].detach().T.contiguous().T
    torch.testing.assert_close(siglip_loss(dense[0], transposed, t, b, backend="triton"), want)


def test_nan_in_gives_nan_out(device):
    x, y, t, b = make(5, 5, 16, seed=13, device=device)
    x, y = x.float(), y.float()
    x[1, 3] = float("nan")
    x, y = x.requires_grad_(), y.requires_grad_()
    loss = siglip_loss(x, y, t.float(), b.float(), backend="triton")
    assert torch.isnan(loss)
    gx, gy = torch.autograd.grad(loss, [x, y])
    assert torch.isnan(gx[1]).all() and torch.isfinite(gx[[0, 2, 3, 4]]).all()
    assert torch.isnan(gy).all()  # every text meets image 1
    nan_scale = siglip_loss(x.detach().nan_to_num(), y.detach(), torch.tensor(float("nan"), device=device),
                            backend="triton")
    assert torch.isnan(nan_scale)


def test_no_gradient_needed_skips_it(device):
    x, y, t, b = make(5, 5, 16, seed=13, device=device)
    with torch.no_grad():
        got = siglip_loss(x.float(), y.float(), t.float(), b.float(), backend="triton")
    torch.testing.assert_close(got.double(), siglip_loss_ref(x, y, t, b), rtol=1e-6, atol=1e-6)


def test_float64_runs_the_reference_and_gradchecks():
    x, y, t, b = make(4, 6, 5, seed=2)
    leaves = [v.requires_grad_() for v in (x, y, t, b)]
    loss = siglip_loss(*leaves, label_offset=1)  # backend="auto" on CPU float64: the reference
    assert loss.dtype == F64
    torch.testing.assert_close(loss, paper_loss(*leaves, 1), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: siglip_loss(*a, label_offset=1), leaves)


# ---------------------------------------------------------------- errors


def _bad_calls():
    x, y, t = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0)
    return image_text_bad_calls(x, y, t) + [
        ((x, y, t), {"label_offset": 1}, ValueError, "label_offset"),
        ((x, y, t), {"label_offset": -1}, ValueError, "label_offset"),
        ((x, y, t), {"label_offset": 0.5}, TypeError, "label_offset"),
        ((x, y[:3], t), {}, ValueError, "at least N=4 rows"),
    ]


test_errors = bad_input_test(siglip_loss, _bad_calls)


# ---------------------------------------------------------------- op registration


def test_opcheck(device):
    x, y = (torch.randn(n, 16, device=device, requires_grad=True) for n in (5, 7))
    t = torch.tensor(3.0, device=device, requires_grad=True)
    b = torch.tensor([-1.0], device=device, requires_grad=True)
    for args in [(x, y, t, b, 2, True, True), (x, y, t, None, 0, False, True),
                 (x.detach(), y[:5].detach(), t.detach(), b.detach(), 0, True, False)]:
        torch.library.opcheck(torch.ops.fastssl.siglip_loss_fwd.default, args)
    grad = torch.tensor(0.5, device=device)
    bwd_args = (grad, x.detach(), y.detach(), t.detach(), b.detach(), 2, True)
    torch.library.opcheck(torch.ops.fastssl.siglip_loss_bwd.default, bwd_args)


def test_torch_compile_fullgraph(device):
    # Leaf inputs keep inductor's own code small (its C++ compile dominates on a CPU): the graph is
    # the op, its autograd and the casts around it.
    inputs = make(6, 6, 16, seed=4, t=3.0, b=-1.0, device=device)
    leaves = [v.float().requires_grad_() for v in inputs]
    loss = torch.compile(lambda *a: siglip_loss(*a, backend="triton"), fullgraph=True)(*leaves)
    grads = torch.autograd.grad(loss, leaves)
    want = value_and_grads(siglip_loss_ref, inputs, F64)
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-6, atol=1e-6)
    for got, exp in zip(grads, want[1:]):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- GPU (benchmarks/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", [
    (torch.bfloat16, (1024, 1024, 512, 0)), (torch.float32, (1024, 1024, 768, 0)),
    (torch.float16, (256, 1024, 1024, 512)), (torch.bfloat16, (300, 300, 100, None)),
], ids=["local-bf16", "local-fp32", "gathered-fp16", "negatives-bf16"])
def test_kernel_cuda_vs_fp64(dtype, shape):
    N, M, D, offset = shape
    inputs = make(N, M, D, seed=17, device="cuda")
    kw = dict(label_offset=offset)
    truth = value_and_grads(lambda *a: siglip_loss_ref(*a, **kw), inputs, F64)
    low = value_and_grads(lambda *a: siglip_loss_ref(*a, **kw), inputs, dtype)
    got = value_and_grads(lambda *a: siglip_loss(*a, **kw), inputs, dtype)  # auto = Triton on CUDA
    assert_within_rule(got, low, truth, 1e-5 if dtype == torch.float32 else 1e-2, natural_scales(truth, 10.0))
