"""Two gloo processes on half batches give what one process gives on the whole batch (the
losses averaged, the gradients averaged as DDP does, the DINO center identical on every rank),
for a DINO step, a MoCo v3 step (keys gathered across ranks, label offset rank * N), a SimCLR
step (both views of every rank in one NT-Xent grid, label offset rank * 2N), a CLIP step (local
loss, features gathered with gradient) and a SigLIP step (the other rank's texts by neighbour
exchange).
MoCo v3 and SimCLR use a ViT backbone, whose samples are independent; their heads keep BatchNorm1d,
which normalizes with per-rank statistics without SyncBN, so those layers run in eval mode."""

import torch
from dist_utils import run_gloo
from method_helpers import build, context, make_batch, one_thread  # noqa: F401 (autouse fixture)

VIT = {"backbone": "vit_tiny_patch4", "image_size": 16, "vit_depth": 1}
JOBS = [("dino", {}), ("mocov3", VIT), ("simclr", VIT), ("clip", {}), ("siglip", {})]
# CLIP's and SigLIP's logits carry the learned scale (t = 14.3 / 10), and their gradients with it
# (up to ~20): float32 rounding then exceeds an absolute 1e-6, so it scales with the gradient
GRAD_ATOL = {"clip": 5e-6, "siglip": 5e-6}


def _steps(rank: int, world: int, jobs: list) -> list:
    results = []
    for name, overrides, state, batch in jobs:
        torch.set_num_threads(1)
        method = build(name, **overrides)
        method.load_state_dict(state)
        for m in method.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.eval()
        shard = {"views": [v.chunk(world)[rank] for v in batch["views"]],
                 "index": batch["index"].chunk(world)[rank]}
        loss = method(shard, context(epoch=1))["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
        center = method.criterion.center.clone() if name == "dino" else None
        results.append((loss.detach(), grads, center))
    return results


def test_two_processes_equal_one_process_on_the_full_batch():
    jobs = []
    for name, overrides in JOBS:
        method = build(name, **overrides)
        jobs.append((name, overrides, method.state_dict(), make_batch(method, batch_size=4)))
    full = _steps(0, 1, jobs)
    ranks = run_gloo(_steps, 2, jobs)
    for j, (name, _) in enumerate(JOBS):
        full_loss, full_grads, full_center = full[j]
        r0, r1 = ranks[0][j], ranks[1][j]
        torch.testing.assert_close((r0[0] + r1[0]) / 2, full_loss, rtol=1e-5, atol=1e-6, msg=name)
        assert r0[1].keys() == full_grads.keys()
        for n, g in full_grads.items():
            atol = max(1e-6, GRAD_ATOL.get(name, 0.0) * float(g.abs().max()))
            torch.testing.assert_close((r0[1][n] + r1[1][n]) / 2, g, rtol=1e-4, atol=atol, msg=f"{name} {n}")
        if full_center is not None:
            torch.testing.assert_close(r0[2], full_center, rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(r1[2], full_center, rtol=1e-5, atol=1e-7)


def _shuffled_keys(rank: int, world: int, state: dict, x: torch.Tensor, seed: int) -> tuple:
    """MoCo v2's keys under 2-process DDP: this rank's half of x, the permutation drawn from the
    global generator seeded with `seed` (rank 1 is seeded differently: rank 0's draw must win)."""
    from fastssl.distributed import batch_shuffle, batch_unshuffle

    torch.set_num_threads(1)
    method = build("mocov2")
    method.load_state_dict(state)
    mine = x.chunk(world)[rank]
    torch.manual_seed(seed + rank)
    keys = method._keys_of(mine)
    rows = torch.arange(len(x)).chunk(world)[rank] * 1.0
    shuffled, inverse = batch_shuffle(rows[:, None], generator=torch.Generator().manual_seed(seed + rank))
    return keys, shuffled[:, 0], batch_unshuffle(shuffled, inverse)[:, 0], rows


def test_mocov2_shuffles_the_key_batch_across_ranks():
    """Official MoCo's shuffling BN: the key encoder's BatchNorm on each rank sees the half of
    the global batch that rank 0's permutation assigns to it; keys return in the input order."""
    method = build("mocov2")
    assert method.cfg.method.shuffle_bn and method.cfg.method.bn_splits == 1
    x = make_batch(method, batch_size=8)["views"][1]
    seed = 5
    (k0, s0, u0, rows0), (k1, s1, u1, rows1) = run_gloo(_shuffled_keys, 2, method.state_dict(), x, seed)

    perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # the reference: BN in train mode on each permuted half
        keys_permuted = torch.cat([method.encoder_k(x[half]) for half in perm.chunk(2)])
    want = keys_permuted[torch.argsort(perm)]
    torch.testing.assert_close(torch.cat([k0, k1]), want, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        unshuffled = torch.cat([method.encoder_k(half) for half in x.chunk(2)])
    assert not torch.allclose(torch.cat([k0, k1]), unshuffled, atol=1e-3)  # the shuffle changed BN's batches

    # the helpers alone: rank 0's permutation on both ranks, its inverse restores each rank's rows
    torch.testing.assert_close(torch.cat([s0, s1]), perm.float())
    torch.testing.assert_close(u0, rows0)
    torch.testing.assert_close(u1, rows1)
