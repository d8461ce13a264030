"""fastssl.ops.dino_loss against a float64 oracle written from the official DINOLoss behaviour.

The oracle follows facebookresearch/dino's DINOLoss.forward step by step: student logits / tau_s
chunked into n_crops, teacher softmax((t - center) / tau_t) chunked into n_global, for each
teacher crop iq and student crop v != iq the batch mean of sum(-q * log_softmax(s_v)), averaged
over the number of such terms. It is run in float64 (the truth) and in the low dtype (the error
budget of the PyTorch formula in that precision)."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from fastssl.ops.dino_loss import (
    dino_loss,
    dino_loss_ref,
    soft_cross_entropy,
)


def official_loss(student, teacher, center, n_crops, n_global, student_temp, teacher_temp):
    student_out = (student / student_temp).chunk(n_crops)
    teacher_out = F.softmax((teacher - center) / teacher_temp, dim=-1).detach().chunk(n_global)
    total, n_terms = 0, 0
    for iq, q in enumerate(teacher_out):
        for v in range(len(student_out)):
            if v == iq:
                continue
            total = total + torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1).mean()
            n_terms += 1
    return total / n_terms


def make(n_crops, n_global, B, K, dtype=torch.float64, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    student = (scale * torch.randn(n_crops * B, K, generator=g, dtype=torch.float64)).to(dtype)
    teacher = (scale * torch.randn(n_global * B, K, generator=g, dtype=torch.float64)).to(dtype)
    center = (0.5 * torch.randn(1, K, generator=g, dtype=torch.float64)).to(dtype)
    return student, teacher, center


def value_and_grad(fn, student, *args, **kw):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, *args, **kw)
    (grad,) = torch.autograd.grad(loss, s)
    return loss.detach().cpu(), grad


def assert_within_twice_torch_error(got, truth, torch_low, atol):
    """DESIGN.md rule: max |got - truth| <= 2 max |torch_low - truth| + atol, truth in float64."""
    err = (got.double() - truth).abs().max().item()
    budget = 2 * (torch_low.double() - truth).abs().max().item() + atol
    assert err <= budget, f"error {err:.3g} > budget {budget:.3g}"


def fp32_atol(student, teacher, center, student_temp, teacher_temp):
    """fp32 rounding scale of the fused formula: it subtracts <p, s>/tau_s from lse(s/tau_s), both of the
    size of the largest logit/temperature, where the official code sums already-small log-probabilities;
    every exponent carries a rounding error of that size times 2^-24 as well."""
    return max(student.abs().max().item() / student_temp,
               (teacher - center).abs().max().item() / teacher_temp) * 2.0**-24


def on(device, fn):
    """fn with its tensor arguments moved to `device` (CUDA when present, else the CPU, where
    backend='triton' runs under the interpreter); gradients flow back to the CPU originals."""
    def call(*args, **kw):
        return fn(*(a.to(device) if isinstance(a, torch.Tensor) else a for a in args), **kw)
    return call


# Every n_crops x n_global x B with K in {7, 1000}; K = 4099 with the small batches and once at full size
# (the largest cases cost seconds of CPU each).
GRID = [*itertools.product([2, 3, 6, 12], [1, 2], [1, 3, 64], [7, 1000]),
        *itertools.product([2, 3, 6, 12], [1, 2], [1, 3], [4096 + 3]), (12, 2, 64, 4096 + 3)]


@pytest.mark.parametrize("n_crops,n_global,B,K", GRID)
def test_torch_backend_matches_official_formula(n_crops, n_global, B, K):
    student, teacher, center = make(n_crops, n_global, B, K)
    kw = dict(n_crops=n_crops, n_global_crops=n_global, student_temp=0.1, teacher_temp=0.04)
    loss, grad = value_and_grad(dino_loss, student, teacher, center, backend="torch", **kw)
    want, want_grad = value_and_grad(official_loss, student, teacher, center, n_crops, n_global, 0.1, 0.04)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


# The interpreter runs a few thousand tile-rows per second: shapes stay small here, and every
# (n_crops, n_global) pair still runs, with K below and across the 2048-wide tile.
KERNEL_CASES = [
    (2, 1, 1, 7), (2, 2, 3, 7), (3, 1, 3, 1000), (3, 2, 1, 4096 + 3), (6, 1, 3, 130), (6, 2, 3, 1000),
    (12, 1, 1, 17), (12, 2, 3, 2048 + 2),
]


@pytest.mark.parametrize("n_crops,n_global,B,K", KERNEL_CASES)
def test_kernel_matches_official_formula(n_crops, n_global, B, K, device):
    student, teacher, center = make(n_crops, n_global, B, K, dtype=torch.float32)
    loss, grad = value_and_grad(on(device, dino_loss), student, teacher, center, n_crops=n_crops,
                                n_global_crops=n_global, backend="triton")
    want, want_grad = value_and_grad(official_loss, student.double(), teacher.double(), center.double(),
                                     n_crops, n_global, 0.1, 0.04)
    low, low_grad = value_and_grad(official_loss, student, teacher, center, n_crops, n_global, 0.1, 0.04)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    # Each gradient entry is a difference of probabilities (up to 1) times 1/(tau_s n_pairs B); with
    # logits/temperature near 100, fp32 rounding of the exponent dominates both fp32 computations.
    grad_scale = 1 / (0.1 * (n_crops - 1) * B)
    atol = fp32_atol(student, teacher, center, 0.1, 0.04)
    assert_within_twice_torch_error(loss, want, low, 32 * atol)
    assert_within_twice_torch_error(grad, want_grad, low_grad, 4 * atol * grad_scale)


@pytest.mark.parametrize("student_temp,teacher_temp,scale",
                         [(0.01, 0.01, 5.0), (1.0, 1.0, 0.01), (0.1, 0.04, 30.0)])
def test_kernel_extreme_temperatures(student_temp, teacher_temp, scale, device):
    student, teacher, center = make(3, 2, 3, 300, dtype=torch.float32, scale=scale, seed=1)
    kw = dict(n_crops=3, n_global_crops=2, student_temp=student_temp, teacher_temp=teacher_temp)
    loss, grad = value_and_grad(on(device, dino_loss), student, teacher, center, backend="triton", **kw)
    want, want_grad = value_and_grad(official_loss, student.double(), teacher.double(), center.double(), 3, 2,
                                     student_temp, teacher_temp)
    low, low_grad = value_and_grad(official_loss, student, teacher, center, 3, 2, student_temp, teacher_temp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    grad_scale = 2 / (student_temp * 4 * 3)  # c_v / (tau_s n_pairs B)
    atol = fp32_atol(student, teacher, center, student_temp, teacher_temp)
    assert_within_twice_torch_error(loss, want, low, 32 * atol)
    assert_within_twice_torch_error(grad, want_grad, low_grad, 4 * atol * grad_scale)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_low_precision_within_twice_torch_error(dtype, device):
    """DESIGN.md rule: error vs fp64 truth <= 2x the official formula's error in the same dtype + atol."""
    n_crops, n_global, B, K = 6, 2, 3, 1000
    student, teacher, center = make(n_crops, n_global, B, K, dtype=dtype, scale=1.0, seed=2)
    kw = dict(n_crops=n_crops, n_global_crops=n_global, student_temp=0.1, teacher_temp=0.04)
    loss, grad = value_and_grad(on(device, dino_loss), student, teacher, center, backend="triton", **kw)
    assert grad.dtype == dtype
    truth, truth_grad = value_and_grad(official_loss, student.double(), teacher.double(), center.double(),
                                       n_crops, n_global, 0.1, 0.04)
    low, low_grad = value_and_grad(official_loss, student, teacher, center, n_crops, n_global, 0.1, 0.04)
    assert (loss.double() - truth).abs() <= 2 * (low.double() - truth).abs() + 1e-3
    kernel_err = (grad.double() - truth_grad).abs().max()
    torch_err = (low_grad.double() - truth_grad).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-3 * truth_grad.abs().max()


def test_kernel_grad_output_scaling_and_noncontiguous_input(device):
    student, teacher, center = make(3, 2, 3, 65, dtype=torch.float32)
    s_t = student.t().contiguous().to(device).requires_grad_(True)  # the kernel must copy the transposed view
    loss = dino_loss(s_t.t(), teacher.to(device), center.view(-1).to(device), n_crops=3, n_global_crops=2,
                     backend="triton")
    (grad,) = torch.autograd.grad(loss, s_t, grad_outputs=torch.tensor(-2.5, device=device))
    loss, grad = loss.detach().cpu(), grad.cpu()
    want, want_grad = value_and_grad(official_loss, student.double(), teacher.double(), center.double(), 3, 2,
                                     0.1, 0.04)
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(grad.t().double(), -2.5 * want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("layout", ["row_slices", "transposed"])
def test_strided_views_match_the_contiguous_result(layout, device):
    """Row-strided views (slices of wider logits) are read in place; a transposed one is copied by
    the launcher. Both give the fp64 official loss and gradient, also for the multi-label form."""
    n_crops, n_global, B, K = 4, 2, 3, 70
    student, teacher, center = make(n_crops, n_global, B, K)
    want, want_grad = value_and_grad(official_loss, student, teacher, center, n_crops, n_global, 0.1, 0.04)
    if layout == "row_slices":
        wide_s = torch.zeros(n_crops * B, K + 9, dtype=torch.float64)
        wide_s[:, 5:5 + K] = student
        wide_t = torch.zeros(n_global * B, 2 * K, dtype=torch.float64)
        wide_t[:, K:] = teacher
        wide_s, wide_t = wide_s.to(device).requires_grad_(), wide_t.to(device)
        s_view, t_view = wide_s[:, 5:5 + K], wide_t[:, K:]
    else:
        wide_s = student.t().contiguous().to(device).requires_grad_()
        s_view, t_view = wide_s.t(), teacher.t().contiguous().to(device).t()
    assert not s_view.is_contiguous() and not t_view.is_contiguous()
    loss = dino_loss(s_view, t_view, center.to(device), n_crops=n_crops, n_global_crops=n_global,
                     backend="triton")
    (grad,) = torch.autograd.grad(loss, wide_s)
    # the kernel computes in fp32 whatever the input dtype
    torch.testing.assert_close(loss.cpu(), want, rtol=1e-6, atol=1e-6)
    grad = grad.cpu()[:, 5:5 + K] if layout == "row_slices" else grad.cpu().t()
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)
    # multi-label form (one crop, weights as target) on the same views
    weights = (t_view[:B] > 0).double()
    got = soft_cross_entropy(s_view[:B], weights, backend="triton")
    ref = soft_cross_entropy(s_view[:B].cpu(), weights.cpu(), backend="torch")
    torch.testing.assert_close(got.cpu(), ref, rtol=1e-6, atol=1e-6)


def test_teacher_and_center_get_no_gradient(device):
    student, teacher, center = (x.to(device) for x in make(2, 1, 3, 40, dtype=torch.float32))
    teacher.requires_grad_(True)
    student.requires_grad_(True)
    loss = dino_loss(student, teacher, center, n_crops=2, n_global_crops=1, backend="triton")
    loss.backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_in_gives_nan_out(where, device):
    student, teacher, center = (x.to(device) for x in make(3, 2, 3, 50, dtype=torch.float32))
    (student if where == "student" else teacher)[4, 7] = float("nan")
    loss = dino_loss(student, teacher, center, n_crops=3, n_global_crops=2, backend="triton")
    assert torch.isnan(loss)


def test_soft_cross_entropy_given_probabilities(device):
    """Target weights mode (multi-label, Sinkhorn-Knopp teacher), with and without the v != i rule."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(3 * 2, 1100, generator=g)
    weights = torch.rand(2 * 2, 1100, generator=g) * (torch.rand(2 * 2, 1100, generator=g) < 0.05)
    weights[:, 5] = 0.5
    probs = weights.double() / weights.double().sum(-1, keepdim=True)
    for exclude in (True, False):
        loss, grad = value_and_grad(on(device, soft_cross_entropy), student, weights, n_crops=3, n_targets=2,
                                    student_temp=0.2, exclude_same=exclude, backend="triton")
        s64 = student.double().requires_grad_(True)
        log_q = F.log_softmax(s64 / 0.2, dim=-1).chunk(3)
        terms = [-(probs.chunk(2)[i] * log_q[v]).sum(-1).mean()
                 for i in range(2) for v in range(3) if not (exclude and i == v)]
        want = sum(terms) / len(terms)
        (want_grad,) = torch.autograd.grad(want, s64)
        torch.testing.assert_close(loss.double(), want.detach(), rtol=2e-6, atol=1e-5)
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-7)


def test_ref_is_the_documented_formula():
    student, teacher, center = make(3, 2, 2, 9)
    torch.testing.assert_close(dino_loss_ref(student, teacher, center, n_crops=3, n_global_crops=2),
                               official_loss(student, teacher, center, 3, 2, 0.1, 0.04))


def test_opcheck(device):
    student, teacher, center = (x.to(device) for x in make(3, 2, 2, 40, dtype=torch.float32))
    student.requires_grad_(True)
    args = (student, teacher, center.view(-1), 3, 2, 0.1, 0.04, True, True, True)
    torch.library.opcheck(torch.ops.fastssl.dino_loss_fwd.default, args)


def test_torch_compile_fullgraph_traces_the_op(device):
    student, teacher, center = make(3, 2, 2, 40, dtype=torch.float32)
    fn = on(device, torch.compile(
        lambda s, t, c: dino_loss(s, t, c, n_crops=3, n_global_crops=2, backend="triton"), fullgraph=True))
    loss, grad = value_and_grad(fn, student, teacher, center)
    want, want_grad = value_and_grad(official_loss, student.double(), teacher.double(), center.double(), 3, 2,
                                     0.1, 0.04)
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-5 * 2 / (0.1 * 4 * 2))


@pytest.mark.parametrize(
    "shapes,kw,match",
    [
        (((7, 8), (2, 8), (1, 8)), dict(n_crops=3, n_global_crops=1), "divisible by n_crops"),
        (((6, 8), (4, 8), (1, 8)), dict(n_crops=3, n_global_crops=1), r"teacher must have shape .* \(2, 8\)"),
        (((6, 8), (4, 8), (1, 9)), dict(n_crops=3, n_global_crops=2), "center must have shape"),
        (((6, 8), (4, 9), (1, 8)), dict(n_crops=3, n_global_crops=2), "teacher must have shape"),
        (((6, 8), (8, 8), (1, 8)), dict(n_crops=2, n_global_crops=4), "n_global_crops must be <= n_crops"),
        (((6, 8), (6, 8), (1, 8)), dict(n_crops=1, n_global_crops=1), "n_crops must be an integer >= 2"),
        (((6, 8), (4, 8), (1, 8)), dict(n_crops=3, n_global_crops=2, student_temp=0.0), "student_temp"),
        (((6, 8), (4, 8), (1, 8)), dict(n_crops=3, n_global_crops=2, teacher_temp=-1.0), "teacher_temp"),
        (((6, 8), (4, 8), (1, 8)), dict(n_crops=3, n_global_crops=2, backend="cuda"), "backend"),
    ],
)
def test_clear_errors(shapes, kw, match):
    student, teacher, center = (torch.randn(*s) for s in shapes)
    with pytest.raises(ValueError, match=match):
        dino_loss(student, teacher, center, **kw)


def test_type_errors():
    with pytest.raises(TypeError, match="n_crops must be an integer"):
        dino_loss(torch.randn(6, 8), torch.randn(4, 8), torch.randn(8), n_crops=3.0)
    with pytest.raises(TypeError, match="student must have dtype"):
        dino_loss(torch.ones(6, 8, dtype=torch.long), torch.randn(4, 8), torch.randn(8), n_crops=3)


COMPILE_FOR_H100 = r"""
import itertools, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastssl.ops import triton_kernels
m = triton_kernels()
ROWS = dict(s_token_stride="i32", s_tokens="i32", t_stride="i32", t_token_stride="i32", t_tokens="i32",
            t_rows_offset="i32")
FWD = dict(s_ptr="*bf16", t_ptr="*bf16", c_ptr="*fp32", rows_ptr="*i64", s_stats_ptr="*fp32",
           t_stats_ptr="*fp32", t_sum_ptr="*fp32", B="i32", K="i32", V="i32", G="i32", n_tiles="i32",
           samples_per_group="i32", s_stride="i32", **ROWS, inv_ts="fp32", inv_tt="fp32")
BWD = dict(s_ptr="*bf16", t_ptr="*bf16", c_ptr="*fp32", rows_ptr="*i64", w_ptr="*fp32", lse_s_ptr="*fp32",
           t_norm_ptr="*fp32", g_ptr="*fp32", ds_ptr="*bf16", B="i32", K="i32", V="i32", G="i32",
           samples_per_group="i32", s_stride="i32", **ROWS, inv_ts="fp32", inv_tt="fp32", grad_scale="fp32")
MERGE = dict(s_stats_ptr="*fp32", t_stats_ptr="*fp32", t_parts_ptr="*fp32", w_ptr="*fp32", lse_s_ptr="*fp32",
             t_norm_ptr="*fp32", loss_parts_ptr="*fp32", t_sum_ptr="*fp32", B="i32", K="i32", V="i32",
             G="i32", n_tiles="i32", n_groups="i32", n_s_blocks="i32", n_t_blocks="i32", loss_scale="fp32")
def build(kernel, sig, consts):
    names = kernel.arg_names  # the kernel's parameter order: constexpr indices refer to it
    sig = {n: ("constexpr" if n in consts else sig[n]) for n in names}
    src = ASTSource(kernel, sig, {(names.index(n),): v for n, v in consts.items()})
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 8})
# DINO and multi-label: no row table, no weights; iBOT (V = G = 1, no excluded pair): weights, rows
# read in place or gathered through the table
MODES = [(exclude, False, False) for exclude in (True, False)] + [(False, False, True), (False, True, True)]
for logits, (exclude, gather, weights), ones in itertools.product([True, False], MODES, [False, True]):
    # Triton turns int arguments equal to 1 into constants: multi-label (V = G = 1) and B = 1 take that path
    one = dict(B=1, V=1, G=1, samples_per_group=1) if ones else {}
    flags = dict(BLOCK_K=2048, TARGET_IS_LOGITS=logits, EXCLUDE_SAME=exclude)
    build(m["_dino_loss_fwd_kernel"], {k: v for k, v in FWD.items() if k not in one},
          {**one, **flags, "WITH_TARGET_SUM": logits, "GATHER_ROWS": gather})
    build(m["_dino_loss_bwd_kernel"], {k: v for k, v in BWD.items() if k not in one},
          {**one, **flags, "GATHER_ROWS": gather, "ROW_WEIGHTS": weights})
    merge_one = {k: v for k, v in one.items() if k != "samples_per_group"}
    build(m["_dino_loss_merge_kernel"], {k: v for k, v in MERGE.items() if k not in merge_one},
          {**merge_one, "BLOCK_ROWS": 128, "BLOCK_TILES": 32, "BLOCK_COLS": 1024, "EXCLUDE_SAME": exclude,
           "ROW_WEIGHTS": weights})
print("compiled")
"""


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the kernels run for real")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects (e.g. a value whose type differs between the
    branches of a runtime `if`); compile every flag combination to PTX for an H100 here."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
