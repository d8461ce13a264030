"""fastssl.losses.DINOLoss against an oracle written from facebookresearch/dino's DINOLoss
(teacher-temperature schedule, center buffer and momentum update), in float64; DINOv2's
asynchronous center and Sinkhorn-Knopp teacher; 2-process gloo equality with one process."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_gloo

from fastssl.losses import DINOLoss, dino_update_center_, sinkhorn_knopp_teacher


class OfficialDINOLoss:
    """The official class's behaviour, restated (single process, float64)."""

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp, warmup_epochs, nepochs,
                 student_temp=0.1, center_momentum=0.9, n_global=2):
        self.student_temp, self.center_momentum, self.ncrops, self.n_global = (
            student_temp, center_momentum, ncrops, n_global)
        self.center = torch.zeros(1, out_dim, dtype=torch.float64)
        step = (teacher_temp - warmup_teacher_temp) / max(warmup_epochs - 1, 1)
        self.schedule = [warmup_teacher_temp + step * e for e in range(warmup_epochs)]
        self.schedule += [teacher_temp] * (nepochs - warmup_epochs)

    def __call__(self, student_output, teacher_output, epoch):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        temp = self.schedule[epoch]
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).chunk(self.n_global)
        total, n_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(self.ncrops):
                if v != iq:
                    total = total + (-q * F.log_softmax(student_out[v], dim=-1)).sum(-1).mean()
                    n_terms += 1
        batch_center = teacher_output.sum(0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total / n_terms


def batches(n_steps, ncrops, n_global, B, K, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    # teacher logits with a nonzero mean so the center matters
    return [((2 * torch.randn(ncrops * B, K, generator=g, dtype=torch.float64)).to(dtype),
             (2 * torch.randn(n_global * B, K, generator=g, dtype=torch.float64) + 1.0).to(dtype))
            for _ in range(n_steps)]


def test_teacher_temperature_schedule():
    loss = DINOLoss(8, 4, 0.04, 0.07, 4, 10)
    want = [0.04, 0.05, 0.06, 0.07] + [0.07] * 6
    assert [loss.teacher_temp_at(e) for e in range(10)] == pytest.approx(want)
    assert DINOLoss(8, 4, 0.04, 0.07, 0, 3).teacher_temp_at(0) == pytest.approx(0.07)


@pytest.mark.parametrize("warmup,teacher,n_warmup,nepochs", [
    (0.04, 0.07, 30, 100), (0.04, 0.07, 0, 5), (0.04, 0.07, 1, 3), (0.04, 0.04, 4, 6), (0.07, 0.04, 7, 7),
    (0.01, 0.0703, 13, 20),
])
def test_schedule_is_the_officials_bit_for_bit(warmup, teacher, n_warmup, nepochs):
    # The official schedule: np.concatenate((np.linspace(warmup, teacher, n_warmup),
    # np.ones(nepochs - n_warmup) * teacher)).
    official = np.concatenate((np.linspace(warmup, teacher, n_warmup), np.ones(nepochs - n_warmup) * teacher))
    loss = DINOLoss(8, 4, warmup, teacher, n_warmup, nepochs)
    assert [loss.teacher_temp_at(e) for e in range(nepochs)] == official.tolist()
    assert np.array_equal(loss.teacher_temp_schedule, official)


@pytest.mark.slow  # 12-40 s on a 2-core CPU (by load): a few forward and backward graphs
def test_compiles_with_fullgraph_across_warmup_and_after():
    # More epochs than dynamo's default recompile limit (8): the temperature must not cost a
    # graph per epoch, and there must be no per-step check on a traced value.
    K, B, ncrops, nepochs = 24, 3, 4, 12
    eager = DINOLoss(K, ncrops, 0.04, 0.07, 10, nepochs, backend="torch").double()
    compiled_module = DINOLoss(K, ncrops, 0.04, 0.07, 10, nepochs, backend="torch").double()
    compiled = torch.compile(compiled_module, fullgraph=True)
    official = OfficialDINOLoss(K, ncrops, 0.04, 0.07, 10, nepochs)
    for epoch, (s, t) in enumerate(batches(nepochs, ncrops, 2, B, K, seed=9)):
        s_eager, s_compiled = s.clone().requires_grad_(), s.clone().requires_grad_()
        loss, want = compiled(s_compiled, t, epoch), official(s, t, epoch)
        eager(s_eager, t, epoch).backward()
        loss.backward()
        torch.testing.assert_close(loss, want, rtol=1e-12, atol=0)
        torch.testing.assert_close(s_compiled.grad, s_eager.grad, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(compiled_module.center, official.center, rtol=1e-12, atol=1e-15)


def test_loads_an_official_checkpoints_loss_state(tmp_path):
    # The official main_dino.py saves {"dino_loss": dino_loss.state_dict(), ...}: the center only.
    K, ncrops = 16, 4
    official = OfficialDINOLoss(K, ncrops, 0.04, 0.07, 2, 4)
    for epoch, (s, t) in enumerate(batches(2, ncrops, 2, 3, K, seed=10)):
        official(s, t, epoch)
    torch.save({"epoch": 2, "dino_loss": {"center": official.center.float()}}, tmp_path / "checkpoint.pth")
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    ours = DINOLoss(K, ncrops, 0.04, 0.07, 2, 4, backend="torch")
    ours.load_state_dict(checkpoint["dino_loss"])
    assert torch.equal(ours.center, official.center.float())
    official.center = official.center.float().double()
    for epoch, (s, t) in enumerate(batches(2, ncrops, 2, 3, K, seed=11), start=2):
        torch.testing.assert_close(ours(s.float(), t.float(), epoch), official(s, t, epoch).float(),
                                   rtol=2e-6, atol=1e-6)
        torch.testing.assert_close(ours.center, official.center.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend,K,B", [("torch", 1000, 16), ("torch", 4096 + 3, 3), ("triton", 130, 3)])
# (2, 2): no local crops (the official --local_crops_number 0); (2, 1), (3, 1): one global crop.
@pytest.mark.parametrize("ncrops,n_global", [(6, 2), (3, 1), (2, 2), (2, 1)])
def test_matches_official_over_warmup_epochs_and_center_steps(backend, K, B, ncrops, n_global, device):
    args = (K, ncrops, 0.04, 0.07, 3, 5)
    dev = device if backend == "triton" else "cpu"  # the kernel on CUDA when present, else interpreted
    ours = DINOLoss(*args, student_temp=0.1, center_momentum=0.9, n_global_crops=n_global,
                    backend=backend).to(dev)
    official = OfficialDINOLoss(*args, student_temp=0.1, center_momentum=0.9, n_global=n_global)
    dtype = torch.float32 if backend == "triton" else torch.float64
    if dtype == torch.float64:
        ours = ours.double()
    for epoch, (s, t) in enumerate(batches(5, ncrops, n_global, B, K, dtype=dtype)):
        s_ours = s.to(dev).requires_grad_(True)
        s_off = s.double().requires_grad_(True)
        loss, want = ours(s_ours, t.to(dev), epoch), official(s_off, t.double(), epoch)
        (grad,) = torch.autograd.grad(loss, s_ours)
        loss, grad = loss.detach().cpu(), grad.cpu()
        (want_grad,) = torch.autograd.grad(want, s_off)
        tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(loss.double(), want.detach(), **tol)
        # fp32: gradient entries are probability differences times 1/(tau_s (ncrops - 1) B), rounded
        # with logits/temperature up to ~150
        grad_tol = dict(rtol=1e-9, atol=1e-12) if dtype == torch.float64 else dict(
            rtol=1e-4, atol=3e-5 / (0.1 * (ncrops - 1) * B))
        torch.testing.assert_close(grad.double(), want_grad, **grad_tol)
        torch.testing.assert_close(ours.center.cpu().double(), official.center, **tol)
    assert ours.center.shape == (1, K)
    assert "center" in ours.state_dict()


def test_bf16_logits_fp32_center_and_loss(device):
    ours = DINOLoss(64, 4, 0.04, 0.04, 0, 2, backend="triton").to(device)
    official = OfficialDINOLoss(64, 4, 0.04, 0.04, 0, 2)
    for epoch, (s, t) in enumerate(batches(2, 4, 2, 3, 64, seed=1, dtype=torch.bfloat16)):
        loss = ours(s.to(device), t.to(device), epoch)
        want = official(s.double(), t.double(), epoch)
        assert loss.dtype == torch.float32 and ours.center.dtype == torch.float32
        torch.testing.assert_close(loss.cpu().double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ours.center.cpu().double(), official.center, rtol=1e-5, atol=1e-5)


def test_async_center_gives_the_same_losses_and_lags_by_one_step():
    sync = DINOLoss(50, 4, 0.04, 0.07, 2, 4, backend="torch").double()
    lazy = DINOLoss(50, 4, 0.04, 0.07, 2, 4, backend="torch", async_center=True).double()
    for epoch, (s, t) in enumerate(batches(4, 4, 2, 5, 50, seed=2)):
        before = lazy.center.clone()
        torch.testing.assert_close(lazy(s, t, epoch), sync(s, t, epoch), rtol=0, atol=1e-12)
        if epoch > 0:
            assert not torch.equal(lazy.center, sync.center)  # pending: the buffer lags
        assert not torch.equal(lazy.center, before) or epoch == 0
    lazy.apply_center_update()
    torch.testing.assert_close(lazy.center, sync.center, rtol=0, atol=1e-12)


def test_rejected_input_leaves_center_and_pending_update_unchanged():
    loss = DINOLoss(16, 4, 0.04, 0.07, 2, 4, backend="torch", async_center=True)
    s, t = batches(1, 4, 2, 3, 16, dtype=torch.float32)[0]
    loss(s, t, 0)
    center, pending = loss.center.clone(), loss._pending[0].clone()
    with pytest.raises(ValueError, match="teacher must have shape"):
        loss(s, t[:5], 1)
    with pytest.raises(ValueError, match=r"epoch must be an integer >= 0 and <= 3, got 4"):
        loss(s, t, 4)
    assert torch.equal(loss.center, center) and torch.equal(loss._pending[0], pending)


@pytest.mark.parametrize(
    "kw,error,match",
    [
        (dict(ncrops=1, n_global_crops=1), ValueError, "ncrops must be >= n_global_crops=1 and >= 2"),
        (dict(ncrops=2, n_global_crops=3), ValueError, "ncrops must be >= n_global_crops=3"),
        (dict(warmup_teacher_temp_epochs=9), ValueError, "warmup_teacher_temp_epochs must be an integer"),
        (dict(teacher_centering="mean"), ValueError, "teacher_centering must be one of"),
        (dict(teacher_temp=0.0), ValueError, "teacher_temp"),
        (dict(center_momentum=1.5), ValueError, "center_momentum"),
        (dict(out_dim=8.0), TypeError, "out_dim must be an int"),
    ],
)
def test_constructor_errors(kw, error, match):
    args = dict(out_dim=8, ncrops=4, warmup_teacher_temp=0.04, teacher_temp=0.07,
                warmup_teacher_temp_epochs=2, nepochs=5)
    with pytest.raises(error, match=match):
        DINOLoss(**{**args, **kw})


def official_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """DINOv2's SinkhornKnopp teacher, single process, no overflow guard (float64 keeps it finite)."""
    Q = torch.exp(teacher_output / teacher_temp).t()
    B, K = Q.shape[1], Q.shape[0]
    Q = Q / Q.sum()
    for _ in range(n_iterations):
        Q = Q / Q.sum(dim=1, keepdim=True) / K
        Q = Q / Q.sum(dim=0, keepdim=True) / B
    return (Q * B).t()


def test_sinkhorn_knopp_matches_float64_reference():
    g = torch.Generator().manual_seed(5)
    t = torch.randn(24, 300, generator=g, dtype=torch.float64)
    want = official_sinkhorn_knopp(t, 0.05)
    torch.testing.assert_close(sinkhorn_knopp_teacher(t, 0.05), want, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(sinkhorn_knopp_teacher(t.float(), 0.05).double(), want, rtol=1e-4, atol=1e-9)
    # logits/temperature up to ~350: DINOv2's exp overflows in fp32 (not in fp64); the log domain does not
    big = 4 * t
    assert not torch.isfinite(official_sinkhorn_knopp(big.float(), 0.04)).all()
    torch.testing.assert_close(sinkhorn_knopp_teacher(big.float(), 0.04).double(),
                               official_sinkhorn_knopp(big, 0.04), rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_sinkhorn_knopp_loss(backend, device):
    ncrops, n_global, B, K = 4, 2, 3, 70
    dev = device if backend == "triton" else "cpu"
    ours = DINOLoss(K, ncrops, 0.05, 0.05, 0, 2, teacher_centering="sinkhorn_knopp", backend=backend).to(dev)
    s, t = batches(1, ncrops, n_global, B, K, seed=6)[0]
    s64 = s.clone().requires_grad_(True)
    probs = official_sinkhorn_knopp(t, 0.05).chunk(n_global)
    log_q = F.log_softmax(s64 / 0.1, dim=-1).chunk(ncrops)
    terms = [-(probs[i] * log_q[v]).sum(-1).mean() for i in range(n_global) for v in range(ncrops) if v != i]
    want = sum(terms) / len(terms)
    s32 = s.float().to(dev).requires_grad_(True)
    loss = ours(s32, t.float().to(dev), 0)
    (grad,) = torch.autograd.grad(loss, s32)
    loss, grad = loss.detach().cpu(), grad.cpu()
    (want_grad,) = torch.autograd.grad(want, s64)
    torch.testing.assert_close(loss.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)
    assert torch.equal(ours.center.cpu(), torch.zeros(1, K))  # DINOv2 leaves the center alone with SK


MODES = [("center", False), ("center", True), ("sinkhorn_knopp", False)]


def _dist_worker(rank, world, student_chunks, teacher_chunks):
    """Each rank holds its own samples of every crop (crop-major within the rank)."""
    results = []
    for mode, async_center in MODES:
        loss_fn = DINOLoss(40, 3, 0.04, 0.07, 2, 3, teacher_centering=mode, backend="torch",
                           async_center=async_center).double()
        losses = []
        for epoch in range(3):
            s = torch.cat([c[epoch][rank] for c in student_chunks])
            t = torch.cat([c[epoch][rank] for c in teacher_chunks])
            losses.append(loss_fn(s, t, epoch))
        loss_fn.apply_center_update()
        results.append((torch.stack(losses), loss_fn.center.clone()))
    sk = sinkhorn_knopp_teacher(torch.cat([c[0][rank] for c in teacher_chunks]), 0.05)
    return results, sk


def test_two_process_gloo_equals_one_process():
    ncrops, n_global, B, K, world = 3, 2, 4, 40, 2
    steps = batches(3, ncrops, n_global, B * world, K, seed=7)
    # per crop, per step, per rank: [B, K] slices of the global batch
    student_chunks = [[s.chunk(ncrops)[v].chunk(world) for s, _ in steps] for v in range(ncrops)]
    teacher_chunks = [[t.chunk(n_global)[i].chunk(world) for _, t in steps] for i in range(n_global)]
    out = run_gloo(_dist_worker, world, student_chunks, teacher_chunks)
    for m, (mode, _) in enumerate(MODES):
        single = DINOLoss(K, ncrops, 0.04, 0.07, 2, 3, teacher_centering=mode, backend="torch").double()
        single_losses = torch.stack([single(s, t, e) for e, (s, t) in enumerate(steps)])
        # every rank ends with the one-process center (the batch mean over both ranks)
        for rank in range(world):
            torch.testing.assert_close(out[rank][0][m][1], single.center, rtol=1e-12, atol=1e-14)
        # each rank's loss is its half-batch mean; their average is the global-batch loss
        mean_loss = (out[0][0][m][0] + out[1][0][m][0]) / 2
        torch.testing.assert_close(mean_loss, single_losses, rtol=1e-12, atol=1e-12)
    # distributed Sinkhorn-Knopp: each rank's rows equal the one-process result on the whole batch
    t0 = steps[0][1]
    want = sinkhorn_knopp_teacher(t0, 0.05).view(n_global, world, B, K)
    for rank in range(world):
        torch.testing.assert_close(out[rank][1].view(n_global, B, K), want[:, rank], rtol=1e-10, atol=1e-14)


def test_state_dict_round_trip():
    a = DINOLoss(12, 3, 0.04, 0.07, 1, 2, backend="torch")
    s, t = batches(1, 3, 2, 2, 12, dtype=torch.float32)[0]
    a(s, t, 0)
    b = DINOLoss(12, 3, 0.04, 0.07, 1, 2, backend="torch")
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.center, b.center) and not torch.equal(b.center, torch.zeros(1, 12))
    assert np.allclose(a.teacher_temp_schedule, b.teacher_temp_schedule)


def test_dino_update_center_formula():
    g = torch.Generator().manual_seed(4)
    center = torch.randn(1, 33, generator=g)
    teacher = torch.randn(10, 33, generator=g)
    want = 0.9 * center + 0.1 * teacher.mean(dim=0, keepdim=True)
    out = dino_update_center_(center, teacher, momentum=0.9)
    assert out is center
    torch.testing.assert_close(center, want)
    flat = torch.zeros(33)
    dino_update_center_(flat, None, momentum=0.5, teacher_sum=teacher.sum(0), n_rows=10)
    torch.testing.assert_close(flat, 0.5 * teacher.mean(0))


def test_teacher_temp_given_equals_the_epoch_schedule():
    """A caller owning the schedule passes the temperature: the same loss and center as the official
    epoch-indexed call; exactly one of epoch and teacher_temp."""
    a, b = (DINOLoss(16, 4, 0.04, 0.07, 3, 5, backend="torch") for _ in range(2))
    for epoch, (s, t) in enumerate(batches(4, 4, 2, 3, 16)):
        want = a(s, t, epoch)
        got = b(s, t, teacher_temp=float(b.teacher_temp_schedule[epoch]))
        assert torch.equal(got, want) and torch.equal(a.center, b.center)
    s, t = batches(1, 4, 2, 3, 16)[0]
    for kw in (dict(), dict(epoch=0, teacher_temp=0.04)):
        with pytest.raises(ValueError, match="exactly one"):
            a(s, t, **kw)
    with pytest.raises(ValueError, match="teacher_temp"):
        a(s, t, teacher_temp=0.0)
