"""Block masking against its definition (BEiT / iBOT / DINOv2's MaskingGenerator and collate):
rectangles of area ~ U(min_num_patches, remaining) and log-uniform aspect ratio until the target
count (never beyond it); int(n * mask_probability) of a batch's n images masked, the i-th with
int(N * U(r_i, r_{i+1})) patches for r = linspace(low, high, masked + 1), the rest unmasked."""

import math

import numpy as np
import pytest
import torch

from fastssl.data import ArraySource, build_loader, recipes
from fastssl.data.masking import BlockMasks, MaskingGenerator


def test_one_rectangle_area_and_aspect_statistics():
    """A single rectangle on an empty grid: solid, h/w within the aspect range (up to rounding),
    log(h/w) symmetric about 0 and the area's mean that of U(min_num_patches, max)."""
    gen = MaskingGenerator(32, max_num_patches=100, min_num_patches=16, min_aspect=0.3)
    rng = np.random.default_rng(0)
    areas, log_ratios = [], []
    for _ in range(3000):
        mask = np.zeros((32, 32), dtype=bool)
        added = gen._add_rectangle(mask, 100, rng)
        rows, cols = np.nonzero(mask)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert added == mask.sum() == h * w  # solid
        areas.append(h * w)
        log_ratios.append(math.log(h / w))
    log_ratios = np.array(log_ratios)
    # h = round(sqrt(a r)), w = round(sqrt(a / r)) with a >= 16: rounding moves h / w by < 1.5x
    slack = math.log(1.5)
    assert log_ratios.max() <= math.log(1 / 0.3) + slack and log_ratios.min() >= math.log(0.3) - slack
    assert abs(log_ratios.mean()) < 0.05 and log_ratios.max() > 0.9 and log_ratios.min() < -0.9
    assert abs(np.mean(areas) - (16 + 100) / 2) < 3  # rounding h and w moves each area a little


def test_mask_counts_never_exceed_the_target_and_mostly_reach_it():
    gen = MaskingGenerator((14, 14), max_num_patches=98)
    rng = np.random.default_rng(1)
    for target in (0, 5, 20, 60, 98):
        counts = np.array([gen(target, rng=rng).sum() for _ in range(200)])
        assert (counts <= target).all()
        # a short target (5 > min_num_patches = 4) can stop one patch early, as the definition allows
        assert (counts == target).mean() > 0.75 and counts.mean() >= 0.95 * target


def test_batch_masks_statistics():
    masking = BlockMasks(14, mask_ratio_tuple=(0.1, 0.5), mask_probability=0.5, seed=3)
    N = 196
    ratios, n_images = [], 64
    for batch in range(40):
        out = masking(n_images, epoch=0, batch=batch)
        masks = out["masks"]
        assert masks.shape == (n_images, N) and masks.dtype == torch.bool
        counts = masks.sum(1)
        assert (counts > 0).sum() == int(n_images * 0.5)  # the unmasked fraction, exactly
        masked = counts[counts > 0].sort().values
        # stratified: the i-th smallest count below the top of the i-th ratio bin
        bins = np.linspace(0.1, 0.5, 33)
        assert all(c <= int(N * bins[i + 1]) for i, c in enumerate(masked.tolist()))
        assert out["upperbound"] == sum(int(N * r) for r in bins[1:]) >= out["n_masked_patches"]
        idx = masks.flatten().nonzero().flatten()
        assert torch.equal(out["mask_indices"], idx) and out["n_masked_patches"] == len(idx)
        torch.testing.assert_close(out["masks_weight"], 1 / counts.clamp(min=1)[idx // N].float())
        ratios += (masked / N).tolist()
    # stratified over U(0.1, 0.5): the mean ratio is 0.3, less what int() and early stops take
    assert 0.27 < np.mean(ratios) <= 0.3 and max(ratios) <= 0.5


def test_seeded_and_resumable():
    a, b = BlockMasks(8, seed=5), BlockMasks(8, seed=5)
    first = a(16, epoch=2, batch=7)["masks"]
    a(16, epoch=2, batch=8)  # what ran before a batch does not change its masks
    assert torch.equal(b(16, epoch=2, batch=7)["masks"], first)
    assert not torch.equal(a(16, epoch=2, batch=6)["masks"], first)
    assert not torch.equal(a(16, epoch=3, batch=7)["masks"], first)
    assert not torch.equal(BlockMasks(8, seed=6)(16, epoch=2, batch=7)["masks"], first)
    assert not torch.equal(a(16, epoch=2, shard=1, batch=7)["masks"], first)


def test_loader_batches_carry_their_masks_and_resume():
    rng = np.random.default_rng(0)
    src = ArraySource(rng.integers(0, 256, (24, 16, 16, 3), dtype=np.uint8), rng.integers(0, 10, 24))
    masking = BlockMasks(4, n_views=2, seed=1)
    recipe = recipes.dino(global_size=16, local_crop_size=8, n_local_crops=1)
    make = lambda: build_loader(src, recipe, batch_size=8, loader="torchvision", device="cpu",  # noqa: E731
                                num_threads=1, masking=masking)
    batches = list(make())
    assert len(batches) == 3
    for number, batch in enumerate(batches):
        assert batch["masks"].shape == (16, 16)  # 2 global crops x 8 images, 4 x 4 patches
        assert torch.equal(batch["masks"], masking(16, epoch=0, batch=number)["masks"])
    resumed = make()
    resumed.set_epoch(0, start=2)
    assert torch.equal(next(iter(resumed))["masks"], batches[2]["masks"])


@pytest.mark.parametrize("kw,error,match", [
    (dict(grid=(4, 4, 4)), ValueError, "input_size must be an int or a"),
    (dict(mask_ratio_tuple=(0.5, 0.1)), ValueError, "mask_ratio_tuple must be"),
    (dict(mask_probability=1.5), ValueError, "mask_probability"),
    (dict(min_aspect=0.0), ValueError, "min_aspect"),
])
def test_clear_errors(kw, error, match):
    with pytest.raises(error, match=match):
        BlockMasks(**{"grid": 8, **kw})
    with pytest.raises(ValueError, match="max_num_patches or num_masking_patches"):
        MaskingGenerator(8)
