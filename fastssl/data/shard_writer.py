"""Writing WebDataset tar shards (`fastssl shards`; fastssl.data.shards reads them).

Layout: OUT/shard-000000.tar, ... where each sample is KEY.jpg or KEY.png (the image's
encoded bytes, unchanged), KEY.cls (its class index as ASCII), KEY.json ({"path": source
path or index, "tags": [...]}) and KEY.txt (its caption, when it has one, as img2dataset
writes it); one OUT/shard-NNNNNN.idx per shard in the format DALI's
`wds2idx` writes; OUT/manifest.json last. Every file is written to a temporary name and
renamed, so a killed write leaves finished shards and no manifest, which a re-run completes.
"""

from __future__ import annotations

import glob
import io
import json
import os
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fastssl.data.shards import FORMAT, MANIFEST, SHARD_NAME, scan_shard
from fastssl.validation import check_bool


def _tar_info(name: str, size: int) -> tarfile.TarInfo:
    # Fixed metadata: the same input gives byte-identical shards.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    return info


def _index_line(members: list[tuple[str, int, int, str]]) -> str:
    return " ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members)


def _write_shard(path: Path, samples: list[tuple[str, list[tuple[str, bytes]]]]) -> None:
    """One tar and its wds2idx-format index, each written to a temporary name and renamed:
    a kill leaves either the complete file or none under the final name."""
    lines = []
    tmp_tar = path.with_name(f".{path.name}.tmp")
    with open(tmp_tar, "wb") as f, tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            entry = []
            for ext, data in members:
                name = f"{key}.{ext}"
                tar.addfile(_tar_info(name, len(data)), io.BytesIO(data))
                # The data ends, padded to a 512-byte block, where the archive's offset now is.
                entry.append((ext, tar.offset - _round512(len(data)), len(data), name))
            lines.append(_index_line(entry))
    tmp_idx = path.with_name(f".{path.stem}.idx.tmp")
    tmp_idx.write_text(f"v1.2 {len(samples)}\n" + "".join(line + "\n" for line in lines))
    os.replace(tmp_tar, path)
    os.replace(tmp_idx, path.with_suffix(".idx"))


def _round512(n: int) -> int:
    return (n + 511) // 512 * 512


def _png_bytes(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def _meta(source, i: int, tags) -> dict:
    """Sample i's KEY.json: its origin (file path, or an ArraySource's index) and tags."""
    return {"path": source.paths[i] if source.kind == "encoded" else i,
            "tags": list(tags[i]) if tags is not None else []}


def _sample(source, i: int, tags, captions) -> tuple[str, list[tuple[str, bytes]]]:
    """Sample i as the writer stores it: (key, [(extension, bytes), ...])."""
    if source.kind == "encoded":
        ext = Path(source.paths[i]).suffix.lower().lstrip(".")
        ext, data = "jpg" if ext == "jpeg" else ext, source.read_bytes(i).tobytes()
    else:
        ext, data = "png", _png_bytes(source.images[i])
    caption = captions[i] if captions is not None else None
    return f"{i:09d}", [(ext, data), ("cls", str(int(source.labels[i])).encode()),
                        ("json", json.dumps(_meta(source, i, tags), sort_keys=True).encode()),
                        *([("txt", caption.encode("utf-8"))] if caption is not None else [])]


def _kept_shard(path: Path, source, ids: range, tags, captions) -> bool:
    """Whether the finished shard at `path` (a re-run after a killed write) holds exactly samples
    `ids` of `source` (keys, classes, paths and tags; images are not re-read) and keeps its
    index: True to keep it, False to rewrite it (damaged). ValueError when it holds other data."""
    samples, problem = scan_shard(str(path), 0, None)
    if problem is not None or not path.with_suffix(".idx").is_file():
        return False
    want = [(f"{i:09d}", int(source.labels[i]), _meta(source, i, tags),
             (captions[i] if captions is not None else None) or "") for i in ids]
    if [(s.key, s.cls, s.meta, s.caption) for s in samples] != want:
        raise ValueError(f"out: {path} holds other samples than {ids.start}..{ids.stop - 1} of this source "
                         "(other data, labels, tags, captions or --shard-size); pass --overwrite to write "
                         "it again")
    return True


def write_shards(source, out: str | os.PathLike, *, shard_size: int = 10_000,
                 tags: Sequence[Sequence[str]] | None = None, captions: Sequence[str | None] | None = None,
                 class_names: Sequence[str] | None = None, overwrite: bool = False) -> dict:
    """Write `source` (an encoded-image source: its files' bytes unchanged; or an ArraySource:
    PNG-encoded) as shards of `shard_size` samples under `out`; returns the manifest.

    tags: one list of tag strings per sample (weak supervision), stored in KEY.json and
    gathered, sorted, into the manifest's tag vocabulary. KEY.json's "path" is the file's
    path (an ArraySource's: the item index). captions: one caption (or None) per sample, stored
    as KEY.txt.
    Deterministic: the same source gives byte-identical shards. Shards appear atomically;
    manifest.json is written last, so a folder with a manifest is complete. A folder without
    one is an unfinished write: a re-run with the same arguments keeps each finished shard
    that holds the samples it should (checked from its headers) and writes the rest. A
    complete folder is refused unless overwrite=True, which removes the manifest first."""
    if not isinstance(shard_size, int) or isinstance(shard_size, bool) or shard_size < 1:
        raise ValueError(f"shard_size must be an int >= 1, got {shard_size!r}")
    n = len(source)
    if tags is not None and len(tags) != n:
        raise ValueError(f"tags must have one list per sample ({n}), got {len(tags)}")
    if captions is not None and len(captions) != n:
        raise ValueError(f"captions must have one caption (or None) per sample ({n}), got {len(captions)}")
    check_bool("overwrite", overwrite)
    out = Path(out)
    if (out / MANIFEST).exists() and not overwrite:
        raise ValueError(f"out: {str(out)!r} already holds a complete shard set (manifest.json); choose "
                         "another folder, or pass --overwrite to write it again")
    n_shards = -(-n // shard_size)
    ours = {SHARD_NAME.format(k) for k in range(n_shards)}
    others = sorted(set(map(os.path.basename, glob.glob(str(out / "*.tar")))) - ours)
    if others and not overwrite:
        raise ValueError(f"out: {str(out)!r} holds shards this write would not make ({', '.join(others[:3])})"
                         ": other data or another --shard-size; pass --overwrite to write the folder again")
    out.mkdir(parents=True, exist_ok=True)
    if overwrite:  # the manifest first: a folder is never complete-looking while it is rewritten
        (out / MANIFEST).unlink(missing_ok=True)
        for p in glob.glob(str(out / "shard-*.tar")) + glob.glob(str(out / "shard-*.idx")):
            os.remove(p)
    for p in glob.glob(str(out / ".shard-*.tmp")):  # a killed write's unfinished file
        os.remove(p)
    counts: list[int] = []
    for k in range(n_shards):
        ids, path = range(k * shard_size, min((k + 1) * shard_size, n)), out / SHARD_NAME.format(k)
        if not (path.exists() and _kept_shard(path, source, ids, tags, captions)):
            _write_shard(path, [_sample(source, i, tags, captions) for i in ids])
        counts.append(len(ids))
    vocabulary = sorted({t for row in tags for t in row}) if tags is not None else []
    manifest = {
        "format": FORMAT, "total": n, "shards": [SHARD_NAME.format(k) for k in range(len(counts))],
        "samples_per_shard": counts, "class_names": list(class_names) if class_names is not None else [],
        "tag_vocabulary": vocabulary,
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out / MANIFEST)
    return manifest


__all__ = ["write_shards"]
