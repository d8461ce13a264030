"""build_loader on the CPU with both backends: DALI's CPU-only mode and torchvision.v2.

References are written from first principles: normalization from the formula, epoch
order from torch's DistributedSampler, probabilities from the recipe's numbers."""

import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DistributedSampler

from fastssl.data import ArraySource, ImageFolderSource, Recipe, ViewSpec, build_loader, recipes
from fastssl.data import dali as dali_backend
from fastssl.data.loader import shard_indices

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")),
    "torchvision",
]
MEAN = torch.tensor(recipes.IMAGENET_MEAN).view(3, 1, 1)
STD = torch.tensor(recipes.IMAGENET_STD).view(3, 1, 1)


def _noise_source(n=48, size=20, seed=0):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), rng.integers(0, 10, n))


def _unnormalize(x):
    """Back to [0, 1] pixels: x * std + mean per channel."""
    return x * STD + MEAN


def _collect(loader):
    return [{"views": [v.clone() for v in b["views"]], "index": b["index"]} for b in loader]


@pytest.mark.parametrize("backend", BACKENDS)
def test_shapes_dtypes_multicrop_and_labels(backend):
    src = _noise_source()
    recipe = recipes.dino(global_size=24, local_crop_size=12, n_local_crops=3)
    loader = build_loader(src, recipe, batch_size=16, loader=backend, device="cpu", num_threads=2)
    assert loader.kind == backend and loader.device == torch.device("cpu") and len(loader) == 3
    batches = list(loader)
    assert len(batches) == 3
    for b in batches:
        assert [tuple(v.shape) for v in b["views"]] == [(16, 3, 24, 24)] * 2 + [(16, 3, 12, 12)] * 3
        assert all(v.dtype == torch.float32 and v.is_contiguous() for v in b["views"])
        assert b["label"].dtype == b["index"].dtype == torch.int64
        assert b["label"].tolist() == src.labels[b["index"].numpy()].tolist()
    seen = torch.cat([b["index"] for b in batches])
    assert sorted(seen.tolist()) == list(range(48))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_output(backend, dtype):
    loader = build_loader(_noise_source(16), recipes.mae(size=8), batch_size=8, loader=backend, device="cpu",
                          num_threads=1, dtype=dtype)
    b = next(iter(loader))
    assert b["views"][0].dtype == dtype and b["views"][0].shape == (8, 3, 8, 8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_normalization_matches_formula(backend):
    # Constant images stay constant under resize and crop: every output pixel must be
    # (c / 255 - mean) / std exactly (up to float rounding).
    colors = np.array([[10, 128, 250], [0, 255, 77], [200, 30, 160], [255, 255, 255]], np.uint8)
    images = np.broadcast_to(colors[:, None, None, :], (4, 14, 18, 3)).copy()
    recipe = Recipe("two", [recipes.eval(size=8, resize=10).views[0], ViewSpec(size=6, scale=(0.3, 1.0))])
    loader = build_loader(ArraySource(images), recipe, batch_size=4, loader=backend, device="cpu",
                          num_threads=1, shuffle=False)
    b = next(iter(loader))
    expected = (torch.from_numpy(colors).float().view(4, 3, 1, 1) / 255 - MEAN) / STD
    for v in b["views"]:
        torch.testing.assert_close(v, expected.expand_as(v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_recipe_is_resize_center_crop(backend):
    # A 12x12 image with a 4x4 bright center square: resizing to 12 is the identity, so
    # a center crop of 4 must hold exactly the bright square.
    img = np.zeros((1, 12, 12, 3), np.uint8)
    img[0, 4:8, 4:8] = (250, 100, 20)
    loader = build_loader(ArraySource(img), recipes.eval(size=4, resize=12), batch_size=1, loader=backend,
                          device="cpu", num_threads=1)
    pixels = _unnormalize(next(iter(loader))["views"][0][0]) * 255
    expected = torch.tensor([250.0, 100.0, 20.0]).view(3, 1, 1).expand(3, 4, 4)
    torch.testing.assert_close(pixels, expected, atol=1e-3, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_determinism_epochs_and_resume(backend):
    src = _noise_source(32, 16)
    make = lambda seed, threads: build_loader(src, recipes.mocov2(size=12), batch_size=8, loader=backend,
                                              device="cpu", num_threads=threads, seed=seed)
    a = make(0, 2)
    epoch0, epoch1 = _collect(a), _collect(a)
    b = make(0, 1)  # the thread/worker count must not change the batches
    b.set_epoch(1)
    resumed = _collect(b)
    assert len(resumed) == len(epoch1) == 4
    for x, y in zip(epoch1, resumed):
        assert torch.equal(x["index"], y["index"])
        assert all(torch.equal(u, v) for u, v in zip(x["views"], y["views"]))
    assert not torch.equal(torch.cat([x["index"] for x in epoch0]), torch.cat([x["index"] for x in epoch1]))
    # Leaving an epoch early does not disturb the next one.
    c = make(0, 2)
    next(iter(c))
    again = _collect(c)
    assert all(torch.equal(x["views"][0], y["views"][0]) for x, y in zip(epoch1, again))
    other_seed = _collect(make(1, 2))
    assert not torch.equal(epoch0[0]["views"][0], other_seed[0]["views"][0])
    # The two views of one image differ (independent randomness per view).
    assert not torch.equal(epoch0[0]["views"][0], epoch0[0]["views"][1])


def _probe_images(n):
    """Square image, red-ish left half and blue-ish right half: not gray, not mirror-symmetric,
    has a sharp edge (blur changes it) and values >= 128 (solarize changes it)."""
    img = np.empty((16, 16, 3), np.uint8)
    img[:, :8] = (200, 60, 30)
    img[:, 8:] = (30, 90, 220)
    return np.broadcast_to(img, (n, 16, 16, 3)).copy()


@pytest.mark.parametrize("backend", BACKENDS)
def test_op_probabilities(backend):
    n = 800
    # A full-image crop (scale 1, square) resized to its own size is the identity, so
    # each view below isolates one random op against the untouched view 0.
    base = ViewSpec(size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    recipe = Recipe("probe", [
        base,
        replace(base, grayscale_p=0.2),
        replace(base, flip_p=0.5),
        replace(base, solarize_p=0.2),
        replace(base, blur_p=0.5),
        replace(base, jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=0.8),
        replace(base, flip_p=1.0, grayscale_p=1.0),
        replace(base, solarize_p=1.0),
    ])
    loader = build_loader(ArraySource(_probe_images(n)), recipe, batch_size=200, loader=backend,
                          device="cpu", num_threads=2)
    views = [torch.cat(vs) for vs in zip(*(b["views"] for b in loader))]
    ident, gray, flip, solar, blur, jitter, always, always_solar = (_unnormalize(v) for v in views)
    original = torch.from_numpy(_probe_images(1)[0]).permute(2, 0, 1).float() / 255
    torch.testing.assert_close(ident, original.expand_as(ident), atol=1e-3, rtol=0)
    changed = lambda v: (v - ident).abs().amax(dim=(1, 2, 3)) > 1.5 / 255
    is_gray = (gray.amax(dim=1) - gray.amin(dim=1)).amax(dim=(1, 2)) < 1.5 / 255
    is_flipped = (flip - ident.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-3
    observed = {
        "grayscale": (is_gray.float().mean(), 0.2),
        "flip": (is_flipped.float().mean(), 0.5),
        "solarize": (changed(solar).float().mean(), 0.2),
        "blur": (changed(blur).float().mean(), 0.5),
        # brightness factor within 1.5/200 of 1 changes no pixel: 0.8 * (1 - 0.0075 / 0.4)
        "jitter": (changed(jitter).float().mean(), 0.8 * (1 - 0.0075 / 0.4)),
    }
    assert changed(flip).sum() == is_flipped.sum() and not changed(gray)[~is_gray].any()
    for name, (p_hat, p) in observed.items():
        sigma = (p * (1 - p) / n) ** 0.5
        assert abs(float(p_hat) - p) < 4.5 * sigma, f"{name}: observed {float(p_hat):.3f}, expected {p:.3f}"
    # Solarize inverts pixels >= 128: 200 -> 55 and 220 -> 35; the rest are kept.
    hit = solar[changed(solar)]
    expected = original.clone()
    expected[original >= 128 / 255] = 1 - expected[original >= 128 / 255]
    torch.testing.assert_close(hit, expected.expand_as(hit), atol=1e-3, rtol=0)
    # Probability 1: every sample is solarized; every sample is gray (left ~98, right ~87
    # of 255) and flipped.
    torch.testing.assert_close(always_solar, expected.expand_as(always_solar), atol=1e-3, rtol=0)
    assert (always.amax(dim=1) - always.amin(dim=1)).amax() < 1.5 / 255
    assert (always - always[0]).abs().amax() < 1e-3 and (always[0, 0, :, 0] < always[0, 0, :, -1]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotnet_rotating_back_recovers_the_crop(backend):
    loader = build_loader(_noise_source(16, 20), recipes.rotnet(size=10), batch_size=8, loader=backend,
                          device="cpu", num_threads=1)
    for b in loader:
        assert len(b["views"]) == 4
        for k, v in enumerate(b["views"]):
            assert v.shape == (8, 3, 10, 10)
            assert torch.equal(torch.rot90(v, -k, dims=(-2, -1)), b["views"][0])
        assert not torch.equal(b["views"][1], b["views"][0])


@pytest.mark.parametrize(
    "n, num_shards, drop_last", [(50, 2, True), (50, 3, True), (50, 3, False), (48, 4, False)]
)
def test_shard_indices_match_distributed_sampler(n, num_shards, drop_last):
    for epoch in (0, 3):
        shards = []
        for rank in range(num_shards):
            ref = DistributedSampler(range(n), num_replicas=num_shards, rank=rank, shuffle=True, seed=7,
                                     drop_last=drop_last)
            ref.set_epoch(epoch)
            ours = shard_indices(n, epoch=epoch, seed=7, shard_id=rank, num_shards=num_shards,
                                 drop_last=drop_last)
            assert ours.tolist() == list(ref)
            shards.append(set(ours.tolist()))
        union = set().union(*shards)
        if drop_last or n % num_shards == 0:
            assert sum(len(s) for s in shards) == len(union)  # disjoint
        assert len(union) >= n - num_shards + 1 and union <= set(range(n))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_loaders_disjoint_covering_and_len(backend):
    src = _noise_source(40, 8)
    got = []
    for rank in range(2):
        loader = build_loader(src, recipes.mae(size=8), batch_size=6, loader=backend, device="cpu",
                              num_threads=1, shard_id=rank, num_shards=2, seed=3, drop_last=False)
        ref = torch.utils.data.DataLoader(
            range(40), batch_size=6, drop_last=False,
            sampler=DistributedSampler(range(40), num_replicas=2, rank=rank, seed=3, drop_last=False),
        )
        assert len(loader) == len(ref) == 4
        batches = list(loader)
        assert [len(b["index"]) for b in batches] == [6, 6, 6, 2]
        assert torch.cat([b["index"] for b in batches]).tolist() == torch.cat(list(ref)).tolist()
        got.append(set(torch.cat([b["index"] for b in batches]).tolist()))
    assert not got[0] & got[1] and got[0] | got[1] == set(range(40))


class _EpochSampler:
    """A weak-supervision-style sampler: indices depend on the epoch, with repeats."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __iter__(self):
        return iter([(3 * k + self.epoch) % 20 for k in range(12)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_external_sampler_replaces_shuffle(backend):
    loader = build_loader(_noise_source(20, 8), recipes.mae(size=8), batch_size=5, loader=backend,
                          device="cpu", num_threads=1, sampler=_EpochSampler())
    assert len(loader) == 2
    for epoch in (0, 1):
        idx = torch.cat([b["index"] for b in loader]).tolist()
        assert idx == [(3 * k + epoch) % 20 for k in range(10)]


def _jpeg_folder(root, bad=None):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        os.makedirs(root / c, exist_ok=True)
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / c / f"{k}.jpg")
    if bad:
        (root / bad).write_bytes(b"\xff\xd8\xff\xe0 definitely not a complete jpeg" * 3)
    return root


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_folder_decodes_and_names_corrupt_file(backend, tmp_path):
    root = _jpeg_folder(tmp_path, bad="b/zz_broken.jpg")
    with pytest.warns(UserWarning, match="zz_broken.jpg"):
        clean = ImageFolderSource(root, skip_corrupt=True)
    loader = build_loader(clean, recipes.mocov2(size=8), batch_size=3, loader=backend, device="cpu",
                          num_threads=1, shuffle=False)
    b = list(loader)
    assert [tuple(v.shape) for v in b[1]["views"]] == [(3, 3, 8, 8)] * 2
    assert b[0]["label"].tolist() == [0, 0, 0] and b[1]["label"].tolist() == [1, 1, 1]
    broken = build_loader(ImageFolderSource(root), recipes.mocov2(size=8), batch_size=7, loader=backend,
                          device="cpu", num_threads=1)
    with pytest.raises(ValueError, match="zz_broken.jpg"):
        list(broken)


def test_dali_missing_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(dali_backend, "HAS_DALI", False)
    with pytest.raises(ImportError, match=r"fastssl\[dali\].*torchvision"):
        build_loader(_noise_source(8), recipes.mae(8), batch_size=4, loader="dali", device="cpu")
    assert build_loader(_noise_source(8), recipes.mae(8), batch_size=4, loader="auto", device="cpu",
                        num_threads=1).kind == "torchvision"


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 100}, ValueError, "batch_size=100"),
        ({"num_threads": 0}, ValueError, "num_threads"),
        ({"shard_id": 2, "num_shards": 2}, ValueError, "shard_id"),
        ({"loader": "pillow"}, ValueError, "loader"),
        ({"device": "tpu"}, ValueError, "device"),
        ({"dtype": torch.int8}, TypeError, "dtype"),
        ({"sampler": [1, 2]}, TypeError, "sampler"),
        ({"seed": -1}, ValueError, "seed"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    args = {"batch_size": 4, "loader": "torchvision", "device": "cpu", "num_threads": 1, **kwargs}
    with pytest.raises(exc, match=match):
        build_loader(_noise_source(8), recipes.mae(8), **args)


def test_bad_source_recipe_and_epoch():
    with pytest.raises(TypeError, match="source"):
        build_loader(np.zeros((4, 8, 8), np.uint8), recipes.mae(8), batch_size=2, loader="torchvision",
                     device="cpu")
    with pytest.raises(TypeError, match="recipe"):
        build_loader(_noise_source(8), "mae", batch_size=2, loader="torchvision", device="cpu")
    loader = build_loader(_noise_source(8), recipes.mae(8), batch_size=2, loader="torchvision", device="cpu",
                          num_threads=1)
    with pytest.raises(ValueError, match="epoch"):
        loader.set_epoch(-1)
    assert loader.epoch == 0
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            build_loader(_noise_source(8), recipes.mae(8), batch_size=2, loader="torchvision", device="gpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_gpu_output_matches_layout(backend):
    loader = build_loader(_noise_source(32, 16), recipes.dino(16, 8, 2), batch_size=8, loader=backend,
                          device="gpu", num_threads=2)
    b = next(iter(loader))
    assert all(v.is_cuda for v in b["views"]) and b["label"].is_cuda and b["index"].is_cuda
    assert [tuple(v.shape) for v in b["views"]] == [(8, 3, 16, 16)] * 2 + [(8, 3, 8, 8)] * 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_resized_crop_area_follows_scale(backend):
    # Red encodes x (4 per pixel), green encodes y: across a 16-pixel output row the red
    # values span (w - w / 16) * 4 for a crop of width w. Square ratio on a square image:
    # the area fraction is the scale drawn uniformly in (0.2, 1), mean 0.6.
    side, out, n = 64, 16, 400
    ramp = np.arange(side, dtype=np.uint8) * 4
    img = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.zeros((side, side), np.uint8)), -1)
    recipe = Recipe("crop", [ViewSpec(size=out, scale=(0.2, 1.0), ratio=(1.0, 1.0), flip_p=0.0)])
    images = np.broadcast_to(img, (n, side, side, 3)).copy()
    loader = build_loader(ArraySource(images), recipe, batch_size=100, loader=backend, device="cpu",
                          num_threads=2)
    views = _unnormalize(torch.cat([b["views"][0] for b in loader])) * 255
    width = (views[:, 0, :, -1] - views[:, 0, :, 0]).mean(dim=1) / 4 * out / (out - 1)
    height = (views[:, 1, -1, :] - views[:, 1, 0, :]).mean(dim=1) / 4 * out / (out - 1)
    area = width * height / side**2
    assert abs(float(area.mean()) - 0.6) < 0.04, float(area.mean())
    assert float(area.min()) > 0.2 - 0.03 and float(area.max()) < 1.0 + 0.03
    torch.testing.assert_close(width, height, atol=1.5, rtol=0)  # ratio (1, 1): square crops


DALI_GPU = pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")


def _first_batch(recipe, device, seed=0):
    loader = build_loader(_noise_source(128, 40), recipe, batch_size=128, loader="dali", device=device,
                          num_threads=2, seed=seed, shuffle=False)
    return [v.float().cpu() for v in next(iter(loader))["views"]]


@pytest.mark.gpu
@DALI_GPU
def test_dali_gpu_graph_gives_the_cpu_graph_values():
    """No randomness (center crop, no flip, no color): the GPU operators compute what the CPU
    operators of the same graph compute, to interpolation rounding (2 of 255 levels)."""
    recipe = Recipe("fixed", [ViewSpec(size=24, crop="center", resize=32, flip_p=0.0),
                              ViewSpec(size=16, crop="center", resize=20, flip_p=0.0)])
    for gpu, cpu in zip(_first_batch(recipe, "gpu"), _first_batch(recipe, "cpu")):
        torch.testing.assert_close(_unnormalize(gpu), _unnormalize(cpu), rtol=0, atol=2 / 255)


@pytest.mark.gpu
@DALI_GPU
def test_dali_gpu_views_have_the_cpu_graph_statistics():
    """DINO's recipe (random crops, flips, jitter, grayscale, blur, solarize): per view, the
    per-channel mean and standard deviation over the batch of 128 agree between the GPU and CPU
    graphs (0.2 is about 3.5 standard deviations of the difference of two independent draws)."""
    recipe = recipes.dino(24, 12, 2)
    for k, (gpu, cpu) in enumerate(zip(_first_batch(recipe, "gpu"), _first_batch(recipe, "cpu"))):
        assert gpu.shape == cpu.shape and torch.isfinite(gpu).all()
        for stat in (lambda x: x.mean(dim=(0, 2, 3)), lambda x: x.std(dim=(0, 2, 3))):
            torch.testing.assert_close(stat(gpu), stat(cpu), rtol=0, atol=0.2, msg=f"view {k}")
