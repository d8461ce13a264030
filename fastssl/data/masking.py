"""Block-wise masking of patch tokens, as BEiT, iBOT and DINOv2 draw it, made on the CPU beside the loader.

MaskingGenerator (BEiT's block masking, DINOv2's class): a mask over an H x W patch grid grows by
rectangles until it holds the requested number of patches. Each rectangle: target area a ~
U(min_num_patches, m) with m the patches still wanted (capped by max_num_patches), aspect ratio
r = exp(U(log min_aspect, log max_aspect)), h = round(sqrt(a r)), w = round(sqrt(a / r)); it is
kept when it fits inside the grid (h < H, w < W, top-left uniform) and adds between 1 and m new
patches; 10 tries per rectangle, and the mask stops growing when a rectangle adds nothing.

BlockMasks (DINOv2's collate): of the n images of a batch (every global crop), int(n *
mask_probability) are masked, the i-th with int(N * U(r_i, r_{i+1})) patches for the ratios r =
linspace(mask_ratio_tuple, steps = masked images + 1) (stratified over the range), the others not
at all; the masks are shuffled over the images. It returns the masks [n, N], the flat indices of
the masked tokens, their per-image weights 1 / max(1, masked tokens of the image) and their count,
so the losses need no host sync. Each batch's draws come from a numpy Generator keyed by (seed,
epoch, shard, batch number): the masks of a batch do not depend on what ran before it, so a
resumed run draws the same masks.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fastssl.ops.ibot_patch_loss import masks_weight_from_masks
from fastssl.validation import check_int, check_number


def _grid(input_size) -> tuple[int, int]:
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if len(size) != 2:
        raise ValueError(f"input_size must be an int or a (height, width) pair of patch counts, got "
                         f"{input_size!r}")
    return check_int("input_size height", size[0], low=1), check_int("input_size width", size[1], low=1)


class MaskingGenerator:
    """DINOv2's MaskingGenerator: ``MaskingGenerator(input_size, num_masking_patches=None,
    min_num_patches=4, max_num_patches=None, min_aspect=0.3, max_aspect=None)``; ``gen(n)`` returns
    a bool [H, W] mask of (up to) n patches (module docstring). The draws come from `rng` (a numpy
    Generator) when given, else from a fresh unseeded one."""

    def __init__(self, input_size, num_masking_patches: int | None = None, min_num_patches: int = 4,
                 max_num_patches: float | None = None, min_aspect: float = 0.3,
                 max_aspect: float | None = None):
        self.height, self.width = _grid(input_size)
        self.num_patches = self.height * self.width
        self.num_masking_patches = (None if num_masking_patches is None
                                    else check_int("num_masking_patches", num_masking_patches, low=0))
        self.min_num_patches = check_int("min_num_patches", min_num_patches, low=1)
        if max_num_patches is None and num_masking_patches is None:
            raise ValueError("max_num_patches or num_masking_patches must be given (the largest rectangle's "
                             "area), got neither")
        # a number, not only an int: DINOv2 passes 0.5 * N
        self.max_num_patches = check_number("max_num_patches", num_masking_patches if max_num_patches is None
                                            else max_num_patches, low=1)
        min_aspect = check_number("min_aspect", min_aspect, low=0.0, low_open=True)
        if max_aspect is None:
            max_aspect = 1.0 / min_aspect
        max_aspect = check_number("max_aspect", max_aspect, low=min_aspect)
        self.log_aspect_ratio = (math.log(min_aspect), math.log(max_aspect))

    def __repr__(self) -> str:
        low, high = self.log_aspect_ratio
        return (f"MaskingGenerator({self.height}, {self.width} -> [{self.min_num_patches} ~ "
                f"{self.max_num_patches}], max = {self.num_masking_patches}, {low:.3f} ~ {high:.3f})")

    def get_shape(self) -> tuple[int, int]:
        return self.height, self.width

    def _add_rectangle(self, mask: np.ndarray, max_mask_patches: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            # a + (b - a) u, as Python's random.uniform: the area's range may run downwards when
            # fewer patches than min_num_patches remain
            target_area = self.min_num_patches + (max_mask_patches - self.min_num_patches) * rng.random()
            aspect_ratio = math.exp(rng.uniform(*self.log_aspect_ratio))
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < self.width and h < self.height:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                block = mask[top:top + h, left:left + w]
                added = h * w - int(block.sum())
                if 0 < added <= max_mask_patches:
                    block[...] = True
                    return added
        return 0

    def __call__(self, num_masking_patches: int = 0, *, rng: np.random.Generator | None = None) -> np.ndarray:
        num_masking_patches = check_int("num_masking_patches", num_masking_patches, low=0)
        rng = np.random.default_rng() if rng is None else rng
        mask = np.zeros(self.get_shape(), dtype=bool)
        count = 0
        while count < num_masking_patches:
            added = self._add_rectangle(mask, min(num_masking_patches - count, self.max_num_patches), rng)
            if added == 0:
                break
            count += added
        return mask


class BlockMasks:
    """The masks of a batch's global crops (DINOv2's collate; module docstring).

    grid: patches per side (int) or (height, width); mask_ratio_tuple: the range of masked
    fractions; mask_probability: the fraction of images masked; min_num_patches, min_aspect,
    max_aspect: the MaskingGenerator's; its max_num_patches is 0.5 * N, DINOv2's. n_views: the
    masked (global) crops of each image, whose masks `for_batch` lays out crop-major as the views
    are. seed: the run's.
    """

    def __init__(self, grid, *, mask_ratio_tuple: tuple[float, float] = (0.1, 0.5),
                 mask_probability: float = 0.5, min_num_patches: int = 4, min_aspect: float = 0.3,
                 max_aspect: float | None = None, n_views: int = 2, seed: int = 0):
        height, width = _grid(grid)
        self.n_views = check_int("n_views", n_views, low=1)
        self.n_tokens = height * width
        low, high = (check_number(f"mask_ratio_tuple[{i}]", r, low=0.0, high=1.0) for i, r in
                     enumerate(tuple(mask_ratio_tuple)))
        if low > high:
            raise ValueError(f"mask_ratio_tuple must be (low, high) with low <= high, got "
                             f"{mask_ratio_tuple!r}")
        self.mask_ratio_tuple = (low, high)
        self.mask_probability = check_number("mask_probability", mask_probability, low=0.0, high=1.0)
        self.seed = check_int("seed", seed, low=0)
        self.generator = MaskingGenerator((height, width), max_num_patches=max(1, self.n_tokens // 2),
                                          min_num_patches=min_num_patches, min_aspect=min_aspect,
                                          max_aspect=max_aspect)

    def rng(self, *, epoch: int, shard: int, batch: int) -> np.random.Generator:
        """The Generator of one batch's draws, keyed by (seed, epoch, shard, batch number)."""
        return np.random.default_rng([self.seed, epoch, shard, batch])

    def for_batch(self, batch_size: int, *, epoch: int, shard: int, batch: int) -> dict:
        """The masks of the n_views crops of `batch_size` images (n_views * batch_size masks, crop-major)."""
        return self(self.n_views * batch_size, epoch=epoch, shard=shard, batch=batch)

    def __call__(self, n_images: int, *, epoch: int, shard: int = 0, batch: int) -> dict:
        """{"masks": bool [n_images, N], "mask_indices": int64 [n] (flat, image-major),
        "masks_weight": float32 [n], "n_masked_patches": n, "upperbound": sum over masked images of
        int(N * r_{i+1}) (the largest n this batch could have had)} on the CPU."""
        n_images = check_int("n_images", n_images, low=1)
        rng = self.rng(epoch=epoch, shard=shard, batch=batch)
        n_masked_images = int(n_images * self.mask_probability)
        ratios = np.linspace(*self.mask_ratio_tuple, n_masked_images + 1)
        masks, upperbound = [], 0
        for i in range(n_masked_images):
            count = int(self.n_tokens * rng.uniform(ratios[i], ratios[i + 1]))
            masks.append(self.generator(count, rng=rng))
            upperbound += int(self.n_tokens * ratios[i + 1])
        masks += [np.zeros(self.generator.get_shape(), dtype=bool)] * (n_images - n_masked_images)
        order = rng.permutation(n_images)
        flat = torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_images, -1))
        mask_indices = flat.flatten().nonzero().flatten()
        return {"masks": flat, "mask_indices": mask_indices,
                "masks_weight": masks_weight_from_masks(flat, mask_indices),
                "n_masked_patches": int(mask_indices.numel()), "upperbound": upperbound}
