"""fastssl.ops.info_nce against the official MoCo v2 / v3 formulas in float64.

The Triton kernels run on the CPU under TRITON_INTERPRET=1 (conftest), so shapes stay
small; on a GPU machine the same tests run on the card (the `device` fixture). bf16 kernel
runs are GPU-only: the interpreter's tl.dot multiplies bf16 tiles as
their raw uint16 storage (triton 3.8), so CPU runs cover fp32 and fp16 (the same 16-bit
code path) and the gpu-marked test covers bf16.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from bad_inputs import bad_input_test

from fastssl.ops.info_nce import info_nce, info_nce_ref

F64, F32 = torch.float64, torch.float32


# ---------------------------------------------------------------- oracles (official formulas)


def moco_v2_loss(q, k, queue, T, normalize=True):
    """MoCo v2 (facebookresearch/moco, builder.py): l_pos = einsum('nc,nc->n'), l_neg =
    einsum('nc,ck->nk') with the queue, logits = cat([l_pos, l_neg]) / T, labels = 0."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)
    l_neg = torch.einsum("nc,ck->nk", q, queue.T.detach())
    logits = torch.cat([l_pos, l_neg], dim=1) / T
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels, reduction="none")


def moco_v3_loss(q, k, T, offset=0, normalize=True):
    """MoCo v3 (facebookresearch/moco-v3, builder.py contrastive_loss): logits = einsum('nc,mc->nm')
    / T against the keys of all ranks, labels = arange(N) + N·rank."""
    if normalize:
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / T
    labels = torch.arange(q.shape[0], device=q.device) + offset
    return F.cross_entropy(logits, labels, reduction="none")


def oracle(q, k, queue, T, offset=0, normalize=True):
    if queue is None:
        return moco_v3_loss(q, k, T, offset, normalize)
    return moco_v2_loss(q, k, queue, T, normalize)


def make_inputs(N, M, K, D, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(N, D, generator=g, dtype=F64)
    k = q[torch.arange(M) % N] + 0.7 * torch.randn(M, D, generator=g, dtype=F64)  # correlated positives
    queue = None if K is None else F.normalize(torch.randn(K, D, generator=g, dtype=F64), dim=1)
    w = torch.rand(N, generator=g, dtype=F64) + 0.5  # per-row loss weights: non-uniform upstream grads
    to = lambda t: None if t is None else t.to(device)
    return to(q), to(k), to(queue), to(w)


def losses_and_grads(fn, q, k, queue, w, dtype, **kw):
    """Per-row losses of fn and gradients of Σ w_i loss_i w.r.t. query and key, inputs cast to dtype."""
    q = q.detach().to(dtype).requires_grad_()
    k = k.detach().to(dtype).requires_grad_()
    queue = None if queue is None else queue.to(dtype)
    loss = fn(q, k, queue, **kw)
    gq, gk = torch.autograd.grad((loss.double() * w).sum(), [q, k])
    return loss.double(), gq.double(), gk.double()


def logit_scale(q, k, queue, T, normalize):
    """Largest possible |logit|: the loss's rounding error scales with it, not with the loss."""
    if normalize:
        return 1.0 / T
    x = k if queue is None else torch.cat([k, queue])
    return (q.norm(dim=1).max() * x.norm(dim=1).max()).item() / T


def assert_within_rule(name, got, low_ref, truth, rel_atol, scale=None):
    """DESIGN.md's rule: error vs the fp64 truth <= 2x the PyTorch reference's error in the
    same precision + a small atol (relative to `scale`, by default the truth's largest entry)."""
    err = (got - truth).abs().max().item()
    ref_err = (low_ref - truth).abs().max().item()
    atol = rel_atol * (truth.abs().max().item() if scale is None else scale)
    assert err <= 2 * ref_err + atol, f"{name}: error {err:.3g} > 2 x ref error {ref_err:.3g} + {atol:.3g}"


def grad_scale(q, k, queue, T, normalize, w):
    """Natural size of a row's gradient: w_i·‖x̂‖/(T‖q‖) normalized, w_i·‖x‖/T otherwise."""
    if normalize:
        return w.max().item() / (T * torch.cat([q, k]).norm(dim=1).min().item())
    x = k if queue is None else torch.cat([k, queue])
    return w.max().item() * torch.cat([q, x]).norm(dim=1).max().item() / T


def check_all(got, low, truth, dtype, q, k, queue, T, normalize, w):
    scales = (logit_scale(q, k, queue, T, normalize), grad_scale(q, k, queue, T, normalize, w))
    for name, g, lo, t, sc in zip(("loss", "dquery", "dkey"), got, low, truth, scales[:1] + scales[1:] * 2):
        assert torch.isfinite(g).all(), name
        assert_within_rule(name, g, lo, t, REL_ATOL[dtype], sc)


REL_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


# ---------------------------------------------------------------- the reference itself


@pytest.mark.parametrize("K", [None, 7])
@pytest.mark.parametrize("normalize", [True, False])
def test_ref_matches_official_formulas(K, normalize):
    q, k, queue, w = make_inputs(5, 9 if K is None else 5, K, 12, seed=1)
    offset = 3 if K is None else 0
    truth = oracle(q, k, queue, 0.1, offset, normalize)
    got = info_nce_ref(q, k, queue, temperature=0.1, normalize=normalize, label_offset=offset,
                       reduction="none")
    torch.testing.assert_close(got, truth, rtol=1e-12, atol=1e-12)


def test_ref_matches_hand_computed_value(device):
    # q·k = 1 for the positive, q·queue = [0, -1]: loss = -log(e^(1/T) / (e^(1/T) + e^0 + e^(-1/T))).
    q = torch.tensor([[1.0, 0.0]], dtype=F64)
    k = torch.tensor([[1.0, 0.0]], dtype=F64)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]], dtype=F64)
    T = 0.5
    want = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0 + math.exp(-2.0)))
    for backend in ("torch", "triton"):
        got = info_nce(q.float().to(device), k.float().to(device), queue.float().to(device), temperature=T,
                       backend=backend)
        assert abs(got.item() - want) < 1e-6, backend


# ---------------------------------------------------------------- the kernels vs fp64


CASES = [
    # (N, M, K, D, T, offset, normalize)  K=None: in-batch form
    (1, 1, 1, 16, 0.2, 0, True),
    (3, 3, 5, 100, 0.07, 0, True),
    (17, 17, 1000, 128, 0.2, 0, True),  # 1000 queue rows: several splits and tiles
    (130, 130, 5, 16, 0.01, 0, True),
    (4, 4, 33, 24, 0.5, 0, False),
    (1, 1, None, 16, 0.2, 0, True),
    (3, 8, None, 100, 0.1, 5, True),  # M != N, label_offset
    (17, 17, None, 128, 0.2, 0, True),
    (130, 130, None, 16, 0.01, 0, True),  # 2 key splits x 3 query tiles
    (5, 300, None, 20, 0.3, 200, False),
    (9, 9, 40, 300, 0.1, 0, True),  # D above one register tile: D chunks (fp32: 3 accumulator programs)
    (9, 9, None, 300, 0.1, 0, True),
]


# KEEP_P in bands: the workspace capped at one forward split (5 queries x 128 fp32 columns, + their
# rescales): the forward runs its 2 column splits one band each, the in-batch key gradient its 130
# keys in bands of 128 and 2, the targets (keys 125-129) across both.
BANDED = [(5, 130, None, 140, 0.1, 125, True), (5, 5, 130, 140, 0.2, 0, False)]
BANDED_CAP = 5 * (128 * 4 + 2 * 4)


@pytest.mark.parametrize("case", CASES + BANDED, ids=lambda c: "N{}-M{}-K{}-D{}-T{}-off{}-norm{}".format(*c)
                         + ("-banded" if c in BANDED else ""))
def test_kernel_fp32_vs_fp64(case, device, kept_bands):
    N, M, K, D, T, offset, normalize = case
    bands = kept_bands(BANDED_CAP) if case in BANDED else None
    q, k, queue, w = make_inputs(N, M, K, D, seed=N * 31 + M, device=device)
    kw = dict(temperature=T, normalize=normalize, label_offset=offset, reduction="none")
    truth = losses_and_grads(lambda *a: oracle(*a, T, offset, normalize), q, k, queue, w, F64)
    low = losses_and_grads(lambda *a: info_nce_ref(*a, **kw), q, k, queue, w, torch.float32)
    got = losses_and_grads(lambda *a: info_nce(*a, **kw, backend="triton"), q, k, queue, w, torch.float32)
    check_all(got, low, truth, torch.float32, q, k, queue, T, normalize, w)
    if bands is not None:
        key_bands = 2 if K is None else 0  # the queue form has no key gradient
        assert (bands["_info_nce_fwd_kernel"], bands["_info_nce_bwd_kernel"]) == (2, key_bands), bands


@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[6], CASES[8], CASES[11]],
                         ids=["queue1000", "queueT001", "offset", "inbatchT001", "inbatchD300"])
def test_kernel_fp16_vs_fp64(case, device):
    N, M, K, D, T, offset, normalize = case
    q, k, queue, w = make_inputs(N, M, K, D, seed=7, device=device)
    kw = dict(temperature=T, normalize=normalize, label_offset=offset, reduction="none")
    truth = losses_and_grads(lambda *a: oracle(*a, T, offset, normalize), q, k, queue, w, F64)
    low = losses_and_grads(lambda *a: info_nce_ref(*a, **kw), q, k, queue, w, torch.float16)
    got = losses_and_grads(lambda *a: info_nce(*a, **kw, backend="triton"), q, k, queue, w, torch.float16)
    check_all(got, low, truth, torch.float16, q, k, queue, T, normalize, w)


def test_kernel_large_unnormalized_logits_do_not_overflow(device):
    # normalize=False with long vectors at T=0.01: logits in the thousands, exp would overflow fp32.
    q, _, queue, w = make_inputs(6, 6, 40, 32, seed=3, device=device)
    k = torch.randn(6, 32, generator=torch.Generator().manual_seed(4), dtype=F64).to(device)  # unrelated keys
    q, k, queue = 3 * q, 3 * k, 10 * queue
    kw = dict(temperature=0.01, normalize=False, reduction="none")
    for K_queue in (queue, None):
        truth = losses_and_grads(lambda *a: oracle(*a, 0.01, 0, False), q, k, K_queue, w, F64)
        assert truth[0].abs().max() > 1000
        low = losses_and_grads(lambda *a: info_nce_ref(*a, **kw), q, k, K_queue, w, torch.float32)
        got = losses_and_grads(lambda *a: info_nce(*a, **kw, backend="triton"), q, k, K_queue, w, F32)
        check_all(got, low, truth, torch.float32, q, k, K_queue, 0.01, False, w)


@pytest.mark.parametrize("K", [None, 9])
def test_identical_inputs(K, device):
    # Every logit equal: loss = log(#columns) exactly, and the gradients vanish (the softmax
    # is uniform and the normalization backward removes the component along q̂ = k̂).
    N, D = 5, 16
    v = torch.randn(1, D, device=device)
    q, k = v.repeat(N, 1).requires_grad_(), v.repeat(N, 1).requires_grad_()
    queue = None if K is None else F.normalize(v, dim=1).repeat(K, 1)
    loss = info_nce(q, k, queue, temperature=0.01, reduction="none", backend="triton")
    columns = N if K is None else K + 1
    torch.testing.assert_close(loss, torch.full((N,), math.log(columns), device=device), rtol=0, atol=2e-4)
    gq, gk = torch.autograd.grad(loss.sum(), [q, k])
    assert gq.abs().max() < 1e-3 and gk.abs().max() < 1e-3


@pytest.mark.parametrize("K", [None, 6])
def test_reductions(K, device):
    q, k, queue, _ = make_inputs(7, 7, K, 16, seed=5, device=device)
    truth = oracle(q, k, queue, 0.2)
    for reduction, want in (("none", truth), ("mean", truth.mean()), ("sum", truth.sum())):
        got = info_nce(q.float(), k.float(), None if queue is None else queue.float(), reduction=reduction,
                       backend="triton")
        assert got.dtype == torch.float32 and got.shape == want.shape
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    half = info_nce(q.half(), k.half(), None if queue is None else queue.half(), backend="triton")
    assert half.dtype == torch.float16


def test_label_offset_selects_the_target_column(device):
    # Keys gathered from 3 ranks; this rank's queries target keys [4, 8): only those columns change the loss.
    q, k, _, _ = make_inputs(4, 12, None, 16, seed=9, device=device)
    for offset in (0, 4, 8):
        got = info_nce(q.float(), k.float(), label_offset=offset, reduction="none", backend="triton")
        logits = F.normalize(q, dim=1) @ F.normalize(k, dim=1).T / 0.2
        rows = torch.arange(4, device=device)
        want = torch.logsumexp(logits, 1) - logits[rows, rows + offset]
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_gradient_flags_and_queue_gets_none(device):
    q, k, queue, _ = make_inputs(5, 5, 11, 16, seed=11, device=device)
    q, k, queue = q.float().requires_grad_(), k.float(), queue.float().requires_grad_()
    loss = info_nce(q, k, queue, backend="triton")  # MoCo v2: keys come from the momentum encoder, no grad
    loss.backward()
    assert queue.grad is None and k.grad is None
    q64 = q.detach().double().requires_grad_()
    moco_v2_loss(q64, k.double(), queue.detach().double(), 0.2).mean().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=1e-4, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(info_nce(q, k, queue, backend="triton"), loss.detach())


def test_non_contiguous_and_zero_norm_rows(device):
    # Strided views, and an all-zero query row (F.normalize's eps clamp: its gradient is dq̂ / eps).
    base_q = torch.randn(6, 40, dtype=F64)
    base_q[2] = 0.0
    q = base_q.to(device)[:, ::2]  # [6, 20], column stride 2
    k = torch.randn(32, 6, dtype=F64, device=device).T[:, :20]  # [6, 20], transposed
    w = torch.rand(6, dtype=F64, device=device)
    truth = losses_and_grads(lambda *a: moco_v3_loss(a[0], a[1], 0.2), q, k, None, w, F64)
    got = losses_and_grads(lambda *a: info_nce(*a, reduction="none", backend="triton"), q, k, None, w,
                           torch.float32)
    assert truth[1][2].abs().max() > 1e9  # the zero row's gradient is scaled by 1/eps
    for name, g, t in zip(("loss", "dquery", "dkey"), got, truth):
        rel = (g - t).reshape(6, -1).norm(dim=1) / t.reshape(6, -1).norm(dim=1)
        assert rel.max() < 1e-4, (name, rel)


@pytest.mark.parametrize("K", [None, 4])
def test_nan_in_gives_nan_out(K, device):
    q, k, queue, _ = make_inputs(5, 5, K, 16, seed=13, device=device)
    q, k = q.float(), k.float()
    queue = None if queue is None else queue.float()
    q[1, 3] = float("nan")
    q.requires_grad_()
    loss = info_nce(q, k, queue, reduction="none", backend="triton")
    assert torch.isnan(loss[1]) and torch.isfinite(loss[[0, 2, 3, 4]]).all()
    loss.mean().backward()
    assert torch.isnan(q.grad[1]).all()
    k[0, 0] = float("nan")  # key 0 is a column of every row (in-batch) / row 0's positive (queue)
    loss = info_nce(q.detach(), k, queue, reduction="none", backend="triton")
    assert torch.isnan(loss).all() if K is None else torch.isnan(loss[0])


# ---------------------------------------------------------------- errors


def _bad_calls():
    q, k, queue = torch.randn(4, 8), torch.randn(4, 8), torch.randn(6, 8)
    return [
        ((q[0], k), {}, ValueError, "query must be 2-D"),
        ((q, k[:, None]), {}, ValueError, "key must be 2-D"),
        ((q, k, queue[0]), {}, ValueError, "queue must be 2-D"),
        ((q, k[:, :5]), {}, ValueError, "key must have D=8"),
        ((q, k, queue[:, :3]), {}, ValueError, "queue must have D=8"),
        ((q, torch.randn(6, 8), queue), {}, ValueError, "M == N"),
        ((q, torch.randn(6, 8)), {"label_offset": 3}, ValueError, "label_offset"),
        ((q, k), {"label_offset": -1}, ValueError, "label_offset"),
        ((q, k, queue), {"label_offset": 1}, ValueError, "label_offset"),
        ((q, k), {"label_offset": 1.0}, TypeError, "label_offset must be an int"),
        ((q, k.long()), {}, TypeError, "key must have dtype"),
        ((q, k.half()), {}, TypeError, "must share one dtype"),
        ((q, k, queue.long()), {}, TypeError, "queue must have dtype"),
        ((q.double(), k.double()), {"backend": "triton"}, TypeError, "float64"),
        ((q.long(), k), {}, TypeError, "query must have dtype"),
        ((q, k.to("meta")), {}, ValueError, "key must be on cpu"),
        ((q[:0], k[:0]), {}, ValueError, "query must not be empty"),
        ((q, k), {"temperature": 0.0}, ValueError, "temperature"),
        ((q, k), {"temperature": -0.1}, ValueError, "temperature"),
        ((q, k), {"temperature": float("nan")}, ValueError, "temperature"),
        ((q, k), {"reduction": "max"}, ValueError, "reduction"),
        ((q, k), {"normalize": 1}, TypeError, "normalize"),
        ((q, k), {"backend": "cuda"}, ValueError, "backend"),
        (([[1.0]], k), {}, TypeError, "query must be a torch.Tensor"),
    ]


test_errors = bad_input_test(info_nce, _bad_calls)


# ---------------------------------------------------------------- op registration


def test_opcheck(device):
    q = torch.randn(5, 16, device=device, requires_grad=True)
    k = torch.randn(5, 16, device=device, requires_grad=True)
    queue = torch.randn(7, 16, device=device)
    # (query, key, queue, T, normalize, label_offset, compute_dq, compute_dk, exclude_self)
    for args in [(q, k, queue, 0.2, True, 0, True, True, False),
                 (q, k, None, 0.3, False, 0, True, True, False),
                 (q[:3], k, None, 0.2, True, 2, True, False, False),
                 (q[:4], k, None, 0.2, True, 1, True, True, True)]:
        torch.library.opcheck(torch.ops.fastssl.info_nce_fwd.default, args)
    lse2 = torch.rand(5, device=device) + 2.0
    for exclude_self in (False, True):
        n = 4 if exclude_self else 5
        grad = torch.rand(n, device=device)
        bwd_args = (q.detach()[:n], k.detach(), lse2[:n], grad, 0.2, True, 0, exclude_self)
        torch.library.opcheck(torch.ops.fastssl.info_nce_bwd.default, bwd_args)


def test_torch_compile_fullgraph(device):
    torch.manual_seed(0)
    proj = torch.nn.Linear(16, 16).to(device)
    x, y = torch.randn(6, 16, device=device), torch.randn(6, 16, device=device)

    def step(x, y):
        return info_nce(proj(x), proj(y), temperature=0.1, backend="triton")

    loss = torch.compile(step, fullgraph=True)(x, y)
    loss.backward()
    grad_compiled = proj.weight.grad.clone()
    proj.zero_grad()
    want = info_nce_ref(proj(x), proj(y), temperature=0.1)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_compiled, proj.weight.grad, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- GPU (benchmarks/gpu_check.sh)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,shape", [
    # N·K above the autotuning threshold: the tuned configurations (MoCo v2, in-batch D=256).
    (torch.bfloat16, (1000, 1000, 8193, 128)), (torch.float32, (1000, 1000, 8193, 128)),
    (torch.bfloat16, (2048, 2560, None, 256)), (torch.float32, (2048, 2560, None, 256)),
    (torch.float16, (777, 2050, None, 100)), (torch.bfloat16, (33, 33, 70, 64)),
], ids=["v2-bf16", "v2-fp32", "inbatch-bf16", "inbatch-fp32", "inbatch-fp16", "small-bf16"])
def test_kernel_cuda_vs_fp64(dtype, shape):
    N, M, K, D = shape
    offset = M - N if K is None else 0
    q, k, queue, w = make_inputs(N, M, K, D, seed=17, device="cuda")
    kw = dict(temperature=0.07, label_offset=offset, reduction="none")
    truth = losses_and_grads(lambda *a: oracle(*a, 0.07, offset), q, k, queue, w, F64)
    low = losses_and_grads(lambda *a: info_nce_ref(*a, **kw), q, k, queue, w, dtype)
    got = losses_and_grads(lambda *a: info_nce(*a, **kw), q, k, queue, w, dtype)  # auto = Triton on CUDA
    check_all(got, low, truth, dtype, q, k, queue, 0.07, True, w)


# ---------------------------------------------------------------- strides, dtypes, interpreter limits


class _FullCopies(torch.utils._python_dispatch.TorchDispatchMode):
    """Records copy-like aten ops whose output has at least `numel` elements."""

    COPIES = {"clone", "copy_", "_to_copy", "contiguous", "copy"}

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name in self.COPIES and isinstance(out, torch.Tensor) and out.numel() >= self.numel:
            self.seen.append(name)
        return out


@pytest.mark.parametrize("form", ["queue", "in-batch"])
def test_views_reach_the_kernels_without_a_copy(form, device):
    """Sliced and transposed query/key/queue (e.g. the official MoCo queue [dim, K] transposed)
    are read in place, forward and backward, and give the contiguous inputs' result."""
    N, D, K = 6, 24, 40
    g = torch.Generator().manual_seed(5)
    q = torch.randn(N, D + 8, generator=g)[:, 4:4 + D].to(device).requires_grad_()  # sliced rows
    k = torch.randn(D, N, generator=g).to(device).T.requires_grad_(form == "in-batch")  # transposed
    queue = torch.randn(D, K, generator=g).to(device).T if form == "queue" else None  # [dim, K] buffer
    inputs = [q, k] if form == "in-batch" else [q]
    with _FullCopies(min(N * D, K * D)) as copies:  # (autograd.grad: no leaf accumulation copies)
        loss = info_nce(q, k, queue, reduction="none", backend="triton")
        grads = torch.autograd.grad(loss.sum(), inputs)  # a stride-0 expanded gradient reaches the backward
    assert copies.seen == []
    dense = [x.detach().contiguous().requires_grad_() for x in inputs]
    want = info_nce(dense[0], dense[-1] if form == "in-batch" else k.contiguous(),
                    None if queue is None else queue.contiguous(), reduction="none", backend="triton")
    torch.testing.assert_close(loss, want)
    for got, exp in zip(grads, torch.autograd.grad(want.sum(), dense)):
        torch.testing.assert_close(got, exp)


@pytest.mark.parametrize("q_dtype,queue_dtype", [(torch.float16, torch.float32),
                                                 (torch.float32, torch.float16)])
def test_queue_of_another_dtype(q_dtype, queue_dtype, device):
    """The kernel converts the queue's rows to the query's dtype on load: the result is the
    float64 formula on the queue rounded to that dtype, within the dtype's tolerance."""
    q, k, queue, _ = make_inputs(9, 9, 70, 32, seed=3, device=device)
    q, k, queue = q.to(q_dtype).requires_grad_(), k.to(q_dtype), queue.to(queue_dtype)
    got = info_nce(q, k, queue, reduction="none", backend="triton")
    got.sum().backward()
    q64 = q.detach().double().requires_grad_()
    truth = moco_v2_loss(q64, k.double(), queue.to(q_dtype).double(), 0.2)
    truth.sum().backward()
    tol = 2e-2 if torch.float16 in (q_dtype, queue_dtype) else 1e-5
    torch.testing.assert_close(got.double(), truth.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(q.grad.double(), q64.grad, rtol=tol, atol=tol)
    ref = info_nce(q.detach(), k, queue, reduction="none", backend="torch")  # promotes to the wider dtype
    torch.testing.assert_close(ref.double(), truth.detach(), rtol=tol, atol=tol)


def test_readme_moco_v2_example_under_cpu_autocast():
    """README: q, k from a model under bf16 autocast, an fp32 KeyQueue, info_nce(q, k, queue.keys)."""
    from fastssl.queue import KeyQueue

    torch.manual_seed(0)
    encoder, images, views = torch.nn.Linear(32, 16), torch.randn(8, 32), torch.randn(8, 32)
    queue = KeyQueue(64, 16, normalize=True)
    negatives = queue.keys.double()
    with torch.autocast("cpu", torch.bfloat16):
        q, k = encoder(images), encoder(views)
        loss = info_nce(q, k, queue.keys, temperature=0.2)
    loss.backward()
    queue.push(k.detach())
    assert q.dtype == torch.bfloat16 and queue.keys.dtype == torch.float32
    truth = moco_v2_loss(q.detach().double(), k.detach().double(), negatives, 0.2).mean()
    assert abs(loss.item() - truth.item()) < 0.05 * truth.item()  # bf16 logits
    assert encoder.weight.grad is not None and torch.isfinite(encoder.weight.grad).all()
    pushed = F.normalize(k.detach().double(), dim=1)
    torch.testing.assert_close(queue.keys[:8].double(), pushed, rtol=0, atol=1e-6)


def test_float64_runs_the_reference_and_gradchecks():
    q, k, queue, _ = make_inputs(4, 4, 6, 8, seed=2)
    q, k = q.requires_grad_(), k.requires_grad_()
    for que in (None, queue):
        loss = info_nce(q, k, que, temperature=0.3)  # backend="auto": the reference in float64
        assert loss.dtype == F64
        torch.testing.assert_close(loss, oracle(q, k, que, 0.3).mean(), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda a, b, que=que: info_nce(a, b, que, temperature=0.3), (q, k))
    from fastssl.losses import InfoNCELoss

    torch.testing.assert_close(InfoNCELoss(temperature=0.3)(q, k), oracle(q, k, None, 0.3).mean())


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without a GPU here")
def test_interpreter_refuses_bf16_dots_it_gets_wrong():
    from fastssl.ops.backend import interpreter_dot_is_exact

    if interpreter_dot_is_exact(torch.bfloat16):
        pytest.skip("this Triton's interpreter multiplies bf16 tiles correctly")
    q = torch.randn(4, 16, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        info_nce(q, q, backend="triton")
