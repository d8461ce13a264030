"""Image sources: where the pixels come from, independent of the augmentation backend.

A source has a length, int64 labels (-1 when unknown) and either encoded image files
(`kind == "encoded"`: ImageFolderSource, FileListSource; decoded by DALI's decoder or
torchvision.io) or decoded uint8 pixels in memory (`kind == "array"`: ArraySource,
Fashion-MNIST), which DALI receives through `fn.external_source`.
"""

from __future__ import annotations

import functools
import gzip
import io
import os
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def decode_error(image: str | bytes | np.ndarray) -> str | None:
    """Why `image` (a path, or encoded bytes) cannot be decoded (None when it decodes), by
    fully decoding it with PIL, which catches truncated files that a header check would accept."""
    from PIL import Image

    if not isinstance(image, str):
        image = io.BytesIO(bytes(image))
    try:
        with Image.open(image) as img:
            img.load()
    except Exception as exc:  # PIL raises many types for broken files; all mean "skip or report"
        return f"{type(exc).__name__}: {exc}"
    return None


def read_each(read, indices) -> list:
    """read(i) for each index, or the OSError it raised in that slot."""
    out = []
    for i in indices:
        try:
            out.append(read(int(i)))
        except OSError as exc:
            out.append(exc)
    return out


_PNG = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the IEND chunk: length 0, type, CRC
_OTHER_MAGIC = (b"II*\x00", b"MM\x00*", b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xffO\xffQ",
                *(b"P%d" % k for k in range(1, 7)))  # TIFF, JPEG 2000 (file, codestream), PNM
FRAME_HEAD, FRAME_TAIL = 64, 1024  # bytes of an image file frame_error looks at


def _frame_error(head: bytes, tail: bytes, size: int) -> str | None:
    if size == 0:
        return "empty file"
    if head.startswith(_PNG):
        ihdr = head[8:33]
        if len(ihdr) < 25 or ihdr[:8] != b"\x00\x00\x00\rIHDR":
            return "PNG without its IHDR header chunk"
        if zlib.crc32(ihdr[4:21]) != int.from_bytes(ihdr[21:25], "big"):
            return "PNG header chunk fails its CRC"
        return None if tail.endswith(_PNG_END) else f"PNG truncated: no IEND chunk at its end ({size} bytes)"
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else f"JPEG truncated: no end-of-image marker ({size} bytes)"
    if head.startswith(b"BM"):
        declared = int.from_bytes(head[2:6], "little")
        return None if declared <= size else f"BMP truncated: {size} of {declared} bytes"
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        declared = int.from_bytes(head[4:8], "little") + 8
        return None if declared <= size else f"WebP truncated: {size} of {declared} bytes"
    if head.startswith(_OTHER_MAGIC):
        return None
    return f"not an image file (starts with {head[:8]!r})"


def frame_error(image: str | bytes | np.ndarray) -> str | None:
    """Why `image` (a path, or encoded bytes) is certainly not a decodable image (None when its
    frame is whole): a known signature, PNG's header chunk and CRC and its IEND end chunk, JPEG's
    end-of-image marker, BMP's and WebP's declared sizes. It reads the first FRAME_HEAD and last
    FRAME_TAIL bytes only, so every sample is checked before a decoder sees it: DALI's decoders
    can crash the process (SIGSEGV) on a truncated or garbage file instead of raising. Damage
    inside a whole frame is left to the decoder (decode_error names it)."""
    if not isinstance(image, str):
        data = bytes(image) if not isinstance(image, np.ndarray) else image
        return _frame_error(bytes(data[:FRAME_HEAD]), bytes(data[-FRAME_TAIL:]), len(data))
    try:
        with open(image, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(FRAME_HEAD)
            f.seek(max(0, size - FRAME_TAIL))
            tail = f.read(FRAME_TAIL)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    return _frame_error(head, tail, size)


class _FileSource:
    kind = "encoded"

    def __init__(self, paths: list[str], labels: list[int], skip_corrupt: bool, what: str):
        if skip_corrupt:
            bad = [(p, err) for p in paths if (err := decode_error(p)) is not None]
            if bad:
                bad_set = {p for p, _ in bad}
                shown = "; ".join(f"{p} ({err})" for p, err in bad[:10])
                warnings.warn(
                    f"{what}: skipping {len(bad)} undecodable file(s): {shown}"
                    + (" ..." if len(bad) > 10 else ""),
                    stacklevel=3,
                )
                keep = [i for i, p in enumerate(paths) if p not in bad_set]
                paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        if not paths:
            raise ValueError(f"{what}: no images found")
        self.paths = paths
        self.labels = np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, i: int) -> np.ndarray:
        """The encoded file i as a 1-D uint8 array."""
        return np.fromfile(self.paths[i], dtype=np.uint8)

    def read_many(self, indices) -> list[np.ndarray | OSError]:
        """read_bytes of each sample, or the OSError that reading it raised, in order."""
        return read_each(self.read_bytes, indices)

    def name(self, i: int) -> str:
        """Sample i as logs and errors name it: its path."""
        return self.paths[i]

    def subset(self, indices) -> _FileSource:
        """A source of the samples at `indices` (held-out splits), labels and classes kept."""
        out = object.__new__(type(self))
        out.__dict__ |= self.__dict__
        out.paths = [self.paths[int(i)] for i in indices]
        out.labels = self.labels[np.asarray(indices, dtype=np.int64)]
        return out


class ImageFolderSource(_FileSource):
    """Images under `root/<class>/...`, labels by sorted class-folder name (as
    torchvision's ImageFolder). skip_corrupt=True decodes every file once up front and
    skips (with a warning naming them) those that fail; otherwise a broken file raises
    an error naming it when the loader reaches it."""

    def __init__(self, root: str | os.PathLike, *, extensions: tuple[str, ...] = IMAGE_EXTENSIONS,
                 skip_corrupt: bool = False):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"root must be a directory of class folders, got {str(root)!r}")
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir())
        if not self.classes:
            raise ValueError(f"root {str(root)!r} has no class sub-folders")
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            for dirpath, _, files in sorted(os.walk(root / name, followlinks=True)):
                for f in sorted(files):
                    if f.lower().endswith(extensions):
                        paths.append(os.path.join(dirpath, f))
                        labels.append(label)
        super().__init__(paths, labels, skip_corrupt, f"ImageFolderSource({str(root)!r})")


class FileListSource(_FileSource):
    """Images listed in a text file, one `path label` per line (label an int; relative
    paths are relative to `root`, default the list file's folder; blank lines and lines
    starting with # are ignored)."""

    def __init__(self, list_file: str | os.PathLike, *, root: str | os.PathLike | None = None,
                 skip_corrupt: bool = False):
        list_file = Path(list_file)
        if not list_file.is_file():
            raise ValueError(f"list_file must be an existing file, got {str(list_file)!r}")
        base = Path(root) if root is not None else list_file.parent
        paths, labels = [], []
        for n, line in enumerate(list_file.read_text().splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            try:
                if len(parts) != 2:
                    raise ValueError
                label = int(parts[1])
            except ValueError:
                raise ValueError(
                    f"{list_file}:{n}: expected '<path> <int label>', got {line!r}"
                ) from None
            paths.append(str(base / parts[0]))
            labels.append(label)
        super().__init__(paths, labels, skip_corrupt, f"FileListSource({str(list_file)!r})")


class ArraySource:
    """In-memory uint8 images [N, H, W] (grayscale, made 3-channel) or [N, H, W, 3],
    with optional int labels [N] (-1 when None) and the names of their classes."""

    kind = "array"

    def __init__(self, images: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor | None = None,
                 classes: Sequence[str] = ()):
        if isinstance(images, torch.Tensor):
            images = images.cpu().numpy()
        if not isinstance(images, np.ndarray):
            raise TypeError(f"images must be a numpy array or torch tensor, got {type(images).__name__}")
        if images.dtype != np.uint8:
            raise TypeError(f"images must be uint8, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)) or images.shape[0] == 0:
            raise ValueError(
                f"images must have shape [N, H, W] or [N, H, W, 3] with N > 0, got {list(images.shape)}"
            )
        n = images.shape[0]
        if labels is None:
            labels = np.full(n, -1, dtype=np.int64)
        if isinstance(labels, torch.Tensor):
            labels = labels.cpu().numpy()
        labels = np.asarray(labels)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be integers of shape [{n}], got {labels.dtype} {list(labels.shape)}"
            )
        self.images = np.ascontiguousarray(images)
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return self.images.shape[0]

    def name(self, i: int) -> str:
        """Sample i as logs and errors name it."""
        return f"array item {i}"

    @property
    def grayscale(self) -> bool:
        return self.images.ndim == 3

    def image(self, i: int) -> np.ndarray:
        """Image i as HWC uint8 with 3 channels."""
        img = self.images[i]
        return np.repeat(img[:, :, None], 3, axis=2) if img.ndim == 2 else img


def _read_idx(path: Path, magic: int, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if int.from_bytes(data[:4], "big") != magic:
        raise ValueError(f"{path}: not an IDX file with magic {magic:#x}")
    dims = [int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range((header - 4) // 4)]
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ArraySource:
    """Fashion-MNIST (Xiao et al. 2017) from Debian's `dataset-fashion-mnist` IDX files:
    train = 60,000 and test = 10,000 grayscale 28x28 images (yielded as 3 channels),
    labels 0..9. root defaults to /usr/share/datasets/fashion-mnist."""
    prefixes = {"train": "train", "test": "t10k", "t10k": "t10k"}
    if split not in prefixes:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root if root is not None else FASHION_MNIST_ROOT)
    img_path = root / f"{prefixes[split]}-images-idx3-ubyte.gz"
    lbl_path = root / f"{prefixes[split]}-labels-idx1-ubyte.gz"
    for p in (img_path, lbl_path):
        if not p.is_file():
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found. Install Debian's package: "
                "`apt-get update && apt-get install dataset-fashion-mnist`, or pass root= "
                "a folder holding the four *-ubyte.gz IDX files."
            )
    images = _read_idx(img_path, 0x803, 16)
    labels = _read_idx(lbl_path, 0x801, 8)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{img_path} has {images.shape[0]} images but {lbl_path} has {labels.shape[0]} labels"
        )
    return ArraySource(images, labels, classes=FASHION_MNIST_CLASSES)



COLOUR_SHAPES = "colour-shapes"
COLOUR_SHAPES_SIZES = {"train": 10_000, "test": 2_000}
SHAPE_CLASSES = ("disc", "square", "triangle", "ring", "cross", "horizontal bar", "vertical bar", "diamond",
                 "half disc", "frame")


def colour_shapes(split: str = "train", size: int = 32) -> ArraySource:
    """A generated colour data set (no download): `size` px RGB images of one of 10 shapes
    (SHAPE_CLASSES, the label), each class painted in its own hue (class c: hue c / 10, +-0.03,
    saturation and value in [0.6, 1]) at a random position and scale, on a dull background of
    random hue with per-pixel noise. Deterministic: the same split is the same array on every
    machine (train 10,000 images from seed 0, test 2,000 from seed 1). Shape gives kNN its classes;
    shape tells colour, which is what colorization can learn from lightness alone."""
    if split not in COLOUR_SHAPES_SIZES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return _colour_shapes(split, size)


@functools.cache
def _colour_shapes(split: str, size: int) -> ArraySource:
    n = COLOUR_SHAPES_SIZES[split]
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = rng.integers(0, len(SHAPE_CLASSES), n)
    radius = rng.uniform(0.22, 0.36, n)[:, None, None] * size
    centre = rng.uniform(0.38, 0.62, (n, 2))[:, :, None, None] * size
    grid = np.arange(size, dtype=np.float64) + 0.5
    dy, dx = (grid[None, :, None] - centre[:, 0]) / radius, (grid[None, None, :] - centre[:, 1]) / radius
    r2, box = dy ** 2 + dx ** 2, np.maximum(abs(dy), abs(dx))
    shapes = (lambda y, x, r2, box: r2 <= 1, lambda y, x, r2, box: box <= 0.8,
              lambda y, x, r2, box: (y <= 0.8) & (abs(x) <= (y + 1) / 2),
              lambda y, x, r2, box: (r2 <= 1) & (r2 >= 0.4),
              lambda y, x, r2, box: (np.minimum(abs(y), abs(x)) <= 0.3) & (box <= 1),
              lambda y, x, r2, box: (abs(y) <= 0.35) & (abs(x) <= 1),
              lambda y, x, r2, box: (abs(x) <= 0.35) & (abs(y) <= 1),
              lambda y, x, r2, box: abs(y) + abs(x) <= 1, lambda y, x, r2, box: (r2 <= 1) & (y >= 0),
              lambda y, x, r2, box: (box <= 0.9) & (box >= 0.6))
    mask = np.zeros((n, size, size, 1), dtype=bool)
    for c, shape in enumerate(shapes):
        k = labels == c
        mask[k, :, :, 0] = shape(dy[k], dx[k], r2[k], box[k])
    hue = (labels / len(SHAPE_CLASSES) + rng.uniform(-0.03, 0.03, n)) % 1
    fg = _hsv_to_rgb(hue, rng.uniform(0.6, 1, n), rng.uniform(0.6, 1, n))[:, None, None]
    bg = _hsv_to_rgb(rng.uniform(0, 1, n), rng.uniform(0, 0.25, n), rng.uniform(0.2, 0.9, n))[:, None, None]
    noise = rng.normal(0, 0.04, (n, size, size, 1))
    images = np.where(mask, fg, bg + noise)
    return ArraySource(np.clip(np.round(images * 255), 0, 255).astype(np.uint8), labels)


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    k = (np.array([5.0, 3.0, 1.0]) + h[:, None] * 6) % 6
    return v[:, None] - v[:, None] * s[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


def fill_skipped(items: list, ok: list[bool]) -> list:
    """The batch with each failed slot (ok False) taken by a good item of the same batch,
    cycling through them, so a bad sample never changes a batch's size (every rank keeps
    its step count). Raises ValueError when no item of the batch is good."""
    good = [it for it, fine in zip(items, ok) if fine]
    if not good:
        raise ValueError(f"every sample of a batch of {len(items)} failed to load")
    fill = iter(good * len(items))
    return [it if fine else next(fill) for it, fine in zip(items, ok)]


__all__ = ["COLOUR_SHAPES", "SHAPE_CLASSES", "ArraySource", "FileListSource", "ImageFolderSource",
           "colour_shapes", "decode_error", "fashion_mnist", "fill_skipped", "frame_error", "read_each"]
