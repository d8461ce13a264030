"""Instance discrimination (Wu et al. 2018) against the paper's formulas, written out here."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from dist_utils import run_gloo
from method_helpers import context, one_thread  # noqa: F401 (autouse fixture)

from fastssl.data import ArraySource
from fastssl.data.recipes import IMAGENET_MEAN, IMAGENET_STD
from fastssl.engine import resolve_config
from fastssl.losses.instdisc import nce_loss, nce_partition
from fastssl.methods import METHODS

N, B = 40, 8
TINY = dict(backbone="resnet8", image_size=8, feature_dim=16, nce_negatives=32, temperature=0.5)


def build(seed=0, source=None, **overrides):
    cls = METHODS["instdisc"]
    torch.manual_seed(seed)
    method = cls(resolve_config(cls.config_class, overrides={**TINY, **overrides}))
    method.bind_data(ArraySource(torch.zeros(N, 8, 8, 3, dtype=torch.uint8) if source is None else source))
    return method


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"views": [torch.randn(B, 3, 8, 8, generator=g)], "label": torch.zeros(B, dtype=torch.long),
            "index": torch.randperm(N, generator=g)[:B]}


def features(method, b):
    """f = normalize(head(backbone(x))), computed apart from forward()."""
    with torch.no_grad():
        return F.normalize(method.head(method.backbone(b["views"][0])), dim=1)


def test_nce_loss_and_partition_are_the_papers():
    g = torch.Generator().manual_seed(0)
    scores, tau, n = torch.rand(4, 1 + 6, generator=g) * 2 - 1, 0.07, 1000
    z = nce_partition(scores, tau, n)
    torch.testing.assert_close(z, n * torch.exp(scores / tau).mean())  # eq. 8: Z ≈ N E_j[exp(v_j f / tau)]
    p = torch.exp(scores / tau) / z
    m, pn = 6, 1 / n
    h = p / (p + m * pn)                                                    # eq. 5
    want = -(torch.log(h[:, 0]).sum() + torch.log(1 - h[:, 1:]).sum()) / 4  # eq. 6, m negatives summed
    # within the official 1e-7 added inside the logs
    torch.testing.assert_close(nce_loss(scores, tau, z, n), want, rtol=1e-4, atol=0)


@pytest.mark.parametrize("momentum", [1.0, 0.9])
def test_nce_form_estimates_z_on_the_first_batch_then_holds_or_averages_it(monkeypatch, momentum):
    """momentum 1: the paper's Z, fixed after the first batch (eq. 8); below 1, the moving average
    Z <- mu Z + (1 - mu) N E_j[exp(v_j f / tau)] of each batch's estimate."""
    method = build(partition_momentum=momentum)
    drawn = []
    sample = method.bank.sample
    monkeypatch.setattr(method.bank, "sample", lambda *a, **k: drawn.append(sample(*a, **k)) or drawn[-1])
    memory = method.bank.memory.clone()
    assert float(method.partition) == 0
    estimates, losses = [], []
    for step in range(2):
        b = batch(step)
        losses.append(method(b, context(step=step))["loss"])
        rows = torch.cat([memory[b["index"]].unsqueeze(1), drawn[step][1]], 1)  # positive, m sampled rows
        assert drawn[step][1].shape == (B, 32, 16)
        scores = torch.einsum("bkd,bd->bk", rows, features(method, b))
        estimates.append((scores, N * torch.exp(scores / 0.5).mean()))
    (s0, z0), (s1, z1) = estimates
    torch.testing.assert_close(losses[0], nce_loss(s0, 0.5, z0, N), rtol=1e-5, atol=1e-5)
    want = z0 if momentum == 1 else momentum * z0 + (1 - momentum) * z1
    torch.testing.assert_close(method.partition, want, rtol=1e-5, atol=0)
    torch.testing.assert_close(losses[1], nce_loss(s1, 0.5, want, N), rtol=1e-5, atol=1e-5)


def test_softmax_form_uses_the_whole_bank_and_the_proximal_term():
    method = build(loss="softmax", proximal=30.0)
    b = batch(0)
    memory = method.bank.memory.clone()
    out = method(b, context())
    f, own = features(method, b), memory[b["index"]]
    logits = torch.cat([(f * own).sum(1, keepdim=True), f @ memory.T], 1) / 0.5
    ce = F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))
    prox = (f - own).pow(2).sum(1).mean()
    torch.testing.assert_close(out["proximal"], prox, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], ce + 30 * prox, rtol=1e-5, atol=1e-5)


def test_bank_rows_move_with_momentum_after_the_step():
    method = build()
    b = batch(0)
    memory = method.bank.memory.clone()
    method(b, context())
    f = features(method, b)
    method.after_optimizer_step(context())
    i = b["index"]
    torch.testing.assert_close(method.bank.memory[i], F.normalize(0.5 * memory[i] + 0.5 * f, dim=1))
    rest = torch.ones(N, dtype=torch.bool)
    rest[i] = False
    assert torch.equal(method.bank.memory[rest], memory[rest])


def test_training_lowers_the_loss_and_resume_is_exact():
    method = build(partition_momentum=0.9)  # Z moves every step: the state must carry it
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    batches = [batch(s) for s in range(4)]

    def step(m, o, s):
        o.zero_grad(set_to_none=True)
        loss = m(batches[s % 4], context(step=s))["loss"]
        loss.backward()
        o.step()
        m.after_optimizer_step(context(step=s))
        return loss.detach()

    losses = [step(method, opt, s) for s in range(24)]
    assert sum(losses[-4:]) < sum(losses[4:8])
    state, opt_state = copy.deepcopy(method.state_dict()), copy.deepcopy(opt.state_dict())
    assert {"bank.memory", "partition"} <= state.keys()
    resumed = build(seed=1, partition_momentum=0.9)
    resumed.load_state_dict(state)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=3e-3)
    resumed_opt.load_state_dict(opt_state)
    for s in range(24, 27):
        assert torch.equal(step(method, opt, s), step(resumed, resumed_opt, s)), s
    assert torch.equal(method.bank.memory, resumed.bank.memory)
    assert torch.equal(method.partition, resumed.partition)
    cls = METHODS["instdisc"]
    loaded = cls(resolve_config(cls.config_class, overrides=TINY))   # no data bound: evaluation, export
    loaded.load_state_dict(method.state_dict())
    assert torch.equal(loaded.bank.memory, method.bank.memory)


IMAGES = torch.randint(0, 256, (N, 8, 8, 3), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def _normalised(images):
    """The eval recipe's view of uint8 images at their own size: x / 255, minus mean, over std."""
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.permute(0, 3, 1, 2).float() / 255 - mean) / std


def _fill(rank, world):
    torch.set_num_threads(1)
    method = build(bank_init="features")
    share = torch.arange(rank, N, world)
    method.fill_bank([{"views": [_normalised(IMAGES[i])], "index": i} for i in share.split(7)])
    return method.bank.memory


def test_fill_bank_writes_each_images_untrained_feature_on_one_or_two_ranks():
    """Row i = normalize(head(backbone(x_i))), BatchNorm on its running statistics; two ranks, each
    embedding half of the images, fill the same bank as one process."""
    method = build(bank_init="features")
    method.eval()
    want = features(method, {"views": [_normalised(IMAGES)]})
    bank = _fill(0, 1)
    torch.testing.assert_close(bank, want, rtol=1e-5, atol=1e-6)
    bank0, bank1 = run_gloo(_fill, 2)
    assert torch.equal(bank0, bank1)
    torch.testing.assert_close(bank0, bank, rtol=1e-5, atol=1e-6)


def test_bank_init_features_fills_the_bank_at_the_first_step_only():
    method = build(bank_init="features", source=IMAGES, loader="torchvision", num_threads=1)
    method.eval()
    want = features(method, {"views": [_normalised(IMAGES)]})
    method.train()
    method(batch(0), context(step=0))
    torch.testing.assert_close(method.bank.memory, want, rtol=1e-4, atol=1e-4)
    rows = method.bank.memory.clone()
    method(batch(1), context(step=1))   # a resumed run's bank comes from its checkpoint
    assert torch.equal(method.bank.memory, rows)


def test_forward_without_a_bank_says_to_bind_the_data():
    cls = METHODS["instdisc"]
    method = cls(resolve_config(cls.config_class, overrides=TINY))
    with pytest.raises(ValueError, match="bind_data"):
        method(batch(0), context())
    assert math.isclose(resolve_config(cls.config_class).method.temperature, 0.07)


def _ddp_step(rank, world, state, b):
    """One softmax-form step on this rank's half of the batch, BatchNorm on its running statistics
    (so that a sample's feature does not depend on which rank holds it)."""
    torch.set_num_threads(1)
    method = build(loss="softmax")
    method.load_state_dict(state)
    method.backbone.eval()
    half = {"views": [b["views"][0].chunk(world)[rank]], "index": b["index"].chunk(world)[rank]}
    loss = method(half, context())["loss"]
    method.after_optimizer_step(context())
    return loss.detach(), method.bank.memory


def test_two_ranks_keep_identical_banks_equal_to_one_process():
    """The bank is replicated: each rank applies every rank's features (gathered), so both copies
    equal the bank of one process that saw the whole batch; the losses average to its loss."""
    method = build(loss="softmax")
    b = batch(0)
    b["index"][B // 2] = b["index"][0]   # one image on both ranks: rank 1's feature (the last) wins
    full_loss, full_bank = _ddp_step(0, 1, method.state_dict(), b)
    (l0, bank0), (l1, bank1) = run_gloo(_ddp_step, 2, method.state_dict(), b)
    assert torch.equal(bank0, bank1)
    torch.testing.assert_close(bank0, full_bank, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close((l0 + l1) / 2, full_loss, rtol=1e-5, atol=1e-6)
