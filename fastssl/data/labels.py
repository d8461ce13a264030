"""Multi-label annotations for weakly supervised pretraining (hashtags, JFT-style labels).

Files:

- Vocabulary: a text file with one label string per line; a label's id is its line's
  position (0-based) among the file's lines. Blank lines and duplicates are errors.
- Labels file, CSV (``.csv``) or JSON lines (``.jsonl``/``.json``): one row per item.
  CSV: ``key,label[,label...]`` (one label per column, an optional header whose first
  cell is ``path`` or ``index``). JSON lines: ``{"path": "a/b.jpg", "labels": ["dog", "cat"]}``
  or ``{"index": 12, "labels": [3, 7]}``. A key is an item index (array sources) or a
  path (image folders, file lists). Labels are vocabulary strings, or integer ids when no
  vocabulary is given. Every item must have exactly one row with at least one label.
- Parent map (label hierarchy): CSV rows ``child,parent[,parent...]``; each image's labels
  are expanded to all their ancestors (an image labelled "apple" is also "fruit"). The name
  ``wordnet`` instead of a file derives the map from WordNet for a vocabulary of synset
  names (fastssl.data.wordnet.wordnet_parent_map).

Errors name the file and line. Label noise (Mahajan et al. 2018, Sec. 3.1): a given
fraction of all label slots is replaced by labels drawn from the marginal label
distribution, never one the image already carries.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fastssl.data.wordnet import wordnet_parent_map


def load_vocabulary(path: str | Path) -> list[str]:
    """Label strings in id order, read from a one-label-per-line text file, or from a .json
    file holding a list of strings or {"tags": [...]} (as `fastssl vocab --out` writes)."""
    if str(path).endswith(".json"):
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
        tags = obj.get("tags") if isinstance(obj, dict) else obj
        if not isinstance(tags, list) or not tags or not all(isinstance(t, str) and t for t in tags):
            raise ValueError(f'{path}: expected a non-empty list of label strings or {{"tags": [...]}}')
        if len(set(tags)) != len(tags):
            raise ValueError(f"{path}: labels repeat (ids are list positions)")
        return tags
    names: list[str] = []
    seen: dict[str, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            name = line.strip()
            if not name:
                raise ValueError(f"{path}:{lineno}: blank line in the vocabulary (ids are line positions)")
            if name in seen:
                raise ValueError(f"{path}:{lineno}: label {name!r} repeats line {seen[name]}")
            seen[name] = lineno
            names.append(name)
    if not names:
        raise ValueError(f"{path}: the vocabulary file is empty")
    return names


def _label_ids(raw: Sequence, where: str, vocab: dict[str, int] | None, num_classes: int | None) -> list[int]:
    ids: list[int] = []
    for label in raw:
        if vocab is not None:
            if not isinstance(label, str) or label not in vocab:
                raise ValueError(
                    f"{where}: unknown label {label!r} (not in the vocabulary of {len(vocab)} labels)"
                )
            ids.append(vocab[label])
            continue
        try:
            c = int(label) if isinstance(label, (int, str)) and not isinstance(label, bool) else None
        except ValueError:
            c = None
        if c is None:
            raise ValueError(f"{where}: label {label!r} is not an integer id and no vocabulary was given")
        if c < 0 or (num_classes is not None and c >= num_classes):
            bound = num_classes if num_classes is not None else "inf"
            raise ValueError(f"{where}: label id {c} out of range [0, {bound})")
        ids.append(c)
    if not ids:
        raise ValueError(f"{where}: empty row: the item has no labels")
    return sorted(set(ids))


def keyed_json_rows(path: Path, field: str) -> list[tuple[int, object, dict]]:
    """(line number, key, object) per line of a JSON-lines file whose objects name their sample by
    "path" (a string) or "index" (an integer) and carry `field` (labels, a caption)."""
    out: list[tuple[int, object, dict]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not a JSON object ({e.msg})") from None
            if not isinstance(obj, dict) or ("path" in obj) == ("index" in obj):
                raise ValueError(f'{where}: expected an object with "{field}" and one of "path"/"index"')
            key = obj["path"] if "path" in obj else obj["index"]
            if "index" in obj and (isinstance(key, bool) or not isinstance(key, int)):
                raise ValueError(f'{where}: "index" must be an integer, got {key!r}')
            out.append((lineno, key, obj))
    return out


def _rows(path: Path) -> list[tuple[int, object, list]]:
    """(line number, key, raw labels) per row; key is an int index or a path string."""
    out: list[tuple[int, object, list]] = []
    if path.suffix in (".jsonl", ".json"):
        for lineno, key, obj in keyed_json_rows(path, "labels"):
            labels = obj.get("labels")
            if not isinstance(labels, list):
                raise ValueError(f'{path}:{lineno}: "labels" must be a list, got {labels!r}')
            out.append((lineno, key, labels))
        return out
    if path.suffix != ".csv":
        raise ValueError(f"labels file must end in .csv, .jsonl or .json, got {path.name!r}")
    with open(path, encoding="utf-8", newline="") as f:
        keyed_by = None
        for lineno, cells in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in cells]
            if not any(cells):
                continue
            if lineno == 1 and cells[0].lower() in ("path", "index"):
                keyed_by = cells[0].lower()
                continue
            if keyed_by is None:
                keyed_by = "index" if cells[0].isdigit() else "path"
            key: object = cells[0]
            if keyed_by == "index":
                if not cells[0].isdigit():
                    raise ValueError(f"{path}:{lineno}: expected an integer index, got {cells[0]!r}")
                key = int(cells[0])
            out.append((lineno, key, [c for c in cells[1:] if c]))
    return out


class _PathIndex:
    """Finds a labels-file path key among a source's file paths: the same path, or a path
    ending in the key at a folder boundary ("cat/1.jpg" matches "/data/train/cat/1.jpg")."""

    def __init__(self, paths: Sequence[str]):
        self.count = len(paths)
        self.by_suffix: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i, p in enumerate(paths):
            parts = Path(p).parts
            for j in range(len(parts)):
                suffix = Path(*parts[j:]).as_posix()
                if suffix in self.by_suffix and self.by_suffix[suffix] != i:
                    ambiguous.add(suffix)
                self.by_suffix.setdefault(suffix, i)
        for suffix in ambiguous:
            self.by_suffix[suffix] = -1

    def find(self, key: str, where: str) -> int:
        i = self.by_suffix.get(Path(key).as_posix(), None)
        if i is None:
            raise ValueError(f"{where}: path {key!r} is not in the source's {self.count} files")
        if i < 0:
            raise ValueError(f"{where}: path {key!r} matches several of the source's files; give more of it")
        return i


def multi_hot(labels: torch.Tensor | Sequence[Sequence[int]], num_classes: int, *,
              dtype: torch.dtype = torch.float32, name: str = "labels") -> torch.Tensor:
    """[N, C] multi-hot targets (1 on each of a row's labels, a repeated label counting once) from
    padded label rows [N, K] (int64, -1 = no label; on their device, ids not checked: no host sync)
    or from N lists of label indices (checked: an error names `name`'s row of an index outside [0, C))."""
    if isinstance(labels, torch.Tensor):
        valid = labels >= 0
        # scatter_add, not scatter: padding slots point at class 0 and must add nothing.
        dense = torch.zeros(labels.shape[0], num_classes, device=labels.device, dtype=dtype)
        return dense.scatter_add_(1, labels.clamp(min=0), valid.to(dtype)).clamp_(max=1)
    if not isinstance(labels, Sequence) or isinstance(labels, (str, bytes)):
        raise TypeError(f"{name} must be padded label rows (a tensor) or a list of label-index lists, "
                        f"got {type(labels).__name__}")
    rows, cols = [], []
    for row, ids in enumerate(labels):
        if not isinstance(ids, Sequence) or isinstance(ids, (str, bytes)):
            raise TypeError(f"{name}[{row}] must be a list of label indices, got {type(ids).__name__}")
        for label in ids:
            if not isinstance(label, int) or isinstance(label, bool):
                raise TypeError(f"{name}[{row}] must hold int label indices, got {label!r}")
            if not 0 <= label < num_classes:
                raise ValueError(f"{name}[{row}] holds label {label}, outside [0, {num_classes})")
        rows += [row] * len(ids)
        cols += list(ids)
    dense = torch.zeros(len(labels), num_classes, dtype=dtype)
    dense[torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)] = 1
    return dense


@dataclass
class LabelTable:
    """The label ids of every item of a dataset, in dataset order."""

    labels: list[list[int]]
    num_classes: int
    names: list[str] | None = None
    keys: list[object] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        for i, row in enumerate(self.labels):
            if not row:
                raise ValueError(f"item {i} has no labels")
            if min(row) < 0 or max(row) >= self.num_classes:
                raise ValueError(f"item {i} has label ids {row} outside [0, {self.num_classes})")

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_single_labels(cls, labels: Sequence[int] | torch.Tensor, num_classes: int | None = None,
                           names: list[str] | None = None) -> LabelTable:
        """One label per item (e.g. Fashion-MNIST's class), as a table of one-element rows."""
        ids = [int(c) for c in (labels.tolist() if isinstance(labels, torch.Tensor) else labels)]
        return cls([[c] for c in ids], num_classes if num_classes is not None else max(ids) + 1, names)

    def counts(self) -> torch.Tensor:
        """Images per label, int64 [C]."""
        flat = torch.tensor([c for row in self.labels for c in row], dtype=torch.int64)
        return torch.bincount(flat, minlength=self.num_classes)

    def padded(self) -> torch.Tensor:
        """int64 [N, K_max] label ids, -1 after each row's labels (feed rows of it to multi_hot)."""
        width = max(len(row) for row in self.labels)
        out = torch.full((len(self.labels), width), -1, dtype=torch.int64)
        for i, row in enumerate(self.labels):
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
        return out

    def reorder(self, paths: Sequence[str]) -> LabelTable:
        """The table in the order of a source's file `paths`, for a table read from a labels
        file keyed by path without the source's paths (keys matched as in read_labels)."""
        if self.keys is None:
            raise ValueError("reorder needs a table read from a path-keyed labels file (keys is None)")
        index = _PathIndex(paths)
        rows: list[list[int] | None] = [None] * len(paths)
        for row, (key, labels) in enumerate(zip(self.keys, self.labels)):
            item = index.find(str(key), f"labels row {row + 1}")
            if rows[item] is not None:
                raise ValueError(f"labels row {row + 1}: {paths[item]!r} already has a row")
            rows[item] = labels
        missing = [paths[i] for i, r in enumerate(rows) if r is None]
        if missing:
            raise ValueError(f"{len(missing)} of the source's files have no labels row, e.g. {missing[:5]}")
        return LabelTable(rows, self.num_classes, self.names, list(paths))

    def expand_hierarchy(self, parents: Mapping[int, int | Sequence[int]]) -> LabelTable:
        """A table whose rows also carry every ancestor of their labels."""
        for child, ps in parents.items():
            for c in [child, *([ps] if isinstance(ps, int) else ps)]:
                if not 0 <= c < self.num_classes:
                    raise ValueError(f"parent map uses label id {c}, outside [0, {self.num_classes})")
        return LabelTable(expand_hierarchy(self.labels, parents), self.num_classes, self.names, self.keys)

    def with_noise(self, fraction: float, *, seed: int, distribution: str = "marginal") -> LabelTable:
        """A table with `fraction` of all label slots replaced (see inject_label_noise)."""
        noisy = inject_label_noise(
            self.labels, fraction, self.num_classes, seed=seed, distribution=distribution
        )
        return LabelTable(noisy, self.num_classes, self.names, self.keys)


def read_labels(
    path: str | Path,
    *,
    vocabulary: str | Path | Sequence[str] | None = None,
    num_classes: int | None = None,
    num_items: int | None = None,
    paths: Sequence[str] | None = None,
) -> LabelTable:
    """Read a CSV / JSON-lines labels file into a LabelTable (see the module docstring).

    vocabulary: a vocabulary file or the list of label strings (id = position); without
    it labels are integer ids below num_classes (default: the largest id + 1).
    Index keys must lie in [0, num_items) (default num_items: the number of rows).
    Path keys are looked up in `paths` (the source's file list) when given; otherwise
    the file's row order is the dataset order and the table's `keys` keep the paths.
    """
    path = Path(path)
    names = None
    if vocabulary is not None:
        names = load_vocabulary(vocabulary) if isinstance(vocabulary, (str, Path)) else list(vocabulary)
        if num_classes is not None and num_classes != len(names):
            raise ValueError(f"num_classes={num_classes} disagrees with the vocabulary's {len(names)} labels")
        num_classes = len(names)
    vocab = None if names is None else {name: i for i, name in enumerate(names)}
    rows = _rows(path)
    if not rows:
        raise ValueError(f"{path}: the labels file has no rows")
    by_index = isinstance(rows[0][1], int)
    if paths is not None:
        position = _PathIndex(paths)
        num_items = len(paths)
    elif by_index and num_items is None:
        num_items = len(rows)
    table: list[list[int] | None] = [None] * (num_items if num_items is not None else len(rows))
    line_of: dict[int, int] = {}
    for row_number, (lineno, key, raw) in enumerate(rows):
        where = f"{path}:{lineno}"
        if isinstance(key, int) != by_index:
            raise ValueError(f"{where}: key {key!r} mixes {'indices' if by_index else 'paths'} and "
                             f"{'paths' if by_index else 'indices'} in one file")
        if by_index:
            if not 0 <= key < len(table):
                raise ValueError(f"{where}: index {key} out of range [0, {len(table)})")
            item = key
        elif paths is not None:
            item = position.find(key, where)
        else:
            item = row_number
        if item in line_of:
            raise ValueError(f"{where}: item {key!r} already labelled on line {line_of[item]}")
        line_of[item] = lineno
        table[item] = _label_ids(raw, where, vocab, num_classes)
    missing = [i for i, row in enumerate(table) if row is None]
    if missing:
        shown = missing[:5] if paths is None else [paths[i] for i in missing[:5]]
        raise ValueError(f"{path}: {len(missing)} item(s) have no row, e.g. {shown}")
    if num_classes is None:
        num_classes = max(max(row) for row in table) + 1
    keys = None if by_index or paths is not None else [key for _, key, _ in rows]
    return LabelTable(table, num_classes, names, keys)


def read_parent_map(path: str | Path, vocabulary: Sequence[str] | None = None) -> dict[int, list[int]]:
    """Read CSV rows ``child,parent[,parent...]`` (label strings, or ids without a vocabulary);
    path "wordnet": the parents WordNet gives the vocabulary's synset names."""
    if str(path) == "wordnet":
        return wordnet_parent_map(vocabulary)
    vocab = None if vocabulary is None else {name: i for i, name in enumerate(vocabulary)}
    num_classes = None if vocabulary is None else len(vocabulary)
    parents: dict[int, list[int]] = {}
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, cells in enumerate(csv.reader(f), 1):
            cells = [c.strip() for c in cells if c.strip()]
            if not cells:
                continue
            where = f"{path}:{lineno}"
            if len(cells) < 2:
                raise ValueError(f"{where}: expected 'child,parent[,parent...]', got {cells}")
            child = _label_ids(cells[:1], where, vocab, num_classes)[0]
            parents.setdefault(child, []).extend(_label_ids(cells[1:], where, vocab, num_classes))
    return parents


def expand_hierarchy(
    labels: Sequence[Sequence[int]], parents: Mapping[int, int | Sequence[int]]
) -> list[list[int]]:
    """Each row's labels plus all their ancestors under `parents` (child -> parent id(s)), sorted.

    The hierarchy may be a DAG (several parents); a cycle is an error."""
    ancestors: dict[int, frozenset[int]] = {}

    def visit(c: int, path: tuple[int, ...]) -> frozenset[int]:
        if c in ancestors:
            return ancestors[c]
        if c in path:
            cycle = " -> ".join(str(x) for x in (*path[path.index(c):], c))
            raise ValueError(f"the parent map has a cycle: {cycle}")
        ps = parents.get(c, ())
        ps = [ps] if isinstance(ps, int) else list(ps)
        out = frozenset(ps).union(*(visit(p, (*path, c)) for p in ps))
        ancestors[c] = out
        return out

    for c in parents:
        visit(c, ())
    return [sorted(set(row).union(*(ancestors.get(c, frozenset()) for c in row))) for row in labels]


def inject_label_noise(
    labels: Sequence[Sequence[int]],
    fraction: float,
    num_classes: int,
    *,
    seed: int,
    distribution: str = "marginal",
) -> list[list[int]]:
    """Replace round(fraction * total label slots) labels, chosen uniformly, by random labels.

    As in the Instagram study (Mahajan et al. 2018), a replacement is drawn from the marginal
    label distribution ("marginal": label frequency over the images) or uniformly
    ("uniform"), excluding the labels the image already carries, so every image keeps its
    number of distinct labels. Replaced slots keep their positions in the rows."""
    if not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0 or math.isnan(fraction):
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    if distribution not in ("marginal", "uniform"):
        raise ValueError(f"distribution must be 'marginal' or 'uniform', got {distribution!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2 for label noise, got {num_classes!r}")
    rows = [list(row) for row in labels]
    slots = [(i, j) for i, row in enumerate(rows) for j in range(len(row))]
    flat = np.array([c for row in rows for c in row], dtype=np.int64)
    if flat.size and (flat.min() < 0 or flat.max() >= num_classes):
        raise ValueError(f"labels must be ids in [0, {num_classes}), got ids {flat.min()}..{flat.max()}")
    if distribution == "marginal":
        weight = np.bincount(flat, minlength=num_classes).astype(np.float64)
    else:
        weight = np.ones(num_classes)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(slots))[: round(fraction * len(slots))]
    cdf = np.cumsum(weight)
    for s in sorted(chosen.tolist()):
        i, j = slots[s]
        taken = set(rows[i])
        if weight[list(taken)].sum() >= cdf[-1]:
            raise ValueError(f"cannot replace a label of item {i}: it carries every label of nonzero weight")
        while True:  # rejection sampling: the excluded labels are a few of the C
            c = int(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"))
            if c < num_classes and c not in taken:
                break
        rows[i][j] = c
    return rows
