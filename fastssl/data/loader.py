"""build_loader: epochs of augmented views from a source, by DALI or torchvision.

Which samples an epoch holds and in what order is decided here, once, for both
backends: a per-epoch permutation from seed + epoch (torch.randperm, as
torch.utils.data.DistributedSampler), split across shards by stride, then cut into
batches; for WebDataset shards a streaming order (stream_indices: shards shuffled per
epoch, read in order through a seeded shuffle buffer), or in the resampled mode
(samples_per_epoch given) shards drawn with replacement per rank (resampled_indices); or
the indices an external sampler (the weak-supervision samplers) gives for the epoch. The
backend only turns planned batches into views. A resumed epoch starts at a planned batch:
skipped batches are never read or decoded.

Bad samples (undecodable image, unreadable bytes, and what a source left out when it was
indexed) never end a run: the backend fills the slot with another sample of the batch,
the loader counts and logs each one by name, and raises a ValueError once more than
max_skipped_fraction of the epoch's samples were skipped on this rank.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from fastssl.data import dali as _dali
from fastssl.data.masking import BlockMasks
from fastssl.data.order import resampled_indices, stream_indices
from fastssl.data.recipes import Recipe
from fastssl.data.shards import ShardSource
from fastssl.data.sources import ArraySource, FileListSource, ImageFolderSource
from fastssl.data.torchvision_views import TorchvisionViews
from fastssl.validation import check_choice, check_int

logger = logging.getLogger("fastssl.data")

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shard_indices(n: int, *, epoch: int, seed: int, shard_id: int, num_shards: int, shuffle: bool = True,
                  drop_last: bool = True) -> np.ndarray:
    """This shard's dataset indices for one epoch, as DistributedSampler: a permutation
    of range(n) from seed + epoch (identity when shuffle is False), trimmed to a multiple
    of num_shards (drop_last) or padded by wrapping around, then every num_shards-th
    element from shard_id. Shards are disjoint when nothing is padded."""
    if shuffle:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(n, generator=g).numpy()
    else:
        order = np.arange(n)
    if drop_last:
        order = order[: n - n % num_shards]
    elif n % num_shards:
        pad = num_shards - n % num_shards
        order = np.concatenate([order, np.resize(order, pad)])
    return order[shard_id::num_shards].astype(np.int64)


class Loader:
    """Epochs of {"views": [Tensor[B, 3, h, w], ...], "label": Tensor[B], "index": Tensor[B]}.

    Each `iter(loader)` runs one epoch, the next one each time (start with set_epoch(e)
    to resume, set_epoch(e, start=k) to resume at batch k); len(loader) is the number of
    batches of the current epoch. skipped_samples: bad samples skipped on this rank so far
    (those the source left out when indexed count on shard 0 only, once). With `masking` (a
    fastssl.data.masking.BlockMasks), each batch also carries its block masks, drawn on the CPU
    from (seed, epoch, shard, batch number) and sent to the views' device without a host sync."""

    def __init__(self, source, recipe: Recipe, impl, *, batch_size: int, seed: int, shard_id: int,
                 num_shards: int, drop_last: bool, shuffle: bool, sampler, shuffle_buffer: int = 0,
                 max_skipped_fraction: float = 0.001, samples_per_epoch: int | None = None,
                 masking: BlockMasks | None = None):
        self.source, self.recipe, self.impl, self.masking = source, recipe, impl, masking
        self.batch_size, self.seed, self.shard_id, self.num_shards = batch_size, seed, shard_id, num_shards
        self.drop_last, self.shuffle, self.sampler = drop_last, shuffle, sampler
        self.shuffle_buffer, self.max_skipped_fraction = shuffle_buffer, max_skipped_fraction
        self.samples_per_epoch = samples_per_epoch
        self.epoch, self.start = 0, 0
        self._plan_cache: tuple[int, list[np.ndarray]] | None = None
        left_out = list(getattr(source, "skipped", []))
        # A sampler's excluded samples (no known tag) are counted as skipped but are not damage.
        excluded = list(getattr(sampler, "excluded", []))
        self.skipped_samples = len(left_out) + len(excluded) if shard_id == 0 else 0
        if excluded and shard_id == 0:
            logger.warning("fastssl.data: %d sample(s) skipped by the sampler, e.g. %s (%s)", len(excluded),
                           *excluded[0])
        total = len(source) + len(left_out)
        if len(left_out) > max_skipped_fraction * total:
            raise ValueError(self._too_many(len(left_out), total, left_out, "of the dataset's samples"))

    def _too_many(self, count: int, total: int, examples: list[tuple[str, str]], what: str) -> str:
        shown = "; ".join(f"{name} ({why})" for name, why in examples[:5])
        return (f"{count} of {total} {what} are bad (more than max_skipped_fraction="
                f"{self.max_skipped_fraction}), e.g. {shown}; repair or remove them, or raise "
                "max_skipped_fraction")

    @property
    def kind(self) -> str:
        """"dali" or "torchvision": which loader makes the views."""
        return self.impl.name

    @property
    def device(self) -> torch.device:
        return self.impl.device

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch the next iteration runs (resume), from its batch `start` (a mid-epoch
        resume: the batches before it are not read); later iterations follow from it."""
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        self.epoch, self.start = epoch, start

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """The dataset indices this shard sees in `epoch`, in order (before batching)."""
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)
            idx = np.fromiter((int(i) for i in self.sampler), dtype=np.int64)
            if idx.size and (idx.min() < 0 or idx.max() >= len(self.source)):
                raise ValueError(
                    f"sampler gave index {int(idx.min() if idx.min() < 0 else idx.max())} outside "
                    f"[0, {len(self.source)}) in epoch {epoch}"
                )
            return idx
        if self.samples_per_epoch is not None:
            indices, _ = resampled_indices(self.source.shard_of, epoch=epoch, seed=self.seed,
                                           shard_id=self.shard_id, buffer_size=self.shuffle_buffer,
                                           num_samples=self.samples_per_epoch // self.num_shards)
            return indices
        if isinstance(self.source, ShardSource) and self.shuffle:
            return stream_indices(self.source.shard_of, epoch=epoch, seed=self.seed, shard_id=self.shard_id,
                                  num_shards=self.num_shards, buffer_size=self.shuffle_buffer,
                                  drop_last=self.drop_last)
        return shard_indices(len(self.source), epoch=epoch, seed=self.seed, shard_id=self.shard_id,
                             num_shards=self.num_shards, shuffle=self.shuffle, drop_last=self.drop_last)

    def plan(self, epoch: int) -> list[np.ndarray]:
        """The batches (arrays of dataset indices) of `epoch`."""
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            idx = self.epoch_indices(epoch)
            stop = len(idx) - len(idx) % self.batch_size if self.drop_last else len(idx)
            self._plan_cache = (epoch, [idx[s: s + self.batch_size] for s in range(0, stop, self.batch_size)])
        return self._plan_cache[1]

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self) -> Iterator[dict]:
        epoch, start = self.epoch, self.start
        batches = self.plan(epoch)
        self.epoch, self.start = epoch + 1, 0
        views = self.impl.iterate(epoch, batches, start)
        if self.masking is not None:
            views = self._with_masks(views, epoch, start)
        return self._count_skips(views, epoch, sum(len(b) for b in batches))

    def _with_masks(self, batches: Iterator[dict], epoch: int, start: int) -> Iterator[dict]:
        pinned = self.device.type == "cuda"
        for number, batch in enumerate(batches, start):
            drawn = self.masking.for_batch(len(batch["index"]), epoch=epoch, shard=self.shard_id,
                                           batch=number)
            for key, value in drawn.items():
                if isinstance(value, torch.Tensor):
                    value = (value.pin_memory() if pinned else value).to(self.device, non_blocking=True)
                batch[key] = value
            yield batch

    def _count_skips(self, batches: Iterator[dict], epoch: int, epoch_samples: int) -> Iterator[dict]:
        seen: list[tuple[str, str]] = []
        for batch in batches:
            for name, why in batch.pop("skipped", ()):
                logger.warning("fastssl.data: skipped %s (%s)", name, why)
                seen.append((name, why))
                self.skipped_samples += 1
            if len(seen) > self.max_skipped_fraction * epoch_samples:
                raise ValueError(self._too_many(len(seen), epoch_samples, seen,
                                                f"samples of epoch {epoch} on shard {self.shard_id}"))
            yield batch

    def __repr__(self) -> str:
        resampled = f", resampled: {self.samples_per_epoch} samples/epoch" if self.samples_per_epoch else ""
        return (f"Loader(kind={self.kind!r}, device={str(self.device)!r}, recipe={self.recipe.name!r}, "
                f"views={self.recipe.view_sizes}, batch_size={self.batch_size}, "
                f"shard={self.shard_id}/{self.num_shards}, samples={len(self.source)}{resampled})")


LOADERS = ("dali", "torchvision", "auto")


def resolve_loader(loader: str = "auto", device: str | torch.device = "auto", *,
                   train_device: torch.device | None = None) -> tuple[str, str | torch.device]:
    """The one rule for a run's loader choices: (loader, device) with "auto" resolved.

    loader: "dali", "torchvision" or "auto" (DALI when it imports, torchvision otherwise);
    "dali" without DALI installed raises ImportError saying how to install it. device: where
    the views are made, "gpu", "cpu", "cuda[:n]" (returned as given) or "auto": "gpu" when the
    run trains on CUDA (`train_device`; None: when CUDA is available), "cpu" otherwise."""
    check_choice("loader", loader, LOADERS)
    if loader == "auto":
        loader = "dali" if _dali.HAS_DALI else "torchvision"
    if loader == "dali" and not _dali.HAS_DALI:
        raise ImportError(
            "loader='dali' but NVIDIA DALI is not installed: `pip install fastssl[dali]` "
            "(nvidia-dali-cuda130, Linux x86_64), or pass loader='torchvision'"
        )
    if str(device) == "auto":
        cuda = torch.cuda.is_available() if train_device is None else train_device.type == "cuda"
        device = "gpu" if cuda else "cpu"
    return loader, device


def _resolve_device(device: str | torch.device) -> torch.device:
    name = str(device)
    if name in ("gpu", "cuda") or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} needs CUDA, which is not available; pass device='cpu'")
        dev = torch.device("cuda" if name == "gpu" else name)
        return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"device must be 'gpu', 'cpu', 'auto' or 'cuda[:n]', got {device!r}")


def _check_int(name: str, value, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def build_loader(source, recipe: Recipe, *, batch_size: int, loader: str = "dali", device: str = "gpu",
                 num_threads: int = 4, shard_id: int = 0, num_shards: int = 1, seed: int = 0,
                 drop_last: bool = True, shuffle: bool = True, sampler=None,
                 dtype: torch.dtype = torch.float32, shuffle_buffer: int = 10_000,
                 max_skipped_fraction: float = 0.001, samples_per_epoch: int | None = None,
                 masking: BlockMasks | None = None) -> Loader:
    """A loader of augmented views (see `Loader`) for `recipe` over `source`.

    loader: "dali" (DALI pipeline, CPU operators for device="cpu", nvJPEG + GPU operators
    for device="gpu"), "torchvision" (transforms.v2 in `num_threads` DataLoader workers) or
    "auto" (DALI when installed); the choice is logged and exposed as `Loader.kind`.
    shard_id / num_shards: DDP rank / world size (disjoint shards, per-epoch reshuffle from
    seed + epoch). sampler: optional object with set_epoch(e) and __iter__ giving this
    shard's dataset indices for the epoch; it replaces the built-in shuffle and sharding.
    shuffle=False keeps dataset order (feature extraction). dtype: float32, float16 or bfloat16.
    shuffle_buffer: a ShardSource's shuffle buffer (samples; see stream_indices).
    max_skipped_fraction: bad samples are skipped and counted (see the module docstring) up
    to this fraction of an epoch's samples on this rank; beyond it a ValueError names them.
    samples_per_epoch: the resampled mode for a ShardSource (open_clip's --dataset-resampled
    with --train-num-samples): each rank draws shards with replacement from (seed, epoch,
    rank) and an epoch is samples_per_epoch samples over all ranks; None (default): every
    sample once per epoch.
    masking: a BlockMasks whose masks each batch carries (see `Loader`).
    Views are [B, 3, size, size] normalized with the recipe's mean/std, on the output device."""
    if not isinstance(source, ArraySource | ImageFolderSource | FileListSource | ShardSource):
        raise TypeError(f"source must be an ArraySource, ImageFolderSource, FileListSource or ShardSource, "
                        f"got {type(source).__name__}")
    if not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a fastssl.data.recipes.Recipe, got {type(recipe).__name__}")
    _check_int("batch_size", batch_size, 1)
    _check_int("num_threads", num_threads, 1)
    _check_int("num_shards", num_shards, 1)
    _check_int("seed", seed, 0)
    if not isinstance(shard_id, int) or isinstance(shard_id, bool) or not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be an int in [0, num_shards={num_shards}), got {shard_id!r}")
    _check_int("shuffle_buffer", shuffle_buffer, 0)
    if not isinstance(max_skipped_fraction, int | float) or not 0.0 <= max_skipped_fraction <= 1.0:
        raise ValueError(f"max_skipped_fraction must be a number in [0, 1], got {max_skipped_fraction!r}")
    if dtype not in _DTYPES:
        raise TypeError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
    if sampler is not None and not (hasattr(sampler, "set_epoch") and hasattr(sampler, "__iter__")):
        raise TypeError(f"sampler must have set_epoch(epoch) and __iter__, got {type(sampler).__name__}")
    if samples_per_epoch is not None:
        check_int("samples_per_epoch", samples_per_epoch, low=num_shards)
        if not isinstance(source, ShardSource) or sampler is not None or not shuffle:
            raise ValueError("samples_per_epoch (the resampled mode) draws WebDataset shards: give a "
                             "ShardSource, no sampler and shuffle=True, or leave samples_per_epoch None")
    if masking is not None and not isinstance(masking, BlockMasks):
        raise TypeError(f"masking must be a fastssl.data.masking.BlockMasks or None, got "
                        f"{type(masking).__name__}")
    name, device = resolve_loader(loader, device)
    dev = _resolve_device(device)
    impl_class = _dali.DaliViews if name == "dali" else TorchvisionViews
    impl = impl_class(source, recipe, device=dev, num_threads=num_threads, seed=seed, shard_id=shard_id,
                      dtype=dtype, max_batch=batch_size)
    built = Loader(source, recipe, impl, batch_size=batch_size, seed=seed, shard_id=shard_id,
                   num_shards=num_shards, drop_last=drop_last, shuffle=shuffle, sampler=sampler,
                   shuffle_buffer=shuffle_buffer, max_skipped_fraction=max_skipped_fraction,
                   samples_per_epoch=samples_per_epoch, masking=masking)
    if len(built) == 0:
        raise ValueError(
            f"batch_size={batch_size} with drop_last={drop_last} leaves no batch: this shard has "
            f"{len(built.epoch_indices(0))} samples"
        )
    logger.info("fastssl.data: %r (requested loader=%r, device=%r)", built, loader, device)
    return built
