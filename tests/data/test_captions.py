"""Captions as data: captions files (CSV / JSON lines, by path or index), a captions file beside an
image folder, synthetic captions from class names, `fastssl shards` keeping captions as KEY.txt, and
the samples left out of training when their caption is missing."""

import json

import numpy as np
import pytest
from PIL import Image

from fastssl.data import ArraySource, ImageFolderSource, ShardSource
from fastssl.data.captions import (
    CAPTION_TEMPLATES,
    FASHION_MNIST_SYNONYMS,
    read_captions,
    source_captions,
    synthetic_captions,
)
from fastssl.data.sampler import SubsetSampler
from fastssl.data.shards import FASHION_MNIST_CLASSES, shard_dataset


@pytest.fixture
def folder(tmp_path):
    for k, cls in enumerate(["cat", "cat", "dog", "dog"]):
        (tmp_path / "img" / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(tmp_path / "img" / cls / f"{k}.png")
    return tmp_path / "img"


def test_captions_files_by_path_and_index(folder, tmp_path):
    source = ImageFolderSource(folder)
    (folder / "captions.csv").write_text('path,caption\ncat/0.png,"a cat, sleeping"\ndog/3.png,  \n'
                                         "other/9.png,not in this split\ndog/2.png,a dog\n")
    assert source_captions(source, data=str(folder)) == ["a cat, sleeping", None, "a dog", None]
    lines = [{"index": 2, "caption": "two"}, {"index": 0, "caption": 5}, {"index": 1, "caption": "one"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    assert read_captions(tmp_path / "c.jsonl", num_items=4) == [None, "one", "two", None]  # 5: not a text
    bad = {"a.csv": ("file,text\nx,y\n", "expected the header 'path,caption' or 'index,caption'"),
           "b.csv": ("index,caption\n1,a\n1,b\n", "sample 1 is captioned twice"),
           "c.csv": ("index,caption\n9,a\n", "index 9 does not name one of the source's 4 samples"),
           "d.csv": ("path,caption\nnowhere.png,a\n", "names none of the source's 4 samples"),
           "e.jsonl": ('{"caption": "a"}\n', 'one of "path"/"index"')}
    for name, (text, message) in bad.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=message):
            read_captions(tmp_path / name, paths=source.paths if name == "d.csv" else None, num_items=4)
    with pytest.raises(ValueError, match="carries no captions; expected shards"):
        source_captions(ArraySource(np.zeros((2, 4, 4), np.uint8)), data="fashion-mnist")


def test_synthetic_captions_name_the_class_or_a_stated_fraction_of_others():
    labels = np.arange(2000) % 10
    captions, named = synthetic_captions(labels, FASHION_MNIST_CLASSES, noise=0.2, seed=3)
    again, named_again = synthetic_captions(labels, FASHION_MNIST_CLASSES, noise=0.2, seed=3)
    assert again == captions and (named_again == named).all()  # seeded
    assert abs((named != labels).mean() - 0.2) < 0.03
    for caption, k in zip(captions[:200], named[:200]):
        words = FASHION_MNIST_SYNONYMS[FASHION_MNIST_CLASSES[k]]
        assert any(t.format(w) == caption for t in CAPTION_TEMPLATES for w in words), caption
    clean, named = synthetic_captions(labels, ["a_b", "c"] * 5, noise=0.0)
    assert (named == labels).all() and "a b" in clean[0]
    with pytest.raises(ValueError, match="caption_noise must be"):
        synthetic_captions(labels, FASHION_MNIST_CLASSES, noise=1.5)


def test_shards_keep_captions_and_the_missing_are_left_out(folder, tmp_path):
    (folder / "captions.jsonl").write_text('{"path": "cat/1.png", "caption": "a cat"}\n'
                                           '{"path": "dog/3.png", "caption": "a dog"}\n')
    shard_dataset(str(folder), tmp_path / "shards", shard_size=3)
    source = ShardSource(str(tmp_path / "shards"))
    assert source.captions() == [None, "a cat", None, "a dog"]
    assert (source.labels == [0, 0, 1, 1]).all()
    ranks = [SubsetSampler([1, 3, 5], rank=r, world_size=2, seed=7) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    drawn = [list(s) for s in ranks]
    assert [len(d) for d in drawn] == [1, 1] and set(drawn[0] + drawn[1]) < {1, 3, 5}
    assert drawn[0] != drawn[1]  # the ranks' shares are disjoint
