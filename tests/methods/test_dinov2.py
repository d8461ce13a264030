"""DINOv2: the three losses, the mask token, the iBOT part against iBOTPatchLoss, LR decay, resume;
DINOv3's Gram anchoring against its formula; iBOT (DINOv2 without KoLeo) against its paper's loss."""

from __future__ import annotations

import copy

import pytest
import torch

from fastssl.engine import resolve_config
from fastssl.engine.export import backbone_state_dict
from fastssl.engine.parallel import split_micro_batches
from fastssl.losses import iBOTPatchLoss
from fastssl.method import StepContext
from fastssl.methods import METHODS
from tests.losses.test_gram import formula as gram_formula
from tests.methods.method_helpers import context, one_thread  # noqa: F401 (autouse fixture)

TINY = dict(backbone="vit_tiny_patch4", image_size=16, local_crop_size=8, n_local_crops=2, vit_depth=2,
            out_dim=32, head_hidden_dim=32, bottleneck_dim=16, epochs=2, drop_path_rate=0.0,
            mask_probability=1.0, freeze_last_layer_epochs=0, warmup_teacher_temp_epochs=0)


def build(seed: int = 0, name: str = "dinov2", **overrides):
    cls = METHODS[name]
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
        _, _, teacher_patch, _ = method.teacher(crops[:2], mask_indices=indices)
        _, _, student_patch, _ = method.student(crops, masks, indices)
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


def test_gram_anchoring_adds_the_papers_loss_against_a_frozen_earlier_backbone(tmp_path):
    earlier = build(seed=1)
    path = tmp_path / "backbone.pt"
    torch.save(backbone_state_dict(earlier), path)  # what `fastssl export` writes
    method = build(gram_teacher=str(path), gram_loss_weight=0.5)
    frozen = {k: v.clone() for k, v in method.gram_teacher.backbone.state_dict().items()}
    assert frozen.keys() == earlier.teacher.backbone.state_dict().keys()
    assert all(torch.equal(v, earlier.teacher.backbone.state_dict()[k]) for k, v in frozen.items())
    b = batch(method)
    out = method(b, context())
    # DINOv3's Gram loss (its formula, in float64): the student's patch tokens of the masked global
    # crops against the Gram teacher's of the unmasked ones, negatives kept
    crops = torch.cat(b["views"][:2])
    with torch.no_grad():
        student = method.student.tokens(crops, b["masks"])[:, 1:]
        target = earlier.teacher.backbone.forward_features(crops)[:, 1:]
    want = gram_formula(student, target, remove_neg=False)
    torch.testing.assert_close(out["gram_loss"].double(), want, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out["loss"], out["dino_loss"] + out["ibot_loss"] + 0.1 * out["koleo_loss"]
                               + 0.5 * out["gram_loss"])
    # it trains the student; the Gram teacher is frozen, out of the optimizer and in the checkpoint
    opt = torch.optim.AdamW(method.parameter_groups(), lr=1e-2)
    out["loss"].backward()
    assert method.student.backbone.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in method.gram_teacher.parameters())
    opt.step()
    method.after_optimizer_step(context())
    assert all(torch.equal(v, frozen[k]) for k, v in method.gram_teacher.backbone.state_dict().items())
    assert {f"gram_teacher.backbone.{k}" for k in frozen} <= method.state_dict().keys()


def test_gram_teacher_errors_name_the_key_and_the_fix(tmp_path):
    with pytest.raises(ValueError, match=r"gram_teacher: expected a backbone file .* fastssl export "):
        build(gram_teacher=str(tmp_path))  # a run folder
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a backbone file written by `fastssl export`"):
        build(gram_teacher=str(tmp_path / "junk.pt"))
    torch.save(backbone_state_dict(build(vit_depth=1)), tmp_path / "shallow.pt")
    with pytest.raises(ValueError, match="its weights do not fit this run's vit_tiny_patch4 .vit_depth=2"):
        build(gram_teacher=str(tmp_path / "shallow.pt"))


def test_ibot_defaults_are_the_official_vit_s_recipe():
    cfg = resolve_config(METHODS["ibot"].config_class)
    m = cfg.method
    assert (cfg.model.backbone, cfg.optim.epochs, cfg.model.drop_path_rate) == ("vit_small_patch16", 800, 0.1)
    assert (m.out_dim, m.norm_last_layer, m.separate_patch_head) == (8192, False, False)
    assert (m.teacher_centering, m.koleo_loss_weight, m.layer_decay) == ("center", 0.0, 1.0)
    assert (m.warmup_teacher_temp, m.teacher_temp, m.warmup_teacher_temp_epochs) == (0.04, 0.07, 30)
    assert (m.n_local_crops, m.mask_probability, m.mask_ratio_min, m.mask_ratio_max) == (10, 0.5, 0.1, 0.5)
    dinov2 = resolve_config(METHODS["dinov2"].config_class).method  # keeps its own
    assert (dinov2.out_dim, dinov2.teacher_centering, dinov2.koleo_loss_weight) == (65536, "sinkhorn_knopp",
                                                                                    0.1)


def test_ibot_loss_is_its_papers_class_and_patch_terms():
    method = build(name="ibot")
    b = batch(method)
    out = method(b, context())
    assert out.keys() == {"loss", "dino_loss", "ibot_loss"}  # no KoLeo
    torch.testing.assert_close(out["loss"], out["dino_loss"] + out["ibot_loss"])
    # iBOT's patch term: for each global crop, each image's mean over its masked patches of
    # -sum_k softmax((t - c) / tau_t) log softmax(s / tau_s) (c = 0 at the first step), averaged
    # over the images, then over the 2 crops; one head for class and patch tokens
    crops, masks = torch.cat(b["views"][:2]), b["masks"]
    with torch.no_grad():
        t = method.teacher.head(method.teacher.tokens(crops)[:, 1:]).double()
        s = method.student.head(method.student.tokens(crops, masks)[:, 1:]).double()
    temp = method.criterion.teacher_temp_at(0)
    ce = -((t / temp).softmax(-1) * (s / 0.1).log_softmax(-1)).sum(-1)
    per_image = (ce * masks).sum(1) / masks.sum(1).clamp(min=1)
    torch.testing.assert_close(out["ibot_loss"].double(), per_image.view(2, -1).mean(1).mean(),
                               rtol=1e-5, atol=1e-6)


def test_step_flops_are_counted_with_the_masks_shapes():
    from fastssl.engine.flops import step_flops

    method = build()
    flops = step_flops(method, method.recipe().view_sizes, 4)
    # at least the student's forward and backward of its patch embeddings on the 2 global crops
    assert flops >= 3 * 2 * (2 * 4) * 16 * (3 * 4 * 4) * 192
