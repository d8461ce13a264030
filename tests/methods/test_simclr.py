"""SimCLR's views: two global crops of crop_scale, then n_local_crops small crops of local_crop_scale,
each pass of a size through the encoder as one batch; bad scales refused by name."""

import pytest
import torch
from method_helpers import build, context, make_batch, one_thread  # noqa: F401 (autouse fixture)

from fastssl.engine import resolve_config
from fastssl.methods import METHODS


def test_recipe_lists_the_global_views_then_the_local_crops():
    method = build("simclr", crop_scale=(0.3, 1.0), n_local_crops=3, local_crop_size=4,
                   local_crop_scale=(0.1, 0.3))
    views = method.recipe().views
    assert [v.size for v in views] == [8, 8, 4, 4, 4]
    assert [v.scale for v in views] == [(0.3, 1.0)] * 2 + [(0.1, 0.3)] * 3
    assert [v.blur_p for v in views] == [1.0, 0.1, 0.5, 0.5, 0.5]  # MoCo v3's pair, DINO's local blur
    assert len(build("simclr").recipe().views) == 2


def test_local_crops_reach_the_loss_through_their_own_encoder_pass():
    method = build("simclr", n_local_crops=2, local_crop_size=4)
    batch = make_batch(method)
    calls = []
    method.encoder_q.register_forward_hook(lambda m, args, out: calls.append(tuple(args[0].shape)))
    loss = method(batch, context())["loss"]
    assert calls == [(16, 3, 8, 8), (16, 3, 4, 4)]  # the 2 global views, then the 2 local crops
    z = [method.encoder_q(torch.cat(batch["views"][:2])).chunk(2),
         method.encoder_q(torch.cat(batch["views"][2:])).chunk(2)]
    plain = method.criterion(*z[0])
    torch.testing.assert_close(loss, method.criterion(*z[0], local_crops=z[1]))
    assert (loss - plain).abs() > 1e-4  # the local terms count
    with pytest.raises(ValueError, match=r"simclr needs batch\['views'\] with at least 4 views, got 2 views"):
        method({"views": batch["views"][:2]}, context())


@pytest.mark.parametrize("name", ["crop_scale", "local_crop_scale"])
def test_a_reversed_scale_is_refused_by_name(name):
    with pytest.raises(ValueError, match=rf"{name} must be \(min, max\) with min <= max"):
        resolve_config(METHODS["simclr"].config_class, overrides={name: (0.6, 0.2)})
