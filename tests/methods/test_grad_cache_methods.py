"""GradCache in the in-batch contrastive methods (CLIP, SigLIP, SimCLR, MoCo v3): with accum_steps=2
the method's step equals one batch made of those 2 micro-batches — each micro-batch through the
encoders once, with its graph; the loss over the whole batch — in loss, in every parameter's
gradient and in the BatchNorm buffers (float64, reference path). CLIP runs a ViT with drop-path
(the replay must draw the same masks), SimCLR and MoCo v3 a ResNet with BatchNorm (the replay must
leave the running statistics alone). On 2 gloo ranks, SimCLR with GradCache equals one process.
The engine's FLOP count of a GradCache step is its micro-batches' (the replay is recompute)."""

import pytest
import torch
from dist_utils import run_gloo
from method_helpers import build, context, make_batch, one_thread  # noqa: F401 (autouse fixture)

A = 2
VIT = {"vit_depth": 2, "drop_path_rate": 0.5}  # timm's rates rise from 0 at the first block
RESNET8 = {"backbone": "resnet8"}
MULTI_CROP = {**RESNET8, "n_local_crops": 2, "local_crop_size": 4}
CASES = [("clip", VIT), ("siglip", VIT), ("simclr", RESNET8), ("simclr", MULTI_CROP), ("mocov3", RESNET8)]
# encoder passes per micro-batch (MoCo v3: one per view; SimCLR: one for the global views, one
# for the local crops)
BN_CALLS = {"simclr": 1, "mocov3": 2}


def _micro(tensors, k):
    return [t.chunk(A)[k] for t in tensors]


def reference_loss(method, batch):
    """The method's loss on `batch` with every micro-batch encoded once, with its graph, and the
    features of the A micro-batches concatenated (written from the papers' steps, not GradCache)."""
    views = batch["views"]
    cat = lambda parts: [torch.cat(p) for p in zip(*parts)]  # noqa: E731
    if method.name in ("clip", "siglip"):
        tokens = method.batch_tokens(batch)
        image, text = cat([(method.encode_image(x), method.encode_text(t))
                           for x, t in (_micro([views[0], tokens], k) for k in range(A))])
        return method.criterion(image, text, method.logit_scale.exp(), method.logit_bias)
    if method.name == "simclr":
        parts = []
        for x in (_micro(views, k) for k in range(A)):
            z = method.encoder_q(torch.cat(x[:2])).chunk(2)  # the global views first (running statistics)
            local = method.encoder_q(torch.cat(x[2:])).chunk(len(x) - 2) if len(x) > 2 else ()
            parts.append((*z, *local))
        z = cat(parts)
        return method.criterion(z[0], z[1], local_crops=z[2:])
    q1, q2, k1, k2 = [], [], [], []
    for x1, x2 in (_micro(views[:2], k) for k in range(A)):
        q1.append(method.predictor(method.base_encoder(x1)))
        q2.append(method.predictor(method.base_encoder(x2)))
        with torch.no_grad():
            k1.append(method.momentum_encoder(x1))
            k2.append(method.momentum_encoder(x2))
    q1, q2, k1, k2 = (torch.cat(t) for t in (q1, q2, k1, k2))
    return method.criterion(q1, k2) + method.criterion(q2, k1)


def _step(method, batch, reference):
    torch.manual_seed(7)  # the drop-path draws, the same for both
    loss = reference_loss(method, batch) if reference else method(batch, context())["loss"]
    loss.backward()
    grads = {n: p.grad for n, p in method.named_parameters() if p.grad is not None}
    return loss.detach(), grads, {n: b.clone() for n, b in method.named_buffers() if n != "tokens"}


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{len(o)}" for n, o in CASES])
def test_grad_cache_equals_one_batch_of_the_micro_batches(name, overrides):
    method = build(name, accum_steps=A, **overrides).double()
    batch = make_batch(method)
    batch["views"] = [v.double() for v in batch["views"]]
    reference = build(name, accum_steps=A, **overrides).double()
    want_loss, want_grads, want_buffers = _step(reference, batch, reference=True)
    loss, grads, buffers = _step(method, batch, reference=False)
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == want_grads.keys() and len(grads) > 4
    for n, g in want_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-9, atol=1e-12, msg=n)
    assert buffers.keys() == want_buffers.keys()
    for n, b in want_buffers.items():  # each micro-batch moved the running statistics once
        torch.testing.assert_close(buffers[n], b, rtol=1e-12, atol=1e-12, msg=n)
    if name in BN_CALLS:
        counts = [int(b) for n, b in buffers.items() if n.endswith("num_batches_tracked")]
        passes = BN_CALLS[name] + (overrides.get("n_local_crops", 0) > 0)
        assert max(counts) == A * passes
    # a full batch through the encoders at once is another step (BatchNorm statistics, drop-path draws)
    whole = build(name, **overrides).double()
    assert (_step(whole, batch, reference=False)[0] - want_loss).abs() > 1e-6


def test_grad_cache_rejects_a_batch_it_cannot_split():
    method = build("simclr", accum_steps=3, backbone="resnet8")
    with pytest.raises(ValueError, match=r"micro_batches \(accum_steps\): expected a divisor of the batch's "
                                         r"8 rows, got 3; set batch_size to a multiple of world size x "
                                         r"accum_steps"):
        method(make_batch(method), context())


def test_flop_count_is_a_micro_batch_s():
    """The engine counts one micro-batch's FLOPs (x accum_steps): the replay is recompute."""
    from fastssl.engine.flops import step_flops

    cached, plain = (build("simclr", accum_steps=a, backbone="resnet8") for a in (4, 1))
    assert step_flops(cached, [8, 8], 2) == step_flops(plain, [8, 8], 2) > 0


def _simclr_rank(rank: int, world: int, batch: dict) -> tuple:
    method = build("simclr", accum_steps=A, backbone="resnet8").double()
    shard = {"views": [v.chunk(world)[rank] for v in batch["views"]],
             "index": batch["index"].chunk(world)[rank]}
    loss = method(shard, context())["loss"]
    loss.backward()
    grads = {}
    for n, p in method.named_parameters():
        if p.grad is not None:  # averaged over the ranks, as DDP does
            torch.distributed.all_reduce(p.grad)
            grads[n] = p.grad / world
    return loss.detach(), grads


def test_grad_cache_on_two_ranks_equals_one_process():
    """2 ranks x 2 micro-batches of 2 = one process's 4 micro-batches of the same rows."""
    one = build("simclr", accum_steps=2 * A, backbone="resnet8").double()
    batch = make_batch(one)
    batch["views"] = [v.double() for v in batch["views"]]
    loss = one(batch, context())["loss"]
    loss.backward()
    ranks = run_gloo(_simclr_rank, 2, batch)
    torch.testing.assert_close(sum(r[0] for r in ranks) / 2, loss.detach(), rtol=1e-12, atol=1e-12)
    for n, p in one.named_parameters():
        torch.testing.assert_close(ranks[0][1][n], p.grad, rtol=1e-9, atol=1e-12, msg=n)
