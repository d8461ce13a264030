"""The torchvision.transforms.v2 backend: the same recipes with the same ranges and
probabilities, for machines without DALI (macOS, Windows) or by choice.

A torch DataLoader with `num_threads` worker processes makes uint8 views per sample;
the main process converts and normalizes whole batches (on the output device, so a
GPU run moves uint8, a quarter of the float bytes). Each batch's randomness is seeded
from (seed, epoch, shard, position in the epoch), so batches do not depend on the number
of workers and resuming at epoch e reproduces epoch e.
"""

from __future__ import annotations

import functools
import io
import math
import os
import signal
import weakref
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from fastssl.data.lifetime import die_with_parent
from fastssl.data.recipes import Recipe, ViewSpec
from fastssl.data.sources import fill_skipped, frame_error


def view_transform(v: ViewSpec) -> v2.Transform:
    """RGB PIL image -> uint8 CHW tensor view, without normalization.

    Crop, resize and color ops run on the PIL image and the rest on the tensor: v2 has
    kernels for both, and that split was measured 20-35% faster per view (32 and 224 px)
    than all-tensor, mostly from PIL's ColorJitter."""
    if v.crop == "center":
        return v2.Compose([v2.Resize(v.resize_to, antialias=True), v2.CenterCrop(v.size), v2.PILToTensor()])
    ops: list[v2.Transform] = [v2.RandomResizedCrop(v.size, scale=v.scale, ratio=v.ratio, antialias=True)]
    if v.jitter_p > 0 and any(v.jitter):
        b, c, s, h = v.jitter
        ops.append(v2.RandomApply([v2.ColorJitter(b, c, s, h)], p=v.jitter_p))
    if v.grayscale_p > 0:
        ops.append(v2.RandomGrayscale(p=v.grayscale_p))
    ops.append(v2.PILToTensor())
    if v.blur_p > 0:
        # A window of +-3 sigma (as DALI picks), kept odd and within reflect padding limits.
        kernel = min(2 * math.ceil(3 * v.blur_sigma[1]) + 1, 2 * v.size - 1)
        ops.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=v.blur_sigma)], p=v.blur_p))
    if v.solarize_p > 0:
        ops.append(v2.RandomSolarize(threshold=128, p=v.solarize_p))
    if v.flip_p > 0:
        ops.append(v2.RandomHorizontalFlip(p=v.flip_p))
    return v2.Compose(ops)


class _ViewsDataset(Dataset):
    """Item (epoch, position, dataset index) -> (list of uint8 views, label, index)."""

    def __init__(self, source, recipe: Recipe, seed: int, shard_id: int):
        self.source, self.recipe, self.seed, self.shard_id = source, recipe, seed, shard_id
        self.transforms = [view_transform(v) for v in recipe.views]

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, i: int, data: np.ndarray | OSError | None) -> Image.Image:
        if self.source.kind == "array":
            return Image.fromarray(self.source.image(i))
        if isinstance(data, OSError):
            raise data
        if (err := frame_error(data)) is not None:  # the same check DALI's readers make
            raise ValueError(err)
        with Image.open(io.BytesIO(data.tobytes())) as img:
            return img.convert("RGB")

    def _views(self, i: int, data: np.ndarray | OSError | None):
        img = self._load(i, data)
        if self.recipe.rotations:
            base = self.transforms[0](img)
            return [torch.rot90(base, k, dims=(-2, -1)) for k in self.recipe.rotations]
        return [t(img) for t in self.transforms]

    def __getitems__(self, keys: list[tuple[int, int, int]]):
        """One batch and its skipped samples [(name, reason)]; torch's DataLoader calls this
        instead of per-item __getitem__ and hands the pair to _collate."""
        epoch, position, _ = keys[0]
        # Runs in a worker process (never the caller's), so reseeding the global RNG that
        # v2 transforms draw from is private to the loader. Once per batch: reseeding
        # costs more than augmenting a 32x32 image.
        torch.manual_seed(hash((self.seed, epoch, self.shard_id, position)) % (2**63 - 1))
        items, skipped = [], []
        # Encoded bytes for the whole batch in one call: a remote source requests them together.
        indices = [i for _, _, i in keys]
        data = self.source.read_many(indices) if self.source.kind == "encoded" else [None] * len(keys)
        for i, raw in zip(indices, data):
            try:
                items.append((self._views(i, raw), int(self.source.labels[i]), i))
            except Exception as exc:  # PIL and file errors come in many types; all mean "skip this sample"
                items.append(None)
                skipped.append((self.source.name(i), f"{type(exc).__name__}: {exc}"))
        return fill_skipped(items, [it is not None for it in items]), skipped

    def __getitem__(self, key: tuple[int, int, int]):
        return self.__getitems__([key])[0][0]


class _EpochBatches:
    """Batch sampler whose batches are replaced each epoch (workers stay alive)."""

    def __init__(self):
        self.batches: list[list[tuple[int, int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _collate(batch):
    items, skipped = batch
    views = [torch.stack([it[0][k] for it in items]) for k in range(len(items[0][0]))]
    label = torch.tensor([it[1] for it in items], dtype=torch.int64)
    index = torch.tensor([it[2] for it in items], dtype=torch.int64)
    return views, label, index, skipped


def _init_worker(parent_pid: int, worker_id: int) -> None:
    """Workers end with the main process (die_with_parent: torch's own check of the parent
    runs only between batches, every 5 s at best) and leave Ctrl-C, SIGTERM and SIGUSR1 (sent to
    the whole process group, or to every process of a job) to the main process, which finishes
    its step and checkpoints (the Trainer); a worker killed by one would fail that step. They
    are shut down through their queues instead (_release_workers), since multiprocessing's exit
    handler stops them with the SIGTERM they ignore."""
    die_with_parent(parent_pid)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _release_workers(loader: DataLoader) -> None:
    # Dropping the persistent iterator sends each worker its stop sentinel and joins it.
    loader._iterator = None


class TorchvisionViews:
    """Runs the recipe with torchvision.transforms.v2 in `num_threads` worker processes."""

    name = "torchvision"

    def __init__(self, source, recipe: Recipe, *, device: torch.device, num_threads: int, seed: int,
                 shard_id: int, dtype: torch.dtype, max_batch: int):
        self.device, self.dtype, self.recipe = device, dtype, recipe
        self.batch_sampler = _EpochBatches()
        self.loader = DataLoader(
            _ViewsDataset(source, recipe, seed, shard_id), batch_sampler=self.batch_sampler,
            num_workers=num_threads, collate_fn=_collate, persistent_workers=True,
            worker_init_fn=functools.partial(_init_worker, os.getpid()),
            pin_memory=device.type == "cuda", prefetch_factor=2,
        )
        # when this object goes, or at interpreter exit before multiprocessing's own exit handler
        weakref.finalize(self, _release_workers, self.loader)
        self.mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(recipe.std, device=device).view(1, 3, 1, 1) * 255.0)

    def iterate(self, epoch: int, batches: list[np.ndarray], start: int = 0) -> Iterator[dict]:
        """Views of batches[start:]; a batch's randomness depends on its position in the
        epoch, so a resumed epoch repeats an uninterrupted one exactly."""
        first = np.cumsum([0] + [len(b) for b in batches])
        self.batch_sampler.batches = [
            [(epoch, int(first[n] + k), int(i)) for k, i in enumerate(b)]
            for n, b in enumerate(batches) if n >= start
        ]
        for views, label, index, skipped in self.loader:
            views = [
                ((v.to(self.device, non_blocking=True).float() - self.mean) * self.inv_std).to(self.dtype)
                for v in views
            ]
            # Pinned by the DataLoader on CUDA, so these copies do not block the host.
            yield {"views": views, "label": label.to(self.device, non_blocking=True),
                   "index": index.to(self.device, non_blocking=True), "skipped": skipped}
