"""Activation checkpointing of transformer blocks: full (recompute the block) and selective
(keep matmul / attention / collective outputs, recompute the rest).

Both give exactly the gradients of no checkpointing; what the backward recomputes is
counted op by op: full re-runs the blocks' matmuls and GELUs, selective only the GELUs (and
the other cheap ops), none neither. Through the Trainer, DINO with selective checkpointing
trains exactly as without."""

from collections import Counter

import pytest
import torch
from ssl_tiny import SIZES, MultiViewLoader, full_state, tiny_method
from timm.models.vision_transformer import VisionTransformer
from torch.utils._python_dispatch import TorchDispatchMode

from fastssl.engine import Trainer
from fastssl.engine.parallel import apply_activation_checkpointing

DEPTH = 2


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def _grads_and_backward_ops(mode: str):
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2, num_classes=0)
    if mode != "none":
        assert apply_activation_checkpointing(vit, mode) == DEPTH
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loss = vit(x).square().sum()
    with OpCounter() as counter:
        loss.backward()
    return {n: p.grad.clone() for n, p in vit.named_parameters()}, counter.counts


def test_selective_and_full_checkpointing_give_the_same_gradients_recomputing_what_they_should():
    runs = {mode: _grads_and_backward_ops(mode) for mode in ("none", "full", "selective")}
    grads, _ = runs["none"]
    for mode in ("full", "selective"):
        assert runs[mode][0].keys() == grads.keys()
        for name, g in grads.items():
            torch.testing.assert_close(runs[mode][0][name], g, rtol=0, atol=0, msg=f"{mode} {name}")
    mm = lambda counts: counts["mm"] + counts["addmm"] + counts["bmm"]  # noqa: E731
    none, full, selective = (runs[m][1] for m in ("none", "full", "selective"))
    assert none["gelu"] == 0  # the backward runs gelu_backward, never gelu itself
    assert full["gelu"] == selective["gelu"] == DEPTH  # each block's MLP activation recomputed
    assert mm(selective) == mm(none)  # selective keeps every matmul output
    assert mm(full) > mm(none)  # full recomputes the blocks' projections too


def test_selective_checkpointing_under_autocast_with_blocks_called_twice():
    """As DINO's student runs its global then its local crops through the same blocks, in bf16."""
    grads = {}
    for mode in ("none", "selective"):
        torch.manual_seed(0)
        vit = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=DEPTH, num_heads=2,
                                num_classes=0, dynamic_img_size=True)
        if mode != "none":
            apply_activation_checkpointing(vit, mode)
        g = torch.Generator().manual_seed(1)
        views = [torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 8, 8, generator=g)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum(vit(v).float().square().sum() for v in views)
        loss.backward()
        grads[mode] = {n: p.grad.clone() for n, p in vit.named_parameters()}
    # Not bit-equal: without checkpointing autocast casts a weight once for both calls and sums its
    # two gradients in bf16; the selective recompute casts it per call and sums them in fp32.
    for name, g in grads["none"].items():
        torch.testing.assert_close(grads["selective"][name], g, rtol=2e-2, atol=2e-2 * g.abs().max().item(),
                                   msg=name)


@pytest.mark.parametrize("mode", ["selective"])
def test_trainer_with_selective_checkpointing_trains_as_without(tmp_path, mode):
    states = {}
    for ac in ("none", mode):
        method = tiny_method("dino", str(tmp_path / ac), max_steps=2, activation_checkpointing=ac)
        Trainer(method, MultiViewLoader(SIZES["dino"]), progress=False, log=lambda m: None).fit()
        states[ac] = full_state(method)
    for key, value in states["none"].items():
        torch.testing.assert_close(states[mode][key], value, rtol=1e-6, atol=1e-7, msg=key)
