"""Recipes carry the papers' defaults, accept overrides and reject bad values."""

from dataclasses import replace

import pytest

from fastssl.data import Recipe, ViewSpec, recipes
from fastssl.data.recipes import IMAGENET_MEAN, IMAGENET_STD


def test_mocov2_defaults():
    r = recipes.mocov2()
    assert r.name == "mocov2" and r.num_views == 2 and r.view_sizes == [224, 224]
    for v in r.views:
        assert v.crop == "random_resized" and v.scale == (0.2, 1.0)
        assert v.jitter == (0.4, 0.4, 0.4, 0.1) and v.jitter_p == 0.8
        assert v.grayscale_p == 0.2 and v.blur_p == 0.5 and v.blur_sigma == (0.1, 2.0)
        assert v.solarize_p == 0.0 and v.flip_p == 0.5
    assert r.mean == IMAGENET_MEAN == (0.485, 0.456, 0.406) and r.std == IMAGENET_STD == (0.229, 0.224, 0.225)
    assert r.views[0] is not r.views[1]


def test_mocov3_asymmetric_views():
    v1, v2 = recipes.mocov3(size=32).views
    assert v1.scale == v2.scale == (0.08, 1.0) and v1.size == v2.size == 32
    assert (v1.blur_p, v1.solarize_p) == (1.0, 0.0)
    assert (v2.blur_p, v2.solarize_p) == (0.1, 0.2)
    assert v1.jitter == (0.4, 0.4, 0.2, 0.1) and v1.jitter_p == 0.8 and v1.grayscale_p == 0.2


def test_dino_multicrop_order_counts_sizes():
    r = recipes.dino()
    assert r.num_views == 12 and r.view_sizes == [224, 224] + [96] * 10
    g1, g2, *local = r.views
    assert g1.scale == g2.scale == (0.4, 1.0)
    assert (g1.blur_p, g1.solarize_p, g2.blur_p, g2.solarize_p) == (1.0, 0.0, 0.1, 0.2)
    assert all(v.scale == (0.05, 0.4) and v.blur_p == 0.5 and v.solarize_p == 0.0 for v in local)
    for v in r.views:
        assert v.jitter == (0.4, 0.4, 0.2, 0.1) and v.jitter_p == 0.8 and v.grayscale_p == 0.2
    small = recipes.dino(global_size=32, local_crop_size=16, n_local_crops=6)
    assert small.view_sizes == [32, 32] + [16] * 6
    assert recipes.dino(n_local_crops=0).num_views == 2


def test_mae_rotnet_eval():
    (v,) = recipes.mae(size=64).views
    assert v.scale == (0.2, 1.0) and v.flip_p == 0.5
    assert v.jitter_p == v.grayscale_p == v.blur_p == v.solarize_p == 0.0
    rot = recipes.rotnet(size=32)
    assert rot.rotations == (0, 1, 2, 3) and rot.num_views == 4 and rot.view_sizes == [32] * 4
    (e,) = recipes.eval().views
    assert e.crop == "center" and e.resize_to == 256 and e.flip_p == 0.0
    assert recipes.eval(size=32, resize=32).views[0].resize_to == 32


def test_overrides():
    r = recipes.mocov2(size=32, blur_p=0.0, scale=(0.5, 1.0))
    assert all(v.blur_p == 0.0 and v.scale == (0.5, 1.0) and v.size == 32 for v in r.views)
    r2 = replace(r, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert r2.mean == (0.5, 0.5, 0.5)
    custom = Recipe("custom", [ViewSpec(size=8), ViewSpec(size=4, crop="center")])
    assert custom.view_sizes == [8, 4]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"blur_p": 1.5}, "blur_p"),
        ({"grayscale_p": -0.1}, "grayscale_p"),
        ({"size": 0}, "size"),
        ({"scale": (0.6, 0.2)}, "scale"),
        ({"scale": (0.2, 1.5)}, "scale"),
        ({"crop": "square"}, "crop"),
        ({"jitter": (0.4, 0.4, 0.4)}, "jitter"),
        ({"crop": "center", "size": 32, "resize": 28}, "resize"),
    ],
)
def test_bad_view_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ViewSpec(**kwargs)
    with pytest.raises(ValueError, match=match):
        recipes.mocov2(**kwargs)


def test_bad_recipes():
    with pytest.raises(ValueError, match="views"):
        Recipe("x", [])
    with pytest.raises(TypeError, match="ViewSpec"):
        Recipe("x", ["crop"])
    with pytest.raises(ValueError, match="rotations"):
        Recipe("x", [ViewSpec()], rotations=(0, 4))
    with pytest.raises(ValueError, match="exactly one view"):
        Recipe("x", [ViewSpec(), ViewSpec()], rotations=(0, 1))
    with pytest.raises(ValueError, match="std"):
        Recipe("x", [ViewSpec()], std=(0.2, 0.0, 0.2))
    with pytest.raises(ValueError, match="n_local"):
        recipes.dino(n_local_crops=-1)


def test_view_overrides_replace_augmentation_fields_in_every_view_and_keep_sizes():
    base = recipes.dino(global_size=28, local_crop_size=14, n_local_crops=2)
    out = recipes.with_view_overrides(base, {"scale": [0.3, 1.0], "blur_p": 0.0, "solarize_p": 0.0})
    assert [v.size for v in out.views] == [28, 28, 14, 14]
    assert all(v.scale == (0.3, 1.0) and v.blur_p == 0.0 and v.solarize_p == 0.0 for v in out.views)
    assert [v.jitter_p for v in out.views] == [v.jitter_p for v in base.views]   # untouched fields kept
    assert base.views[0].blur_p == 1.0                                          # the input recipe unchanged
    assert recipes.with_view_overrides(base, {}) is base
    with pytest.raises(ValueError, match="views: unknown key.*'size'"):
        recipes.with_view_overrides(base, {"size": 32})
