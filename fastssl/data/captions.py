"""Captions as data: each sample's text for image-text methods (CLIP, SigLIP).

Where a sample's caption comes from (`source_captions`):

- shards: KEY.txt, else the "caption" field of KEY.json (img2dataset writes both);
- an image folder: a captions file beside it, ROOT/captions.csv or ROOT/captions.jsonl;
- a captions file named by the run: CSV with a header `path,caption` or `index,caption`, or JSON
  lines {"path": ..., "caption": ...} / {"index": ..., "caption": ...}; paths are matched like a
  labels file's (the same path, or a trailing part of it at a folder boundary);
- "synthetic": text made from each image's class by templates with synonyms, a stated fraction
  naming another class (noisy captions); for data that has class labels and no captions.

A missing caption (no .txt, an empty or non-text value, a sample the file does not name) is
None: the sample is left out of training and counted as skipped, as a bad sample is.

Tokenizing is open_clip's `SimpleTokenizer` (CLIP's byte-pair encoding, its 49,408-token
vocabulary shipped inside the open-clip-torch package): nothing is downloaded.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
import torch

from fastssl.data.labels import _PathIndex, keyed_json_rows

CAPTION_FILES = ("captions.csv", "captions.jsonl")
SYNTHETIC = "synthetic"

# Fashion-MNIST's classes as a shopper might name them; the class's own name comes first.
FASHION_MNIST_SYNONYMS = {
    "T-shirt/top": ("t-shirt", "tee", "top", "tank top"),
    "Trouser": ("trouser", "trousers", "pants", "jeans", "slacks"),
    "Pullover": ("pullover", "sweater", "jumper", "sweatshirt"),
    "Dress": ("dress", "gown", "frock", "sundress"),
    "Coat": ("coat", "jacket", "parka", "overcoat"),
    "Sandal": ("sandal", "sandals", "flip-flop", "slide"),
    "Shirt": ("shirt", "blouse", "button-down shirt", "flannel shirt"),
    "Sneaker": ("sneaker", "sneakers", "trainer", "running shoe"),
    "Bag": ("bag", "handbag", "purse", "tote"),
    "Ankle boot": ("ankle boot", "boot", "bootie", "chelsea boot"),
}
# Caption templates of the synthetic captions (not the zero-shot prompts, which eval holds).
CAPTION_TEMPLATES = ("a {}", "my new {}", "{} for sale", "product shot of a {}", "a {} on a plain background",
                     "black and white picture of a {}", "close-up of the {}", "look at this {}!",
                     "selling my old {}, barely worn", "the {} i bought yesterday")


def clean_caption(value: object) -> str | None:
    """A caption's text with surrounding whitespace removed; None for an empty or non-text value."""
    if not isinstance(value, str):
        return None
    text = value.strip()
    return text or None


def _caption_rows(path: Path) -> list[tuple[str, object, object]]:
    """(where, key, caption) per row of a captions file; key is an int index or a path string."""
    rows: list[tuple[str, object, object]] = []
    if path.suffix in (".jsonl", ".json"):
        return [(f"{path}:{lineno}", key, obj.get("caption"))
                for lineno, key, obj in keyed_json_rows(path, "caption")]
    if path.suffix != ".csv":
        raise ValueError(f"captions file must end in .csv or .jsonl, got {path.name!r}")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        header = [c.strip().lower() for c in next(reader, [])]
        if header[:2] not in (["path", "caption"], ["index", "caption"]):
            raise ValueError(f"{path}:1: expected the header 'path,caption' or 'index,caption', got {header}")
        for lineno, cells in enumerate(reader, 2):
            if not any(c.strip() for c in cells):
                continue
            key: object = cells[0].strip()
            if header[0] == "index":
                if not key.isdigit():
                    raise ValueError(f"{path}:{lineno}: expected an integer index, got {cells[0]!r}")
                key = int(key)
            rows.append((f"{path}:{lineno}", key, cells[1] if len(cells) > 1 else None))
    return rows


def read_captions(path: str | Path, *, paths: Sequence[str] | None = None, num_items: int | None = None
                  ) -> list[str | None]:
    """One caption per sample (None where the file names none) from a captions file (see the
    module docstring). paths: the source's file paths, for path keys; num_items: its size, for
    index keys. Rows naming files the source does not hold are ignored (one file may caption
    several splits); a file that names none of the source's samples is an error."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"captions: expected a captions file (.csv or .jsonl), got {str(path)!r} "
                         "(no such file)")
    n = len(paths) if paths is not None else num_items
    if n is None:
        raise ValueError("read_captions: pass the source's paths or num_items")
    index = _PathIndex(paths) if paths is not None else None
    out: list[str | None] = [None] * n
    matched = 0
    for where, key, caption in _caption_rows(path):
        if isinstance(key, bool) or not isinstance(key, (int, str)):
            raise ValueError(f"{where}: a key must be a path or an integer index, got {key!r}")
        if isinstance(key, int):
            if paths is not None or not 0 <= key < n:
                raise ValueError(f"{where}: index {key} does not name one of the source's {n} samples")
            i = key
        else:
            if index is None:
                raise ValueError(f"{where}: path key {key!r} but the source has no file paths; key rows "
                                 f"by index")
            i = index.by_suffix.get(Path(key).as_posix())
            if i is None:
                continue
            if i < 0:
                raise ValueError(f"{where}: path {key!r} matches several of the source's files; give more "
                                 "of it")
        if out[i] is not None:
            raise ValueError(f"{where}: sample {key!r} is captioned twice")
        out[i] = clean_caption(caption)
        matched += 1
    if not matched:
        raise ValueError(f"captions: {str(path)!r} names none of the source's {n} samples")
    return out


def captions_beside(root: str | Path) -> Path | None:
    """ROOT/captions.csv or ROOT/captions.jsonl when an image folder has one (the first found)."""
    for name in CAPTION_FILES:
        if (Path(root) / name).is_file():
            return Path(root) / name
    return None


def synthetic_captions(labels: Sequence[int], class_names: Sequence[str], *, noise: float = 0.0, seed: int = 0
                       ) -> tuple[list[str], np.ndarray]:
    """Captions made from class labels: template and synonym drawn per sample; a `noise`
    fraction name a uniformly drawn other class. Returns (captions, the class each names).
    Synonyms: FASHION_MNIST_SYNONYMS for its classes, else the class name itself."""
    from fastssl.validation import check_number

    check_number("caption_noise", noise, low=0, high=1)
    labels = np.asarray(labels, dtype=np.int64)
    c = len(class_names)
    if c < 2 or labels.min(initial=0) < 0 or labels.max(initial=0) >= c:
        raise ValueError(f"synthetic captions need class labels in [0, {c}) of >= 2 named classes; "
                         f"got labels {int(labels.min(initial=0))}..{int(labels.max(initial=0))}")
    rng = np.random.default_rng([seed, 28])
    named = labels.copy()
    noisy = rng.random(len(labels)) < noise
    named[noisy] = (labels[noisy] + rng.integers(1, c, int(noisy.sum()))) % c  # any other class, uniformly
    words = [FASHION_MNIST_SYNONYMS.get(name, (name.lower().replace("_", " "),)) for name in class_names]
    template = rng.integers(0, len(CAPTION_TEMPLATES), len(labels))
    pick = rng.random(len(labels))
    captions = [CAPTION_TEMPLATES[t].format(words[k][int(u * len(words[k]))])
                for k, t, u in zip(named.tolist(), template.tolist(), pick.tolist())]
    return captions, named


def class_names_of(source) -> list[str]:
    """The class names of a source (an image folder's, a shard manifest's, a built-in set's), or []."""
    return list(getattr(source, "classes", None) or [])


def source_captions(source, captions: str = "", *, data: str = "", noise: float = 0.0, seed: int = 0
                    ) -> list[str | None]:
    """Each sample's caption (None where it has none), by the `captions` setting: "" the data's
    own (shards' .txt / .json; a captions file beside the image folder `data`), a captions
    file, or "synthetic" (from the class labels, with `noise` and `seed`)."""
    n = len(source)
    if captions == SYNTHETIC:
        names = class_names_of(source)
        if not names:
            raise ValueError("captions=synthetic: the data has no class names to caption (Fashion-MNIST, "
                             "an image folder's classes or a shard manifest's class_names)")
        return list(synthetic_captions(source.labels, names, noise=noise, seed=seed)[0])
    if not captions and hasattr(source, "captions"):
        return source.captions()
    file = Path(captions) if captions else (captions_beside(data) if data and Path(data).is_dir() else None)
    if file is None:
        raise ValueError(f"captions: {data or 'the data'!r} carries no captions; expected shards with .txt / "
                         f".json captions, a captions.csv / captions.jsonl beside the image folder, "
                         f"captions=FILE, or captions=synthetic (class-name templates)")
    return read_captions(file, paths=getattr(source, "paths", None), num_items=n)


@cache
def tokenizer(context_length: int):
    """open_clip's SimpleTokenizer (CLIP's BPE, vocabulary inside the package). Its module is loaded
    by itself: open_clip's package __init__ imports every model and hub client (seconds)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        raise ImportError("the CLIP tokenizer needs open-clip-torch: pip install -e '.[clip]'")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_tokenizer", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.SimpleTokenizer(context_length=context_length)


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """int64 [len(texts), context_length] token ids: start token, BPE tokens, end token (the
    largest id, where CLIP pools), zero padding; longer texts are cut and keep the end token.
    Equal texts are encoded once."""
    tok = tokenizer(context_length)
    unique = list(dict.fromkeys(texts))
    rows = tok(unique) if unique else torch.zeros(0, context_length, dtype=torch.long)
    where = {t: k for k, t in enumerate(unique)}
    return rows[[where[t] for t in texts]] if texts else rows


__all__ = ["CAPTION_FILES", "CAPTION_TEMPLATES", "FASHION_MNIST_SYNONYMS", "SYNTHETIC", "captions_beside",
           "class_names_of", "clean_caption", "read_captions", "source_captions", "synthetic_captions",
           "tokenize", "tokenizer"]
