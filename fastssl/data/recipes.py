"""View recipes: what each pretraining method asks of the data pipeline.

A recipe is a plain dataclass listing its views in the order the method consumes
them; every field has the paper's default and can be overridden (keyword arguments
of the builders below, or `dataclasses.replace`). Both backends (DALI and
torchvision.transforms.v2) read the same recipe with the same ranges and
probabilities, so a recipe means one thing whichever backend runs it.

Augmentations per view, in the order they are applied:
random resized crop (or resize + center crop for evaluation), color jitter with
probability `jitter_p`, grayscale with probability `grayscale_p`, Gaussian blur with
probability `blur_p`, solarization with probability `solarize_p`, horizontal flip with
probability `flip_p`, then normalization with the recipe's mean/std (ImageNet by default).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from fastssl.validation import check_int

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ViewSpec:
    """One augmented view of an image.

    size: output side (square). crop: "random_resized" (RandomResizedCrop with `scale`
    of the area and aspect `ratio`) or "center" (resize the shorter side to `resize`,
    then center crop `size`). jitter: ColorJitter strengths (brightness, contrast,
    saturation, hue) as in torchvision: factors uniform in [1-x, 1+x], hue shift uniform in
    [-h, h] of the color circle. blur_sigma: the Gaussian sigma range in pixels. Solarize
    inverts pixels >= 128 (of 255)."""

    size: int = 224
    crop: str = "random_resized"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    resize: int | None = None
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.0
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self) -> None:
        _check_int("size", self.size)
        if self.crop not in ("random_resized", "center"):
            raise ValueError(f"crop must be 'random_resized' or 'center', got {self.crop!r}")
        if self.resize is not None:
            _check_int("resize", self.resize)
            if self.resize < self.size:
                raise ValueError(f"resize must be >= size={self.size} (the center crop), got {self.resize}")
        for name in ("scale", "ratio", "blur_sigma"):
            lo, hi = _pair(name, getattr(self, name))
            if not 0 < lo <= hi:
                raise ValueError(f"{name} must satisfy 0 < low <= high, got {getattr(self, name)!r}")
            setattr(self, name, (lo, hi))
        if self.scale[1] > 1:
            raise ValueError(f"scale is a fraction of the image area in (0, 1], got {self.scale!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not isinstance(p, int | float) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")
        if len(self.jitter) != 4 or any(not 0 <= x for x in self.jitter) or self.jitter[3] > 0.5:
            raise ValueError(
                "jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                f"got {self.jitter!r}"
            )
        self.jitter = tuple(float(x) for x in self.jitter)

    @property
    def resize_to(self) -> int:
        """Shorter-side size before the center crop (the 256/224 convention by default)."""
        return self.resize if self.resize is not None else round(self.size * 256 / 224)


@dataclass
class Recipe:
    """The views one method needs from each image, in the order it consumes them.

    rotations: quarter turns (counter-clockwise, as torch.rot90 on dims (H, W)) for
    RotNet; when set, the recipe has one ViewSpec and the loader yields that one crop
    rotated by each entry, so view k of the batch has rotation label rotations[k]."""

    name: str
    views: list[ViewSpec]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    rotations: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.views, list | tuple) or not self.views:
            raise ValueError(f"views must be a non-empty list of ViewSpec, got {self.views!r}")
        for v in self.views:
            if not isinstance(v, ViewSpec):
                raise TypeError(f"views must hold ViewSpec, got {type(v).__name__}")
        self.views = list(self.views)
        if len(self.mean) != 3 or len(self.std) != 3 or any(s <= 0 for s in self.std):
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean!r} / {self.std!r}")
        if self.rotations:
            if len(self.views) != 1:
                raise ValueError(f"a recipe with rotations has exactly one view, got {len(self.views)}")
            if any(k not in (0, 1, 2, 3) for k in self.rotations):
                raise ValueError(f"rotations are quarter turns in 0..3, got {self.rotations!r}")
            self.rotations = tuple(int(k) for k in self.rotations)

    @property
    def num_views(self) -> int:
        return len(self.rotations) if self.rotations else len(self.views)

    @property
    def view_sizes(self) -> list[int]:
        """Output side of each yielded view, in order."""
        if self.rotations:
            return [self.views[0].size] * len(self.rotations)
        return [v.size for v in self.views]


def _check_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _pair(name: str, value) -> tuple[float, float]:
    if not isinstance(value, tuple | list) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    return float(value[0]), float(value[1])


def mocov2(size: int = 224, **overrides) -> Recipe:
    """MoCo v2 (Chen et al. 2020, "Improved Baselines"): 2 identical views of
    RandomResizedCrop scale (0.2, 1), ColorJitter(0.4, 0.4, 0.4, 0.1) p=0.8, grayscale
    p=0.2, blur sigma in [0.1, 2] p=0.5, flip. `overrides` replace ViewSpec fields."""
    view = replace(
        ViewSpec(size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                 grayscale_p=0.2, blur_p=0.5),
        **overrides,
    )
    return Recipe("mocov2", [view, replace(view)])


def mocov3(size: int = 224, **overrides) -> Recipe:
    """MoCo v3 / BYOL asymmetric views (Chen et al. 2021; Grill et al. 2020): crop scale
    (0.08, 1), ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2; view 1 blur p=1.0,
    solarize p=0; view 2 blur p=0.1, solarize p=0.2."""
    base = replace(
        ViewSpec(size=size, scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8,
                 grayscale_p=0.2),
        **overrides,
    )
    views = [replace(base, blur_p=1.0, solarize_p=0.0), replace(base, blur_p=0.1, solarize_p=0.2)]
    return Recipe("mocov3", views)


def dino(global_size: int = 224, local_crop_size: int = 96, n_local_crops: int = 10,
         global_scale: tuple[float, float] = (0.4, 1.0), local_scale: tuple[float, float] = (0.05, 0.4),
         **overrides) -> Recipe:
    """DINO multi-crop (Caron et al. 2021): 2 global crops (blur p=1.0 / 0.1, solarize
    p=0 / 0.2), then `n_local_crops` local crops (blur p=0.5); all with ColorJitter(0.4, 0.4,
    0.2, 0.1) p=0.8, grayscale p=0.2, flip. Global crops come first."""
    check_int("n_local_crops", n_local_crops, low=0)
    common = dict(jitter=(0.4, 0.4, 0.2, 0.1), jitter_p=0.8, grayscale_p=0.2)
    g = replace(ViewSpec(size=global_size, scale=global_scale, **common), **overrides)
    local = replace(ViewSpec(size=local_crop_size, scale=local_scale, blur_p=0.5, **common), **overrides)
    views = [replace(g, blur_p=1.0, solarize_p=0.0), replace(g, blur_p=0.1, solarize_p=0.2)]
    return Recipe("dino", views + [replace(local) for _ in range(n_local_crops)])


def mae(size: int = 224, **overrides) -> Recipe:
    """MAE (He et al. 2021): one RandomResizedCrop scale (0.2, 1) + flip, nothing else."""
    return Recipe("mae", [replace(ViewSpec(size=size, scale=(0.2, 1.0)), **overrides)])


def rotnet(size: int = 224, **overrides) -> Recipe:
    """RotNet (Gidaris et al. 2018): one crop (RandomResizedCrop + flip) shown in 4
    rotations, 0/90/180/270 degrees; view k has rotation label k."""
    return Recipe("rotnet", [replace(ViewSpec(size=size), **overrides)], rotations=(0, 1, 2, 3))


def instdisc(size: int = 224, **overrides) -> Recipe:
    """Instance discrimination (Wu et al. 2018, the official code's transform): RandomResizedCrop
    scale (0.2, 1), grayscale p=0.2, ColorJitter(0.4, 0.4, 0.4, 0.4) always, flip."""
    view = ViewSpec(size=size, scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, grayscale_p=0.2)
    return Recipe("instdisc", [replace(view, **overrides)])


def context(size: int = 96, **overrides) -> Recipe:
    """Context prediction (Doersch et al. 2015): one crop (scale (0.5, 1)) and flip, no colour
    change; the method cuts its 3x3 grid of patches from it."""
    return Recipe("context", [replace(ViewSpec(size=size, scale=(0.5, 1.0)), **overrides)])


def colorization(size: int = 176, **overrides) -> Recipe:
    """Colorization (Zhang et al. 2016): a crop (scale (0.25, 1)) and flip, colours untouched (they
    are the targets)."""
    return Recipe("colorization", [replace(ViewSpec(size=size, scale=(0.25, 1.0)), **overrides)])


def eval(size: int = 224, resize: int | None = None, **overrides) -> Recipe:  # noqa: A001 (the issue's name)
    """Evaluation: resize the shorter side to `resize` (default size * 256 / 224), center
    crop `size`, normalize; no randomness."""
    view = replace(ViewSpec(size=size, crop="center", resize=resize, flip_p=0.0), **overrides)
    return Recipe("eval", [view])


# The augmentation fields a config's `views` may replace; size, crop and resize stay the method's
# (a DINO recipe has views of two sizes).
OVERRIDABLE = ("scale", "ratio", "flip_p", "jitter", "jitter_p", "grayscale_p", "blur_p", "blur_sigma",
               "solarize_p")


def check_view_overrides(overrides: dict) -> None:
    """Raise ValueError naming `views` and the key when `overrides` is not a valid set of ViewSpec
    augmentation fields (OVERRIDABLE) with valid values."""
    if not isinstance(overrides, dict):
        raise ValueError(f"views: expected a mapping of view fields, got {overrides!r}")
    unknown = sorted(k for k in overrides if k not in OVERRIDABLE)
    if unknown:
        raise ValueError(f"views: unknown key(s) {', '.join(map(repr, unknown))}; "
                         f"valid keys: {', '.join(OVERRIDABLE)}")
    try:
        replace(ViewSpec(), **_as_fields(overrides))
    except (TypeError, ValueError) as e:
        raise ValueError(f"views: {e}") from None


def _as_fields(overrides: dict) -> dict:
    """YAML lists (pairs, jitter strengths) as the tuples ViewSpec holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}


def with_view_overrides(recipe: Recipe, overrides: dict) -> Recipe:
    """`recipe` with the ViewSpec fields in `overrides` (see check_view_overrides) replaced in every view."""
    if not overrides:
        return recipe
    check_view_overrides(overrides)
    return replace(recipe, views=[replace(v, **_as_fields(overrides)) for v in recipe.views])


BUILDERS = {"mocov2": mocov2, "mocov3": mocov3, "dino": dino, "mae": mae, "rotnet": rotnet,
            "instdisc": instdisc, "context": context, "colorization": colorization, "eval": eval}

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "Recipe", "ViewSpec", "colorization", "context", "dino", "eval",
           "instdisc", "mae", "mocov2", "mocov3", "rotnet", "BUILDERS", "OVERRIDABLE", "check_view_overrides",
           "with_view_overrides"]
