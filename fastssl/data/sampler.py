"""Resampling of long-tailed (multi-)label data for weakly supervised pretraining.

Modes, after Mahajan et al. 2018 ("Exploring the Limits of Weakly Supervised
Pretraining", the Instagram study) and Singh et al. 2022 (SWAG). With n_c the
number of images carrying label c and L_i the labels of image i:

- ``natural``: the data as it is: each epoch is a random permutation of the images.
- ``uniform``: pick a label uniformly among the labels present, then an image carrying it:
  P(i) = (1/C') * sum_{c in L_i} 1/n_c  (C' = number of labels present).
- ``sqrt``: weight w_i = mean_{c in L_i} n_c^-1/2. For single-label data a class then gets a
  share n_c * n_c^-1/2 / Z = sqrt(n_c) / sum_c' sqrt(n_c'): square-root resampling.
- ``inverse_sqrt`` (SWAG): the same n_c^-1/2 image weight, and images carrying a label with
  n_c < rare_threshold are upsampled by rare_factor. Without rare_threshold it equals ``sqrt``.

Weighted modes draw with replacement. An epoch is num_samples draws (rounded up to a
multiple of world_size); rank r takes draws r, r + world_size, ... so the ranks' shares
are disjoint and together are the whole epoch. Draws depend only on (seed, epoch).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import Sampler

from fastssl.data.labels import LabelTable
from fastssl.data.order import stream_indices
from fastssl.validation import check_int

MODES = ("natural", "uniform", "sqrt", "inverse_sqrt")


def _check_labels(labels: object, need_nonempty: bool) -> list[list[int]]:
    if isinstance(labels, LabelTable):
        labels = labels.labels
    if isinstance(labels, (str, bytes)) or not isinstance(labels, Sequence):
        raise TypeError(
            f"labels must be a list of label-index lists (one per image), got {type(labels).__name__}"
        )
    if len(labels) == 0:
        raise ValueError("labels must hold at least one image, got an empty list")
    out = []
    for i, row in enumerate(labels):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"labels[{i}] must be a list of label indices, got {type(row).__name__}")
        ids = []
        for c in row:
            if isinstance(c, bool) or not isinstance(c, int):
                raise TypeError(f"labels[{i}] must hold ints, got {c!r} ({type(c).__name__})")
            if c < 0:
                raise ValueError(f"labels[{i}] must hold label indices >= 0, got {c}")
            ids.append(c)
        if need_nonempty and not ids:
            raise ValueError(f"labels[{i}] is empty: label-based sampling needs at least one label per image")
        out.append(sorted(set(ids)))
    return out


def label_counts(labels: Sequence[Sequence[int]], num_classes: int | None = None) -> torch.Tensor:
    """n_c: how many images carry each label (an image counts once per distinct label). int64 [C]."""
    flat = torch.tensor([c for row in labels for c in set(row)], dtype=torch.int64)
    size = max(num_classes or 0, int(flat.max()) + 1 if flat.numel() else 0)
    return torch.bincount(flat, minlength=size)


class ResamplingSampler(Sampler[int]):
    """A DDP-aware, reproducible sampler over images with (multi-)label lists.

    Args:
        labels: one list of label indices per image, or a LabelTable (expand hierarchies / add
            noise first).
        mode: "natural" | "uniform" | "sqrt" | "inverse_sqrt" (see the module docstring).
        num_samples: draws per epoch over all ranks (default: the number of images).
        seed: base seed; epoch e draws from seed and e only.
        rank, world_size: this process's share of each epoch.
        rare_threshold: inverse_sqrt only: a label carried by fewer than this many images is rare.
        rare_factor: weight multiplier for images carrying a rare label.
    """

    def __init__(
        self,
        labels: Sequence[Sequence[int]],
        mode: str = "sqrt",
        *,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        rare_threshold: float | None = None,
        rare_factor: float = 100,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        rows = _check_labels(labels, need_nonempty=mode != "natural")
        if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, int)
                                        or num_samples < 1):
            raise ValueError(f"num_samples must be a positive int or None, got {num_samples!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be an int >= 0, got {seed!r}")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        if rare_threshold is not None:
            if mode != "inverse_sqrt":
                raise ValueError(f"rare_threshold applies to mode='inverse_sqrt' only, got mode={mode!r}")
            if not math.isfinite(rare_threshold) or rare_threshold <= 0:
                raise ValueError(f"rare_threshold must be a positive image count, got {rare_threshold!r}")
        if not math.isfinite(rare_factor) or rare_factor <= 0:
            raise ValueError(f"rare_factor must be a positive finite number, got {rare_factor!r}")

        self.mode = mode
        self.num_images = len(rows)
        self.num_samples = num_samples if num_samples is not None else self.num_images
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.rare_threshold, self.rare_factor = rare_threshold, float(rare_factor)
        self.epoch = 0
        # Each rank gets the same count; the epoch is padded with extra draws, not repeats.
        self.samples_per_rank = math.ceil(self.num_samples / world_size)
        self.counts = label_counts(rows)
        self.probabilities = None if mode == "natural" else self._image_probabilities(rows)
        # Inverse-CDF sampling: float64 so that tiny probabilities of huge datasets survive.
        self._cdf = None if self.probabilities is None else torch.cumsum(self.probabilities, 0)

    def _image_probabilities(self, rows: list[list[int]]) -> torch.Tensor:
        counts = self.counts.to(torch.float64)
        flat = torch.tensor([c for row in rows for c in row], dtype=torch.int64)
        owner = torch.repeat_interleave(torch.tensor([len(row) for row in rows], dtype=torch.int64))
        if self.mode == "uniform":
            per_label = 1.0 / counts[flat]
            weights = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, owner, per_label)
        else:
            per_label = counts[flat].rsqrt()
            k = torch.tensor([len(row) for row in rows], dtype=torch.float64)
            weights = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, owner, per_label) / k
            if self.rare_threshold is not None:
                rare_label = counts < self.rare_threshold
                has_rare = torch.zeros(len(rows), dtype=torch.bool)
                has_rare[owner[rare_label[flat]]] = True
                weights = torch.where(has_rare, weights * self.rare_factor, weights)
        return weights / weights.sum()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch __iter__ draws (call before each epoch, as with DistributedSampler)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def epoch_indices(self) -> torch.Tensor:
        """All ranks' draws of the current epoch, int64 [samples_per_rank * world_size]."""
        total = self.samples_per_rank * self.world_size
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        if self.mode == "natural":
            rounds = math.ceil(total / self.num_images)
            perms = [torch.randperm(self.num_images, generator=g) for _ in range(rounds)]
            return torch.cat(perms)[:total]
        u = torch.rand(total, generator=g, dtype=torch.float64) * self._cdf[-1]
        # clamp: u can round onto the last cdf value, which searchsorted(right) puts one past the end.
        return torch.searchsorted(self._cdf, u, right=True).clamp_(max=self.num_images - 1)

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return self.samples_per_rank


class StreamResampler:
    """Resampling on a stream of shards, by per-sample repeat factors (Gupta et al. 2019,
    LVIS's repeat-factor sampling; the stream form of ResamplingSampler's modes).

    Sample i of the labelled ones gets the factor r_i = N * P(i), with P(i) the image
    probability of `mode` (ResamplingSampler's; r_i = 1 for "natural") and N the number of
    labelled samples; each epoch it appears floor(r_i) + Bernoulli(frac(r_i)) times, drawn
    from (seed, epoch), so its expected frequency is P(i). The repeated stream goes through
    order.stream_indices (seeded shard order, shuffle buffer), is cut or wrapped to N
    samples so every epoch has the same length, and is split across ranks by stride.

    rows: label rows of the samples `index` (dataset indices of the labelled samples);
    shard_of: the shard of every dataset sample. excluded: (name, reason) of samples left
    out for having no label, counted by the loader as skipped.
    """

    def __init__(self, rows: Sequence[Sequence[int]], index: Sequence[int], shard_of, mode: str = "sqrt", *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, buffer_size: int = 10_000,
                 rare_threshold: float | None = None, rare_factor: float = 100,
                 excluded: Sequence[tuple[str, str]] = ()):
        import numpy as np

        base = ResamplingSampler(rows, mode, seed=seed, rank=rank, world_size=world_size,
                                 rare_threshold=rare_threshold, rare_factor=rare_factor)
        index = np.asarray(index, dtype=np.int64)
        if len(index) != len(rows):
            raise ValueError(f"index must give one dataset index per row ({len(rows)}), got {len(index)}")
        self.shard_of = np.asarray(shard_of, dtype=np.int64)
        self.factors = np.zeros(len(self.shard_of), dtype=np.float64)
        self.factors[index] = 1.0 if base.probabilities is None else base.probabilities.numpy() * len(index)
        self.mode, self.seed, self.rank, self.world_size = mode, seed, rank, world_size
        self.buffer_size, self.length = buffer_size, len(index)
        self.counts = base.counts
        self.excluded = list(excluded)
        self.epoch = 0

    def repeats(self, epoch: int):
        """How often each dataset sample appears in `epoch`'s stream, int64 [len(shard_of)]."""
        import numpy as np

        whole = np.floor(self.factors)
        u = np.random.default_rng([self.seed, epoch, 1]).random(len(self.factors))
        return (whole + (u < self.factors - whole)).astype(np.int64)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch __iter__ streams."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        order = stream_indices(self.shard_of, epoch=self.epoch, seed=self.seed, shard_id=self.rank,
                               num_shards=self.world_size, buffer_size=self.buffer_size,
                               repeats=self.repeats(self.epoch), length=self.length)
        return iter(order.tolist())

    def __len__(self) -> int:
        return self.length // self.world_size


class SubsetSampler:
    """Each epoch a seeded permutation of the dataset indices `index` (the samples that can be
    trained on), cut to a multiple of world_size and split across ranks by stride. excluded:
    (name, reason) of the samples left out (an image without a caption), counted by the loader
    as skipped."""

    def __init__(self, index: Sequence[int], *, seed: int = 0, rank: int = 0, world_size: int = 1,
                 excluded: Sequence[tuple[str, str]] = ()):
        self.index = torch.as_tensor(list(index), dtype=torch.int64)
        self.world_size = check_int("world_size", world_size, low=1)
        self.rank = check_int("rank", rank, low=0, high=self.world_size - 1)
        self.seed = check_int("seed", seed, low=0)
        if len(self.index) < self.world_size:
            raise ValueError(f"index: expected at least world_size={world_size} samples, "
                             f"got {len(self.index)}")
        self.excluded = list(excluded)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch __iter__ draws."""
        self.epoch = check_int("epoch", epoch, low=0)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = self.index[torch.randperm(len(self.index), generator=g)][: len(self) * self.world_size]
        return iter(order[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        return len(self.index) // self.world_size
