"""DINOv2: the three losses, the mask token, the iBOT part against iBOTPatchLoss, LR decay, resume."""

from __future__ import annotations

import copy

import pytest
import torch

from fastssl.engine import resolve_config
from fastssl.engine.parallel import split_micro_batches
from fastssl.losses import iBOTPatchLoss
from fastssl.method import StepContext
from fastssl.methods import METHODS
from tests.methods.method_helpers import context, one_thread  # noqa: F401 (autouse fixture)

TINY = dict(backbone="vit_tiny_patch4", image_size=16, local_crop_size=8, n_local_crops=2, vit_depth=2,
            out_dim=32, head_hidden_dim=32, bottleneck_dim=16, epochs=2, drop_path_rate=0.0,
            mask_probability=1.0, freeze_last_layer_epochs=0, warmup_teacher_temp_epochs=0)


def build(seed: int = 0, **overrides):
    cls = METHODS["dinov2"]
    torch.manual_seed(seed)
    return cls(resolve_config(cls.config_class, overrides={**TINY, **overrides}))


def batch(method, batch_size: int = 4, seed: int = 0) -> dict:
    """Random crops in the recipe's sizes and the loader's block masks of the 2 global crops."""
    g = torch.Generator().manual_seed(seed)
    m = method.cfg.method
    sizes = [method.cfg.data.image_size] * 2 + [m.local_crop_size] * m.n_local_crops
    views = [torch.randn(batch_size, 3, s, s, generator=g) for s in sizes]
    drawn = method.masking().for_batch(batch_size, epoch=0, shard=0, batch=seed)
    return {"views": views, "label": torch.zeros(batch_size, dtype=torch.long),
            "index": torch.arange(batch_size), **drawn}


def test_one_step_three_finite_losses_each_switched_off_by_its_weight():
    method = build()
    b = batch(method)
    out = copy.deepcopy(method)(b, context())
    parts = {k: out[f"{k}_loss"] for k in ("dino", "ibot", "koleo")}
    assert all(torch.isfinite(v) and v != 0 for v in parts.values())
    torch.testing.assert_close(out["loss"], parts["dino"] + parts["ibot"] + 0.1 * parts["koleo"])
    out["loss"].backward()
    for key in parts:
        off = build(**{f"{key}_loss_weight": 0.0})
        loss = off(b, context())["loss"]
        torch.testing.assert_close(loss, sum(v * w for k, (v, w) in
                                             zip(parts, zip(parts.values(), (1.0, 1.0, 0.1))) if k != key))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in off.student.parameters() if p.grad is not None)


def test_masked_positions_get_the_mask_token():
    method = build()
    net = method.student
    with torch.no_grad():
        net.mask_token.normal_()
        net.backbone.pos_embed.zero_()
    seen = {}
    net.backbone.norm_pre.register_forward_hook(lambda mod, args, out: seen.setdefault("x", args[0]))
    x = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    masks[0, [1, 5, 6]] = True
    masks[1, 15] = True
    net.tokens(x, masks)
    patches = seen["x"][:, net.backbone.num_prefix_tokens:]
    expected = net.backbone.patch_embed(x).flatten(1, 2)
    torch.testing.assert_close(patches[masks], net.mask_token.expand(4, -1))
    torch.testing.assert_close(patches[~masks], expected[~masks])


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_ibot_part_equals_ibot_patch_loss_reference(centering):
    method = build(teacher_centering=centering)
    b = batch(method)
    temp = method.criterion.teacher_temp_at(0)
    crops, masks, indices = b["views"], b["masks"], b["mask_indices"]
    with torch.no_grad():
        _, _, teacher_patch = method.teacher(crops[:2], mask_indices=indices)
        _, _, student_patch = method.student(crops, masks, indices)
    ref = iBOTPatchLoss(32)
    n = b["n_masked_patches"]
    if centering == "center":
        targets = ref.softmax_center_teacher(teacher_patch, temp)
    else:
        targets = ref.sinkhorn_knopp_teacher(teacher_patch, temp, torch.tensor([n]))
    expected = ref.forward_masked(student_patch, targets, masks, n_masked_patches=n,
                                  masks_weight=b["masks_weight"])
    out = method(b, context())
    torch.testing.assert_close(out["ibot_loss"], expected)


def test_a_micro_batch_takes_its_rows_of_each_global_crop_masks():
    method = build()
    b = batch(method, batch_size=4)
    micro = split_micro_batches(b, 2)[1]
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=10, total_steps=100, lr=0.0, weight_decay=0.0,
                      micro_step=1, accum_steps=2)
    masks = b["masks"].view(2, 4, -1)[:, 2:].flatten(0, 1)
    indices = masks.flatten().nonzero().flatten()
    weights = 1.0 / masks.sum(1).repeat_interleave(masks.sum(1)).float()
    alone = {**micro, "masks": masks, "mask_indices": indices, "masks_weight": weights,
             "n_masked_patches": len(indices)}
    expected = copy.deepcopy(method)(alone, context())
    got = method(micro, ctx)
    for key in ("dino_loss", "ibot_loss", "koleo_loss"):
        torch.testing.assert_close(got[key], expected[key])


def test_separate_patch_head_and_its_last_layer_frozen_in_epoch_0():
    method = build(separate_patch_head=True, freeze_last_layer_epochs=1)
    out = method(batch(method), context())
    out["loss"].backward()
    assert any(p.grad is not None for p in method.student.patch_head.last_layer.parameters())
    method.before_optimizer_step(context())
    assert all(p.grad is None for p in method.student.patch_head.last_layer.parameters())


def test_layer_decay_scales_blocks_below_the_heads():
    method = build(layer_decay=0.5)
    scales = sorted({g["lr_scale"] for g in method.parameter_groups()})
    # embeddings 0.5^3, block 0 0.5^2, block 1 0.5, final norm, heads and mask token 1
    assert scales == [0.125, 0.25, 0.5, 1.0]
    n_params = sum(len(g["params"]) for g in method.parameter_groups())
    assert n_params == sum(1 for p in method.student.parameters() if p.requires_grad)


@pytest.mark.parametrize("centering", ["center", "sinkhorn_knopp"])
def test_resume_is_bit_exact(centering):
    def step(method, opt, i):
        ctx = context(step=i)
        opt.zero_grad(set_to_none=True)
        method(batch(method, seed=i), ctx)["loss"].backward()
        method.before_optimizer_step(ctx)
        opt.step()
        method.after_optimizer_step(ctx)

    def fresh():
        method = build(teacher_centering=centering)
        return method, torch.optim.AdamW(method.parameter_groups(), lr=1e-3)

    straight, opt = fresh()
    for i in range(2):
        step(straight, opt, i)
    first, opt1 = fresh()
    step(first, opt1, 0)
    resumed, opt2 = fresh()
    resumed.load_state_dict(copy.deepcopy(first.state_dict()))
    opt2.load_state_dict(copy.deepcopy(opt1.state_dict()))
    step(resumed, opt2, 1)
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    if centering == "center":  # the iBOT and DINO centers moved and are part of the state
        assert straight.ibot.center.abs().sum() > 0 and straight.criterion.center.abs().sum() > 0


def test_rejects_a_cnn_backbone():
    with pytest.raises(ValueError, match="backbone: dinov2 needs a ViT"):
        build(backbone="resnet18", image_size=8)
