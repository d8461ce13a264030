"""A `--data` spec turned into the sources of each split (pretraining, kNN memory bank, test).

Specs, checked in this order:

- ``fashion-mnist``: pretrain on its 60,000 training images; kNN memory bank = the same,
  test = its 10,000 test images.
- ``colour-shapes``: a generated colour set (fastssl.data.sources.colour_shapes): pretrain on
  its 10,000 training images; kNN memory bank = the same, test = its 2,000 test images.
- WebDataset shards: a folder holding manifest.json (`fastssl shards`) or *.tar files
  (img2dataset), a brace pattern ``OUT/shard-{000000..000099}.tar`` or one .tar; the same
  over the network: ``http(s)://HOST/shard-{000000..000099}.tar``, a folder URL ending in
  "/" that holds manifest.json, or ``pipe:COMMAND`` (one command per shard of a brace
  pattern) whose output is a shard (fastssl.data.remote: retries, timeouts).
- An image folder ROOT: ROOT/train and ROOT/val (each ``<class>/<image>``): pretrain on
  train, kNN from train to val; the same with shard folders ROOT/train and ROOT/val;
  ROOT alone (class folders, or shards): a held-out slice is the test split.

The held-out slice (HOLDOUT_EVERY): within each class, in the source's order, every tenth
sample (positions 9, 19, 29, ...) is held out: never pretrained on, the kNN test split;
the rest is pretrained on and is the memory bank. Data without labels (img2dataset
shards) or with one class gets no kNN evaluation, and `notes` says why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fastssl.data.remote import RemoteOptions, is_url
from fastssl.data.shards import ShardSource, is_shard_spec
from fastssl.data.sources import COLOUR_SHAPES, ImageFolderSource, colour_shapes, fashion_mnist

FASHION_MNIST = "fashion-mnist"
HOLDOUT_EVERY = 10
SMALL_IMAGES, SMALL_PIXELS = 50_000, 64  # below either, ImageNet-sized defaults are the wrong start


@dataclass
class DataSplits:
    """Sources per split; train/test are None when the data cannot be evaluated (see notes)."""

    pretrain: object
    train: object | None
    test: object | None
    notes: list[str] = field(default_factory=list)  # decisions worth a log line (held-out slice, no kNN)

    def is_small(self) -> str | None:
        """Why the pretraining data is small (< 50k images or < 64 px shorter side), or None."""
        n = len(self.pretrain)
        px = _typical_side(self.pretrain)
        if n < SMALL_IMAGES or (px is not None and px < SMALL_PIXELS):
            return f"{n:,} images" + (f" of about {px} px" if px is not None else "")
        return None


def _typical_side(source) -> int | None:
    """Median shorter side of up to 16 images spread over the source (headers only)."""
    from PIL import Image

    if source.kind == "array":
        return int(min(source.images.shape[1:3]))
    sides = []
    for i in np.linspace(0, len(source) - 1, num=min(16, len(source))).astype(int):
        try:
            with Image.open(_as_file(source, int(i))) as img:
                sides.append(min(img.size))
        except Exception:  # a bad file is the loader's business (skipped and counted), not this estimate's
            continue
    return int(np.median(sides)) if sides else None


def _as_file(source, i: int):
    import io

    return source.paths[i] if hasattr(source, "paths") else io.BytesIO(source.read_bytes(i).tobytes())


def check_data_spec(spec: str) -> str:
    """`spec` when it names data this module can read, else a ValueError saying what was expected."""
    if "://" in spec and not is_url(spec):
        raise ValueError(f"--data: {spec.split('://')[0]}:// is not read directly, got {spec!r}; give "
                         "http(s):// URLs (public or signed) or a command that writes each shard to its "
                         "output, e.g. 'pipe:aws s3 cp s3://BUCKET/shard-{000000..000009}.tar -'")
    if spec in (FASHION_MNIST, COLOUR_SHAPES) or is_shard_spec(spec) or Path(spec).is_dir():
        return spec
    raise ValueError(f"--data: expected {FASHION_MNIST!r}, {COLOUR_SHAPES!r} or an existing image folder "
                     f"(class folders, or train/ + val/), a shard folder, a brace pattern of .tar shards, "
                     f"or http(s):// or pipe: shards, got {spec!r} (no such directory)")


def _open(path: Path):
    return ShardSource(path) if is_shard_spec(str(path)) else ImageFolderSource(path)


def holdout(source) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held out) sample indices: per class, every HOLDOUT_EVERY-th sample is held out."""
    labels = np.asarray(source.labels)
    rank = np.zeros(len(labels), dtype=np.int64)
    for c in np.unique(labels):
        where = np.flatnonzero(labels == c)
        rank[where] = np.arange(len(where))
    held = rank % HOLDOUT_EVERY == HOLDOUT_EVERY - 1
    return np.flatnonzero(~held), np.flatnonzero(held)


def data_splits(spec: str, *, remote: RemoteOptions | None = None) -> DataSplits:
    """The sources of `spec` per split (see the module docstring for the rules); remote:
    retries and timeouts for shards read over the network."""
    spec = check_data_spec(spec)
    if spec == FASHION_MNIST:
        train = fashion_mnist("train")
        return DataSplits(train, train, fashion_mnist("test"))
    if spec == COLOUR_SHAPES:
        train = colour_shapes("train")
        return DataSplits(train, train, colour_shapes("test"))
    if is_shard_spec(spec):
        return _held_out(ShardSource(spec, remote=remote), spec)
    root = Path(spec)
    if (root / "train").is_dir():
        train = _open(root / "train")
        if (root / "val").is_dir():
            return DataSplits(train, train, _open(root / "val"))
        return _held_out(train, f"{root / 'train'} (no {root / 'val'})")
    return _held_out(ImageFolderSource(root), spec)


def _held_out(source, where: str) -> DataSplits:
    labels = np.asarray(source.labels)
    classes = np.unique(labels[labels >= 0])
    if (labels < 0).any():
        return DataSplits(source, None, None, [f"{where}: samples without class labels: no kNN evaluation"])
    if len(classes) < 2:
        return DataSplits(source, None, None, [f"{where}: one class only: kNN accuracy would be 100% by "
                                               "construction; no kNN evaluation"])
    kept, held = holdout(source)
    note = (f"{where}: no val split; holding out every {HOLDOUT_EVERY}th image of each class "
            f"({len(held):,} images) as the kNN test split, pretraining on the other {len(kept):,}")
    train = source.subset(kept)
    return DataSplits(train, train, source.subset(held), [note])


__all__ = ["DataSplits", "FASHION_MNIST", "HOLDOUT_EVERY", "check_data_spec", "data_splits", "holdout"]
