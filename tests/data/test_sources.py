"""Sources: image folders, file lists, in-memory arrays and Fashion-MNIST."""

import gzip
import os

import numpy as np
import pytest
import torch
from PIL import Image

from fastssl.data import ArraySource, FileListSource, ImageFolderSource, fashion_mnist

FMNIST = "/usr/share/datasets/fashion-mnist"


def _write_folder(root, classes=("dog", "cat", "bird"), per_class=2, bad=None):
    rng = np.random.default_rng(0)
    for c in classes:
        os.makedirs(root / c, exist_ok=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    if bad is not None:
        (root / bad).write_bytes(b"\xff\xd8\xff this is not a jpeg")
    return root


def test_image_folder_labels_by_sorted_class(tmp_path):
    root = _write_folder(tmp_path)
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    src = ImageFolderSource(root)
    assert src.classes == ["bird", "cat", "dog"] and len(src) == 6
    assert src.kind == "encoded"
    for path, label in zip(src.paths, src.labels):
        assert os.path.basename(os.path.dirname(path)) == src.classes[label]
    raw = src.read_bytes(0)
    assert raw.dtype == np.uint8 and raw.tobytes() == open(src.paths[0], "rb").read()


def test_image_folder_skip_corrupt_warns_and_names_file(tmp_path):
    root = _write_folder(tmp_path, bad="cat/broken.jpg")
    assert len(ImageFolderSource(root)) == 7
    with pytest.warns(UserWarning, match="broken.jpg"):
        src = ImageFolderSource(root, skip_corrupt=True)
    assert len(src) == 6 and not any("broken" in p for p in src.paths)


def test_image_folder_bad_root(tmp_path):
    with pytest.raises(ValueError, match="root"):
        ImageFolderSource(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class sub-folders"):
        ImageFolderSource(tmp_path)


def test_file_list(tmp_path):
    _write_folder(tmp_path)
    lst = tmp_path / "list.txt"
    lst.write_text("# path label\ndog/0.png 3\n\ncat/1.png 7\n")
    src = FileListSource(lst)
    assert src.paths == [str(tmp_path / "dog/0.png"), str(tmp_path / "cat/1.png")]
    assert src.labels.tolist() == [3, 7] and src.labels.dtype == np.int64
    bad = tmp_path / "bad.txt"
    bad.write_text("dog/0.png 3\ncat/1.png seven\n")
    with pytest.raises(ValueError, match=r"bad.txt:2.*seven"):
        FileListSource(bad)
    with pytest.raises(ValueError, match="list_file"):
        FileListSource(tmp_path / "nope.txt")


def test_array_source_gray_and_rgb():
    gray = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    src = ArraySource(torch.from_numpy(gray), torch.tensor([5, 6]))
    assert src.kind == "array" and len(src) == 2 and src.labels.tolist() == [5, 6]
    img = src.image(1)
    assert img.shape == (3, 4, 3) and all((img[..., c] == gray[1]).all() for c in range(3))
    rgb = np.zeros((3, 5, 5, 3), np.uint8)
    assert ArraySource(rgb).labels.tolist() == [-1, -1, -1]


@pytest.mark.parametrize(
    "images, labels, exc, match",
    [
        (np.zeros((2, 4, 4), np.float32), None, TypeError, "uint8"),
        (np.zeros((2, 4, 4, 4), np.uint8), None, ValueError, r"\[N, H, W\]"),
        (np.zeros((0, 4, 4), np.uint8), None, ValueError, "N > 0"),
        (np.zeros((2, 4, 4), np.uint8), [1, 2, 3], ValueError, "labels"),
        (np.zeros((2, 4, 4), np.uint8), [0.5, 1.0], ValueError, "labels"),
        ([[1, 2]], None, TypeError, "images"),
    ],
)
def test_array_source_rejects(images, labels, exc, match):
    with pytest.raises(exc, match=match):
        ArraySource(images, labels)


def _write_idx(path, magic, arr):
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


def test_fashion_mnist_root_override_reads_idx(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", 0x803, images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x801, labels)
    src = fashion_mnist("test", root=tmp_path)
    assert np.array_equal(src.images, images) and src.labels.tolist() == [3, 1, 4, 1, 5]
    assert src.image(2).shape == (28, 28, 3)


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        fashion_mnist("val")


@pytest.mark.skipif(not os.path.isdir(FMNIST), reason="Debian package dataset-fashion-mnist not installed")
def test_fashion_mnist_system_files():
    train, test = fashion_mnist("train"), fashion_mnist("test")
    assert train.images.shape == (60000, 28, 28) and test.images.shape == (10000, 28, 28)
    # Fashion-MNIST is balanced: 6,000 / 1,000 images of each of its 10 classes.
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.grayscale and train.image(0).shape == (28, 28, 3)
    # Pixels as stored in the IDX file: bytes after the 16-byte header.
    with gzip.open(f"{FMNIST}/t10k-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert test.images[9999].tobytes() == raw[16 + 9999 * 784:]
