"""WebDataset tar shards: indexing them, reading samples out of them (fastssl.data.shard_writer
writes them; `shard_dataset` here is `fastssl shards`).

Layout written by `write_shards` (and `fastssl shards`): OUT/shard-000000.tar, ... where
each sample is KEY.jpg or KEY.png (the image's encoded bytes, unchanged), KEY.cls (its
class index as ASCII) and KEY.json ({"path": source path or index, "tags": [...]}); one
OUT/shard-NNNNNN.idx per shard in the format DALI's `wds2idx` writes (so
`fn.readers.webdataset` can read the shards directly); OUT/manifest.json last.

Shards made by others are read as they are: img2dataset writes KEY.jpg + KEY.txt
(caption) + KEY.json (metadata) with no .cls and no manifest; samples are counted and
indexed from the tar headers. A sample's key is its member name up to the first dot of
the base name (webdataset's rule), members of one sample are adjacent in the tar.

`ShardSource` is an encoded-image source like ImageFolderSource: it knows every sample's
shard, key and the byte range of its image, and reads an image with one positioned read
(`os.pread`), so an epoch's order, rank shares and resume are planned by the loader for
both backends (see fastssl.data.order) and skipping consumed samples reads nothing.
Shards over the network (http(s) URLs, pipe: commands; fastssl.data.remote) are indexed
by reading each once when the source is opened, then read like local ones: one HTTP Range
request per image, so the planned order, rank shares and exact resume are the same.
"""

from __future__ import annotations

import glob
import io
import json
import os
import re
import tarfile
import warnings
from collections import Counter, OrderedDict
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from fastssl.data.remote import RemoteOptions, RemoteReader, RemoteReadError, is_url
from fastssl.data.sources import FASHION_MNIST_CLASSES, read_each
from fastssl.validation import check_int

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm", "tif", "tiff")
MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
OPEN_SHARDS = 64  # shard files a process keeps open (least recently read closed first)
SCAN_THREADS = 4  # remote shards fetched at once when a source is opened (each held whole while scanned)
FORMAT = "fastssl-webdataset-1"
_HASHTAG = re.compile(r"#(\w+)")


def split_member(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name: split at the first dot of the base name, as
    webdataset and DALI's wds2idx do ("a/b.c.jpg" -> ("a/b", "c.jpg"))."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:]


def expand_braces(pattern: str) -> list[str]:
    """Shard paths of a brace pattern "dir/shard-{000000..000099}.tar" (zero-padded ranges,
    as webdataset's braceexpand), or "{a,b}" alternatives; several groups multiply."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if m is None:
        return [pattern]
    body, head, tail = m.group(1), pattern[: m.start()], pattern[m.end():]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        lo, hi = int(r.group(1)), int(r.group(2))
        if hi < lo:
            raise ValueError(f"brace range {{{body}}} in {pattern!r} is empty (end < start)")
        width = len(r.group(1))
        items = [str(i).zfill(width) for i in range(lo, hi + 1)]
    elif "," in body:
        items = body.split(",")
    else:
        raise ValueError(f"brace group {{{body}}} in {pattern!r}: expected {{START..END}} or {{a,b,...}}")
    return [p for item in items for p in expand_braces(head + item + tail)]


def hashtags(caption: str) -> list[str]:
    """The caption's #tags, lower-cased, in order of first appearance, without repeats."""
    return list(dict.fromkeys(t.lower() for t in _HASHTAG.findall(caption)))




def shard_dataset(src: str, out: str | os.PathLike, *, shard_size: int = 10_000, split: str = "train",
                  labels: str | None = None, captions: str | None = None, overwrite: bool = False) -> dict:
    """`fastssl shards`: write SRC as shards under OUT (write_shards: an unfinished OUT is
    completed, a complete one refused unless overwrite); returns the manifest.

    src: "fashion-mnist" (split train or test), an image folder (ROOT/train or ROOT/val by
    split when present, else ROOT's class folders), or a labels file (.csv / .jsonl, as
    fastssl.data.labels reads them: image paths relative to the file's folder; every
    row's labels become the sample's tags, and its class when the file has one label per row).
    labels: a labels file whose labels become the tags of SRC's images (matched by path,
    or by index for Fashion-MNIST).
    captions: a captions file, or "synthetic" (fastssl.data.captions); None: an image folder's
    captions.csv / captions.jsonl when it has one. Each caption is written as the sample's KEY.txt."""
    from fastssl.data.captions import captions_beside, source_captions
    from fastssl.data.labels import _rows, read_labels
    from fastssl.data.shard_writer import write_shards
    from fastssl.data.sources import ImageFolderSource, _FileSource, fashion_mnist

    if split not in ("train", "test"):
        raise ValueError(f"--split: expected 'train' or 'test', got {split!r}")
    class_names: list[str] = []
    tags = None
    if src == "fashion-mnist":
        source = fashion_mnist(split)
        class_names = list(FASHION_MNIST_CLASSES)
    elif os.path.isdir(src):
        sub = os.path.join(src, "train" if split == "train" else "val")
        source = ImageFolderSource(sub if os.path.isdir(sub) else src)
        class_names = source.classes
    elif os.path.isfile(src):
        rows = _rows(Path(src))
        if not rows or isinstance(rows[0][1], int):
            raise ValueError(f"SRC: a labels file must key its rows by image path, got {src!r}")
        names = sorted({str(t) for _, _, raw in rows for t in raw})
        ids = {t: k for k, t in enumerate(names)}
        base = Path(src).parent
        tags = [[str(t) for t in raw] for _, _, raw in rows]
        single = all(len(t) == 1 for t in tags)
        source = _FileSource([str(base / key) for _, key, _ in rows],
                             [ids[t[0]] if single else -1 for t in tags], False, f"labels file {src!r}")
        class_names = names if single else []
    else:
        raise ValueError(f"SRC: expected 'fashion-mnist', an image folder or a labels file, got {src!r}")
    if labels is not None:
        raw = {str(t) for _, _, row in _rows(Path(labels)) for t in row}
        names = None if all(t.isdigit() for t in raw) else sorted(raw)  # label strings: their own vocabulary
        table = read_labels(labels, vocabulary=names, paths=getattr(source, "paths", None),
                            num_items=len(source) if source.kind == "array" else None)
        tags = [[table.names[c] if table.names else str(c) for c in row] for row in table.labels]
    texts = None
    if captions is not None or (os.path.isdir(src) and captions_beside(src) is not None):
        texts = source_captions(source, captions or "", data=src)
    return write_shards(source, out, shard_size=shard_size, tags=tags, captions=texts,
                        class_names=class_names, overwrite=overwrite)


# ----------------------------------------------------------------------------- reading


@dataclass
class _Sample:
    shard: int
    key: str
    offset: int = -1          # the image member's data, -1 when the sample has none
    size: int = 0
    ext: str = ""
    cls: int = -1
    meta: dict = field(default_factory=dict)
    caption: str = ""


def scan_shard(path: str, shard: int, remote: RemoteReader | None) -> tuple[list[_Sample], str | None]:
    """The samples of one tar from its headers (small members .cls .json .txt are read),
    and why reading stopped early (None when the whole tar was read). A sample cut by the
    damage is dropped; the complete samples before it are kept. A remote shard is fetched
    whole once (its images are read later by range)."""
    samples: list[_Sample] = []
    key = None
    try:
        with (io.BytesIO(remote.fetch(path)) if remote else open(path, "rb")) as f, \
                tarfile.open(fileobj=f, mode="r:") as tar:
            file_size = f.seek(0, io.SEEK_END)
            f.seek(0)
            for member in tar:
                key, ext = split_member(member.name)
                if member.offset_data + member.size > file_size:
                    raise tarfile.ReadError(f"member {member.name} runs past the end of the file (truncated)")
                if not member.isfile():
                    continue
                if not key or key.endswith("/"):
                    continue
                if not samples or samples[-1].key != key:
                    samples.append(_Sample(shard, key))
                s = samples[-1]
                ext = ext.lower()
                if ext in IMAGE_MEMBERS:
                    s.offset, s.size, s.ext = member.offset_data, member.size, ext
                elif ext in ("cls", "json", "txt"):
                    data = tar.extractfile(member).read()
                    if ext == "cls":
                        s.cls = int(data.decode().strip())
                    elif ext == "json":
                        s.meta = json.loads(data)
                    else:
                        s.caption = data.decode("utf-8", errors="replace")
    except (OSError, tarfile.TarError, ValueError, UnicodeDecodeError) as exc:
        cut = bool(samples) and samples[-1].key == key  # the sample being read when the damage began
        return samples[:-1] if cut else samples, f"{type(exc).__name__}: {exc}"
    return samples, None


def shard_paths(spec: str | os.PathLike, remote: RemoteReader | None = None) -> tuple[list[str], dict | None]:
    """The shard files of a spec and the manifest when there is one: a folder with
    manifest.json (its shard list), a folder of *.tar (sorted; img2dataset's layout), or a
    brace pattern / single .tar path; with `remote`, the same for URLs (a folder URL ends
    in "/" and must hold manifest.json) and pipe: commands (one per shard)."""
    spec = str(spec)
    if remote is not None and spec.endswith("/") and not spec.startswith("pipe:"):
        manifest = remote.manifest(spec)
        return [spec + name for name in manifest["shards"]], manifest
    if remote is None and os.path.isdir(spec):
        mpath = os.path.join(spec, MANIFEST)
        if os.path.isfile(mpath):
            with open(mpath, encoding="utf-8") as f:
                manifest = json.load(f)
            return [os.path.join(spec, s) for s in manifest["shards"]], manifest
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not paths:
            raise ValueError(f"{spec!r} holds no manifest.json and no *.tar shards")
        ours = [p for p in paths if re.fullmatch(r"shard-\d{6}\.tar", os.path.basename(p))
                and os.path.isfile(p[:-4] + ".idx")]
        if ours or glob.glob(os.path.join(spec, ".shard-*.tmp")):
            last = os.path.basename(ours[-1])[6:12] if ours else "000000"
            raise ValueError(
                f"{spec!r} holds shards of `fastssl shards` ({len(ours)}) but no manifest.json: the write "
                "did not finish, and training would miss what it did not write. Re-run the same `fastssl "
                "shards` command to finish it, or name the shards to read them as they are: "
                f"--data '{os.path.join(spec, 'shard-{000000..' + last + '}.tar')}'")
        return paths, None
    paths = expand_braces(spec)
    # A URL's query (a signed URL's token) follows the file name.
    if not spec.startswith("pipe:") and not all((urlsplit(p).path if remote else p).endswith(".tar")
                                                for p in paths):
        raise ValueError(f"shards: expected a folder, a .tar path or a brace pattern of .tar paths"
                         f"{' (or a folder URL ending in /)' if remote else ''}, got {spec!r}")
    return paths, None


def expected_count(path: str) -> int | None:
    """How many samples the shard at `path` was written with, without a manifest: from its
    wds2idx index ("v1.2 N" first line; fastssl's shards and `wds2idx` output) or img2dataset's
    NNNNN_stats.json ("successes"); None when neither says."""
    try:
        with open(path[:-4] + ".idx", encoding="utf-8") as f:
            head = f.readline().split()
        if len(head) == 2 and head[0].startswith("v1") and head[1].isdigit():
            return int(head[1])
    except OSError:
        pass
    try:
        with open(path[:-4] + "_stats.json", encoding="utf-8") as f:
            return int(json.load(f)["successes"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def is_shard_spec(spec: str) -> bool:
    """Whether `spec` names shards (a folder with manifest.json or *.tar files, a brace pattern, a .tar,
    or any http(s):// or pipe: URL)."""
    if "{" in spec or spec.endswith(".tar") or is_url(spec):
        return True
    return os.path.isdir(spec) and (os.path.isfile(os.path.join(spec, MANIFEST))
                                    or bool(glob.glob(os.path.join(spec, "*.tar"))))


class ShardSource:
    """The samples of WebDataset shards as an encoded-image source (`kind == "encoded"`).

    spec: a folder with manifest.json, a folder of *.tar (img2dataset), or a brace pattern;
    or the same over the network (see fastssl.data.remote): http(s) URLs of .tar shards, a
    brace pattern of them, a folder URL ending in "/" holding manifest.json, or pipe:COMMAND
    (a brace pattern gives one command per shard). remote: retries and timeouts for URLs.
    Samples missing an image, and every sample of a shard that cannot be read (a truncated
    or non-tar file, a shard the server does not give), are left out and recorded in
    `skipped` as (name, reason), one entry per lost sample, for the loader's skip count:
    the manifest's per-shard counts say how many a shard lost, else its index file or
    img2dataset's stats; with none, the damage counts once (a lower bound, said in the
    reason). A folder of `fastssl shards` output without its manifest (an unfinished write)
    is refused. labels: each sample's .cls (-1 without one).
    tags(vocabulary): each sample's tag ids (from .json "tags", else the caption's hashtags).
    captions(): each sample's caption (.txt, else .json "caption").
    """

    kind = "encoded"

    def __init__(self, spec: str | os.PathLike, *, remote: RemoteOptions | None = None):
        self.spec = str(spec)
        # The user's spec alone decides whether shards are fetched, never a name read from a manifest.
        self._remote = RemoteReader(remote) if is_url(self.spec) else None
        self.shards, self.manifest = shard_paths(spec, self._remote)
        self.skipped: list[tuple[str, str]] = []
        kept: list[_Sample] = []
        # Remote shards are fetched SCAN_THREADS at a time (latency, not CPU, bounds the scan).
        with ThreadPoolExecutor(SCAN_THREADS if self._remote else 1) as pool:
            scans = pool.map(lambda k: scan_shard(self.shards[k], k, self._remote), range(len(self.shards)))
        counts = self.manifest.get("samples_per_shard") if self.manifest else None
        for k, (path, (samples, problem)) in enumerate(zip(self.shards, scans)):
            expected = counts[k] if counts else None if self._remote else expected_count(path)
            if expected is not None and len(samples) < expected:
                why = f"{problem}" if problem is not None else "the tar ends early"
                self.skipped.extend([(path, f"{expected - len(samples)} of its {expected} samples lost "
                                            f"({why})")] * (expected - len(samples)))
            elif problem is not None:  # no count to compare with: the damage counts once
                self.skipped.append((path, f"unreadable after {len(samples)} sample(s) ({problem}); its "
                                           "sample count is unknown, so 1 lost sample is a lower bound"))
            for s in samples:
                if s.offset < 0:
                    self.skipped.append((f"{path}:{s.key}", "no image member"))
                else:
                    kept.append(s)
        if not kept:
            raise ValueError(f"shards {self.spec!r}: no readable samples")
        if self.skipped:
            bound = "at least " if any("lower bound" in why for _, why in self.skipped) else ""
            warnings.warn(f"shards {self.spec!r}: {bound}{len(self.skipped)} sample(s) left out, e.g. "
                          f"{self.skipped[0][0]} ({self.skipped[0][1]})", stacklevel=2)
        self.samples = kept
        self.labels = np.asarray([s.cls for s in kept], dtype=np.int64)
        self.shard_of = np.asarray([s.shard for s in kept], dtype=np.int64)
        self.classes = list(self.manifest.get("class_names", [])) if self.manifest else []
        self._fds: OrderedDict[int, int] = OrderedDict()
        if self._remote is not None:
            try:  # a server that ignores Range requests is refused here, not sample by sample
                self.read_bytes(0)
            except RemoteReadError as exc:
                raise ValueError(f"shards {self.spec!r}: {exc}") from None

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self):  # file descriptors do not cross processes (loader workers)
        return {k: v for k, v in self.__dict__.items() if k != "_fds"} | {"_fds": OrderedDict()}

    def name(self, i: int) -> str:
        """"SHARD:KEY" of sample i, as logs and errors name it."""
        s = self.samples[i]
        return f"{self.shards[s.shard]}:{s.key}"

    def read_bytes(self, i: int) -> np.ndarray:
        """The encoded image of sample i as a 1-D uint8 array (one positioned read)."""
        s = self.samples[i]
        if self._remote is not None:
            return np.frombuffer(self._remote.read(self.shards[s.shard], s.offset, s.size), dtype=np.uint8)
        fd = self._fds.get(s.shard)
        if fd is None:
            if len(self._fds) >= OPEN_SHARDS:  # a stream visits few shards at once; stay far below ulimit -n
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[s.shard] = os.open(self.shards[s.shard], os.O_RDONLY)
        else:
            self._fds.move_to_end(s.shard)
        data = os.pread(fd, s.size, s.offset)
        if len(data) != s.size:
            raise OSError(f"{self.name(i)}: short read ({len(data)} of {s.size} bytes)")
        return np.frombuffer(data, dtype=np.uint8)

    def read_many(self, indices) -> list[np.ndarray | OSError]:
        """read_bytes of each sample, or the OSError that reading it raised, in order; remote
        samples are requested together (see RemoteReader.read_many)."""
        if self._remote is None:
            return read_each(self.read_bytes, indices)
        samples = [self.samples[int(i)] for i in indices]
        got = self._remote.read_many([(self.shards[s.shard], s.offset, s.size) for s in samples])
        return [g if isinstance(g, OSError) else np.frombuffer(g, dtype=np.uint8) for g in got]

    def subset(self, indices) -> ShardSource:
        """A source of the samples at `indices` (held-out splits); give them in increasing order
        so each shard's samples stay contiguous for the streaming order."""
        indices = np.asarray(indices, dtype=np.int64)
        out = object.__new__(ShardSource)
        out.__dict__ |= self.__getstate__()
        out.samples = [self.samples[int(i)] for i in indices]
        out.labels, out.shard_of = self.labels[indices], self.shard_of[indices]
        return out

    def raw_tags(self, i: int) -> list[str]:
        """Sample i's tag strings: its .json "tags", else the hashtags of its caption."""
        s = self.samples[i]
        tags = s.meta.get("tags") if isinstance(s.meta, dict) else None
        if tags:
            return [str(t) for t in tags]
        return hashtags(s.caption or (s.meta.get("caption", "") if isinstance(s.meta, dict) else ""))

    def captions(self) -> list[str | None]:
        """Each sample's caption: its KEY.txt, else the "caption" field of its KEY.json (img2dataset
        writes both); None for a sample with neither or an empty one."""
        from fastssl.data.captions import clean_caption

        return [clean_caption(s.caption) or (clean_caption(s.meta.get("caption")) if isinstance(s.meta, dict)
                                             else None) for s in self.samples]

    def tag_vocabulary(self) -> list[str]:
        """The manifest's tag vocabulary ([] without a manifest: build one with `vocabulary`)."""
        return list(self.manifest.get("tag_vocabulary", [])) if self.manifest else []

    def tags(self, vocabulary: Sequence[str] | Mapping[str, int]) -> list[list[int]]:
        """Per sample, the ids in `vocabulary` of its known tags (unknown tags dropped); or
        through a tag -> id mapping (a WordNet vocabulary's, fastssl.data.vocab.load_tag_ids)."""
        ids = vocabulary if isinstance(vocabulary, Mapping) else {t: k for k, t in enumerate(vocabulary)}
        return [sorted({ids[t] for t in self.raw_tags(i) if t in ids}) for i in range(len(self))]

    def __repr__(self) -> str:
        return f"ShardSource({self.spec!r}, shards={len(self.shards)}, samples={len(self)})"


def vocabulary(source: ShardSource, top: int | None = None) -> list[tuple[str, int]]:
    """The `top` most frequent tags (default all) over the samples (hashtags of captions, or
    .json tags), as (tag, number of samples carrying it), most frequent first, ties by tag."""
    if top is not None:
        check_int("top", top, low=1)
    counts = Counter(t for i in range(len(source)) for t in set(source.raw_tags(i)))
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


__all__ = ["FASHION_MNIST_CLASSES", "ShardSource", "expand_braces", "hashtags", "is_shard_spec",
           "scan_shard", "shard_dataset", "shard_paths", "split_member", "vocabulary"]
