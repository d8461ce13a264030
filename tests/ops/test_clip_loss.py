"""fastssl.ops.clip_loss against CLIP's formula (Radford et al. 2021) in float64.

The Triton kernels run on the CPU under TRITON_INTERPRET=1 (conftest), so shapes stay small; the
interpreter's tiles (32 image rows, 64 streamed rows, splits of 128) make N = 40 two image tiles,
N = 130 two splits in both directions with ragged edges, D = 40 (fp32) the D-chunked logits and
D = 130, 140 two accumulator chunks, the first keeping its probabilities for the second (KEEP_P).
On a GPU machine the same tests run on the card (the `device`
fixture); bf16 kernel runs are GPU-only (see test_info_nce.py).
"""

import pytest
import torch
import torch.nn.functional as F
from bad_inputs import bad_input_test, image_text_bad_calls

from fastssl.ops.clip_loss import clip_loss, clip_loss_ref

F64 = torch.float64


def paper_loss(x, y, t, b, X=None, Y=None, offset=0):
    """CLIP's symmetric cross-entropy row by row: ½ mean_i [−log softmax_j(t x_i·Y_j + b)[i + offset]
    − log softmax_j(t y_i·X_j + b)[i + offset]], with X = x, Y = y for the one grid."""
    X, Y = (x, y) if X is None else (X, Y)
    total = 0.0
    for i in range(x.shape[0]):
        total = total - torch.log_softmax(t * (Y @ x[i]) + b, 0)[i + offset]
        total = total - torch.log_softmax(t * (X @ y[i]) + b, 0)[i + offset]
    return total / (2 * x.shape[0])


def make(N, D, seed, M=None, t=20.0, b=-3.0, device="cpu"):
    """Unit rows x (N or M of them) and y near x; the log-scale log t and the bias, float64."""
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(M or N, D, generator=g, dtype=F64), dim=1)
    y = F.normalize(x + 0.8 * torch.randn(M or N, D, generator=g, dtype=F64), dim=1)
    return [v.to(device) for v in (x, y, torch.tensor(t, dtype=F64).log(), torch.tensor(b, dtype=F64))]


def value_and_grads(fn, inputs, dtype, grad_out=1.0):
    """fn(x, y, exp(log_t), b)'s value and the gradients of x, y, log t and b (float64); the
    features cast to dtype, the scalars to fp32 (fp64 with fp64 features)."""
    scalar = F64 if dtype == F64 else torch.float32
    leaves = [v.detach().to(dtype if i < 2 else scalar).requires_grad_() for i, v in enumerate(inputs)]
    loss = fn(leaves[0], leaves[1], leaves[2].exp(), leaves[3])
    grads = torch.autograd.grad(loss, leaves, grad_outputs=torch.tensor(grad_out, dtype=loss.dtype,
                                                                         device=loss.device))
    return [loss.double()] + [g.double() for g in grads]


def assert_within_rule(got, low, truth, atol, t):
    """DESIGN.md's rule: error vs the fp64 truth <= 2x the PyTorch reference's error in the same
    precision + a small atol relative to each quantity's natural size: the loss's rounding scales
    with its largest logit (about t), a feature gradient's with t / N, the bias's gradient is 0."""
    n = truth[1].shape[0]
    for name, g, lo, tr, size in zip(("loss", "dimage", "dtext", "dlog_scale", "dbias"), got, low, truth,
                                     (t, t / n, t / n, t, 1.0)):
        assert torch.isfinite(g).all(), name
        err, ref_err = (g - tr).abs().max().item(), (lo - tr).abs().max().item()
        bound = 2 * ref_err + atol * (tr.abs().max().item() + size)
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g} (reference's {ref_err:.3g})"


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("local", [False, True])
def test_ref_matches_the_paper_row_by_row(local):
    x, y, log_t, b = make(7, 5, seed=1)
    t = log_t.exp()
    if local:  # rank 1's rows 3..5 of 7 gathered rows
        kw = dict(all_image_features=x, all_text_features=y, label_offset=3)
        want = paper_loss(x[3:6], y[3:6], t, b, x, y, offset=3)
        torch.testing.assert_close(clip_loss_ref(x[3:6], y[3:6], t, b, **kw), want, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(clip_loss_ref(x, y, t, b), paper_loss(x, y, t, b), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(clip_loss_ref(x, y, t), paper_loss(x, y, t, 0.0), rtol=1e-12, atol=1e-12)


def test_hand_computed_value(device):
    # x = y = [e1, e2], t = 2: each row's logits are (2, 0) with the 2 on the diagonal, in both
    # directions: loss = log(1 + e^-2).
    x = torch.eye(2, device=device)
    want = torch.log1p(torch.exp(torch.tensor(-2.0))).item()
    for backend in ("torch", "triton"):
        got = clip_loss(x, x.clone(), torch.tensor(2.0, device=device), backend=backend)
        assert abs(got.item() - want) < 1e-6, backend


# ---------------------------------------------------------------- the kernels vs fp64


CASES = [  # (N, D, t)
    (1, 1, 20.0),
    (3, 17, 20.0),
    (40, 24, 100.0),  # two image tiles with a ragged one; the largest scale open_clip allows
    (70, 40, 1.0),  # fp32: D chunked in the logits dot
    (130, 16, 50.0),  # two splits of the rows' sweep and of each key gradient
    (5, 130, 10.0),  # two accumulator chunks (D columns) in the backward, the p kept
    (40, 140, 20.0),  # two image tiles (one ragged) and two D chunks (the second ragged)
    (66, 140, 20.0),  # KEEP_P in bands (below): each key gradient's 66 keys in bands of 64 and 2
]
# the workspace capped at one key tile (64 keys x 66 fp32 queries); the forward writes column
# statistics, so it is one launch, never banded
BANDED_GRID, BANDED_GRID_CAP = CASES[-1], 64 * 66 * 4


# fp16 takes the 16-bit tiles: a ragged multi-tile case and the D-chunked one (D > 128 for 16 bits)
@pytest.mark.parametrize("case,dtype", [(c, torch.float32) for c in CASES]
                         + [(CASES[2], torch.float16), (CASES[5], torch.float16)],
                         ids=lambda v: "N{}-D{}-t{}".format(*v) if isinstance(v, tuple) else str(v)[6:])
def test_kernel_vs_fp64(case, dtype, device, kept_bands):
    N, D, t = case
    bands = kept_bands(BANDED_GRID_CAP) if case == BANDED_GRID else None
    inputs = make(N, D, seed=N + D, t=t, device=device)
    truth = value_and_grads(paper_loss if N <= 3 else clip_loss_ref, inputs, F64, grad_out=-2.5)
    low = value_and_grads(clip_loss_ref, inputs, dtype, grad_out=-2.5)
    got = value_and_grads(lambda *a: clip_loss(*a, backend="triton"), inputs, dtype, grad_out=-2.5)
    assert_within_rule(got, low, truth, 2e-6 if dtype == torch.float32 else 2e-3, t)
    assert got[4].abs().max() == 0  # the bias: cross-entropy is shift-invariant
    if bands is not None:  # the two key gradients (OUTER_LSE), two bands each
        assert (bands["_info_nce_fwd_kernel"], bands["_info_nce_bwd_kernel"]) == (0, 4), bands


# The local form in KEEP_P bands: rank 25 of 26 (N = 5 of M = 130, labels offset by 125), the
# workspace capped at one forward split (5 rows x 128 fp32 columns, + their rescales): each
# direction's forward runs its 2 column splits one band each, each key gradient its 130 keys in
# bands of 128 and 2, the positives (125-129) across both.
BANDED_LOCAL, BANDED_CAP = (130, 125), 5 * (128 * 4 + 2 * 4)


@pytest.mark.parametrize("D,M,offset", [(16, 15, 5), (140, 15, 5), (140, *BANDED_LOCAL)],
                         ids=["D16", "D140", "D140-banded"])
def test_local_form_vs_fp64(D, M, offset, device, kept_bands):
    """Rank 1 of 3 (N = 5 of M = 15): its rows against every rank's, labels offset by 5; D = 140: the
    forward's query gradient in two D chunks, the second replaying the first's p and rescales."""
    bands = kept_bands(BANDED_CAP) if (M, offset) == BANDED_LOCAL else None
    x, y, log_t, b = make(5, D, seed=4, M=M, device=device)
    inputs = [x[offset:offset + 5], y[offset:offset + 5], log_t, b]

    def gathered(dtype):  # the other ranks' rows, gathered without gradient
        return dict(all_image_features=x.to(dtype), all_text_features=y.to(dtype), label_offset=offset)

    truth = value_and_grads(lambda *a: clip_loss_ref(*a, **gathered(F64)), inputs, F64)
    low = value_and_grads(lambda *a: clip_loss_ref(*a, **gathered(torch.float32)), inputs, torch.float32)
    got = value_and_grads(lambda *a: clip_loss(*a, **gathered(torch.float32), backend="triton"), inputs,
                          torch.float32)
    assert_within_rule(got, low, truth, 2e-6, 20.0)
    if bands is not None:  # two directions, each a banded forward (its key gradient: no gathered grad)
        assert (bands["_info_nce_fwd_kernel"], bands["_info_nce_bwd_kernel"]) == (4, 0), bands


@pytest.mark.parametrize("M,offset", [(15, 5), BANDED_LOCAL], ids=["M15", "M130-banded"])
def test_local_form_gathered_gradients_vs_fp64(M, offset, device, kept_bands):
    """gather_with_grad: the gradients of every rank's gathered rows (key gradients finished in their
    kernel, labels offset by 5, two D chunks) against float64, by DESIGN.md's rule."""
    bands = kept_bands(BANDED_CAP) if (M, offset) == BANDED_LOCAL else None
    x, y, log_t, _ = make(5, 140, seed=6, M=M, device=device)

    def grads(dtype, **backend):
        X, Y = x.to(dtype).requires_grad_(), y.to(dtype).requires_grad_()
        loss_fn = clip_loss if backend else clip_loss_ref
        loss = loss_fn(x[offset:offset + 5].to(dtype), y[offset:offset + 5].to(dtype), log_t.exp().to(dtype),
                       all_image_features=X, all_text_features=Y, label_offset=offset, **backend)
        return [g.double() for g in torch.autograd.grad(loss, [X, Y])]

    truth, low, got = grads(F64), grads(torch.float32), grads(torch.float32, backend="triton")
    for g, lo, tr in zip(got, low, truth):
        assert (g - tr).abs().max() <= 2 * (lo - tr).abs().max() + 2e-6 * (tr.abs().max() + 20.0 / M)
    if bands is not None:
        assert (bands["_info_nce_fwd_kernel"], bands["_info_nce_bwd_kernel"]) == (4, 4), bands


def test_d_chunks_without_the_kept_p_agree(device, monkeypatch):
    """Above the scratch budget each D chunk is its own program that recomputes the logits; the kept
    p is the same p (chunks of other widths sum it in another order): the same loss and gradients to
    fp32 round-off, and within DESIGN.md's rule of float64 both ways."""
    from fastssl.ops import _info_nce_tiles

    inputs = make(40, 140, seed=8, device=device)
    truth = value_and_grads(clip_loss_ref, inputs, F64)
    low = value_and_grads(clip_loss_ref, inputs, torch.float32)
    kept = value_and_grads(lambda *a: clip_loss(*a, backend="triton"), inputs, torch.float32)
    monkeypatch.setattr(_info_nce_tiles, "_KEEP_P_BYTES", 0)
    recomputed = value_and_grads(lambda *a: clip_loss(*a, backend="triton"), inputs, torch.float32)
    for got in (kept, recomputed):
        assert_within_rule(got, low, truth, 2e-6, 20.0)
    for a, b in zip(kept, recomputed):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_one_feature_set_or_none_needs_a_gradient(device):
    x, y, log_t, b = make(9, 16, seed=3, device=device)
    x, y, t = x.float(), y.float(), log_t.exp().float()
    y64 = y.double().requires_grad_()
    want = clip_loss_ref(x.double(), y64, t.double())
    (want_dy,) = torch.autograd.grad(want, [y64])
    y32 = y.clone().requires_grad_()
    (got_dy,) = torch.autograd.grad(clip_loss(x, y32, t, backend="triton"), [y32])  # text only
    torch.testing.assert_close(got_dy.double(), want_dy, rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        got = clip_loss(x, y, t, b.float(), backend="triton")
    torch.testing.assert_close(got.double(), want.detach(), rtol=1e-6, atol=1e-6)


def test_views_reach_the_kernels(device):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 40, generator=g)[:, 4:28].to(device).requires_grad_()
    y = torch.randn(12, 24, generator=g)[::2].to(device).requires_grad_()
    t = torch.tensor(4.0, device=device)
    got = clip_loss(x, y, t, backend="triton")
    dense = [v.detach().contiguous().requires_grad_() for v in (x, y)]
    want = clip_loss(*dense, t, backend="triton")
    torch.testing.assert_close(got, want)
    for a, c in zip(torch.autograd.grad(got, [x, y]), torch.autograd.grad(want, dense)):
        torch.testing.assert_close(a, c)


def test_nan_in_gives_nan_out(device):
    x, y, log_t, _ = make(5, 16, seed=13, device=device)
    x, y = x.float(), y.float()
    x[1, 3] = float("nan")
    x, y = x.requires_grad_(), y.requires_grad_()
    loss = clip_loss(x, y, log_t.exp().float(), backend="triton")
    assert torch.isnan(loss)
    gx, gy = torch.autograd.grad(loss, [x, y])
    assert torch.isnan(gx).any() and torch.isnan(gy).any()


def test_float64_runs_the_reference_and_gradchecks():
    x, y, log_t, b = make(4, 5, seed=2)
    leaves = [v.requires_grad_() for v in (x, y, log_t, b)]
    loss = clip_loss(leaves[0], leaves[1], leaves[2].exp(), leaves[3])  # backend="auto" on CPU float64
    assert loss.dtype == F64
    torch.testing.assert_close(loss, paper_loss(x, y, log_t.exp(), b), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, c, s, d: clip_loss(a, c, s.exp(), d), leaves)


# ---------------------------------------------------------------- errors


def _bad_calls():
    x, y, t = torch.randn(4, 8), torch.randn(4, 8), torch.tensor(1.0)
    X = torch.randn(12, 8)
    return image_text_bad_calls(x, y, t) + [
        ((x, y[:3], t), {}, ValueError, "text_features must have N=4 rows"),
        ((x, y, t), {"all_image_features": X}, ValueError, "go together"),
        ((x, y, t), {"all_image_features": X, "all_text_features": X[:6]}, ValueError, "must both be"),
        ((x, y, t), {"all_image_features": X, "all_text_features": X, "label_offset": 9}, ValueError,
         "label_offset"),
        ((x, y, t), {"label_offset": 4}, ValueError, "applies to the local loss"),
    ]


test_errors = bad_input_test(clip_loss, _bad_calls)


# ---------------------------------------------------------------- op registration


def test_opcheck(device):
    # AOT dispatch (fake impls and backward traced) is test_torch_compile_fullgraph's: one run, not four
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    x = torch.randn(5, 16, device=device, requires_grad=True)
    y = torch.randn(5, 16, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.fastssl.clip_loss_fwd.default, (x, y), test_utils=utils)
    lse2 = torch.rand(5, device=device) + 4.0
    grad = torch.rand(5, device=device)
    bwd_args = (x.detach(), y.detach(), lse2, lse2.flip(0), grad, grad.flip(0), False, True)
    torch.library.opcheck(torch.ops.fastssl.clip_loss_bwd.default, bwd_args, test_utils=utils)


def test_torch_compile_fullgraph(device):
    """The compiled step (one graph through both custom ops, their fakes and backward traced by AOT
    autograd; aot_eager spares inductor's C++ build, 30 s on a CPU) computes what the eager one does."""
    leaves = [v.float().requires_grad_() for v in make(6, 16, seed=4, device=device)]

    def step(x, y, log_t, b):
        return clip_loss(x, y, log_t.exp(), b, backend="triton")

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        loss = fn(*leaves)
        results.append((loss.detach(), *torch.autograd.grad(loss, leaves)))
    for eager, compiled in zip(*results):
        torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- GPU (benchmarks/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,N,D", [(torch.bfloat16, 1024, 512), (torch.float32, 1024, 768),
                                       (torch.float16, 256, 1024), (torch.bfloat16, 300, 100)])
def test_kernel_cuda_vs_fp64(dtype, N, D):
    inputs = make(N, D, seed=17, t=100.0, device="cuda")
    truth, low, got = (value_and_grads(fn, inputs, dt) for fn, dt in (  # clip_loss: auto = Triton on CUDA
        (clip_loss_ref, F64), (clip_loss_ref, dtype), (clip_loss, dtype)))
    assert_within_rule(got, low, truth, 1e-5 if dtype == torch.float32 else 1e-2, 100.0)
