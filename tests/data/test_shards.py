"""WebDataset shards: the writer (checked against DALI's own wds2idx and reader), the
streaming order, rank shares, resume, bad samples on both backends, img2dataset layout."""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastssl.data import ArraySource, build_loader, recipes
from fastssl.data import dali as dali_backend
from fastssl.data.order import stream_indices
from fastssl.data.shard_writer import write_shards
from fastssl.data.shards import ShardSource, expand_braces, hashtags, vocabulary

BACKENDS = [
    pytest.param("dali", marks=pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")),
    "torchvision",
]
WDS2IDX = os.path.join(os.path.dirname(sys.executable), "wds2idx")


def _images(n=24, size=10, seed=0):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8), np.arange(n) % 5)


def _tags(n):
    return [[f"t{i % 3}"] + (["even"] if i % 2 == 0 else []) for i in range(n)]


def _write(tmp_path, n=24, shard_size=5, name="shards"):
    src = _images(n)
    write_shards(src, tmp_path / name, shard_size=shard_size, tags=_tags(n), class_names=list("abcde"))
    return src, tmp_path / name


def _epoch(loader):
    out = [(b["index"].tolist(), b["label"].tolist(), [tuple(v.shape) for v in b["views"]]) for b in loader]
    return out


def test_writer_layout_manifest_and_dali_index_format(tmp_path):
    src, out = _write(tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["samples_per_shard"] == [5, 5, 5, 5, 4] and manifest["total"] == 24
    assert manifest["class_names"] == list("abcde")
    assert manifest["tag_vocabulary"] == ["even", "t0", "t1", "t2"]
    assert sorted(os.listdir(out)) == sorted([f"shard-{k:06d}.{e}" for k in range(5) for e in ("tar", "idx")]
                                             + ["manifest.json"])  # no temporary files left
    with tarfile.open(out / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000005.png", "000000005.cls", "000000005.json"]
        assert tar.extractfile("000000005.cls").read() == b"0"
        meta = json.loads(tar.extractfile("000000005.json").read())
        assert meta == {"path": 5, "tags": ["t2"]}
        png = np.asarray(Image.open(io.BytesIO(tar.extractfile("000000005.png").read())))
        assert (png == src.images[5]).all()
    # The index files are what DALI's own tool writes for these tars, byte for byte.
    if not os.path.exists(WDS2IDX):
        pytest.skip("DALI's wds2idx not installed")
    for k in range(5):
        ref = tmp_path / f"ref{k}.idx"
        subprocess.run([sys.executable, WDS2IDX, str(out / f"shard-{k:06d}.tar"), str(ref)], check=True,
                       capture_output=True)
        assert ref.read_bytes() == (out / f"shard-{k:06d}.idx").read_bytes()


def test_writer_is_deterministic_and_refuses_a_used_folder(tmp_path):
    _, a = _write(tmp_path, name="a")
    _, b = _write(tmp_path, name="b")
    for f in os.listdir(a):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    with pytest.raises(ValueError, match="already holds a complete shard set.*--overwrite"):
        write_shards(_images(), a, shard_size=5)
    with pytest.raises(ValueError, match="shard_size"):
        write_shards(_images(), tmp_path / "c", shard_size=0)


@pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")
def test_dali_webdataset_reader_reads_the_shards_with_their_index_files(tmp_path):
    from nvidia.dali import fn, pipeline_def

    src, out = _write(tmp_path)
    paths = [str(out / f"shard-{k:06d}.tar") for k in range(5)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None)
    def pipe():
        img, cls = fn.readers.webdataset(paths=paths, index_paths=[p[:-4] + ".idx" for p in paths],
                                         ext=["png", "cls"], name="r")
        return fn.decoders.image(img, device="cpu"), cls

    p = pipe()
    p.build()
    images, classes = [], []
    for _ in range(6):
        a, b = p.run()
        images += [np.array(a.at(j)) for j in range(len(a))]
        classes += [int(bytes(np.array(b.at(j))).decode()) for j in range(len(b))]
    assert classes == list(src.labels)
    assert all((x == y).all() for x, y in zip(images, src.images))


def test_brace_pattern_and_source(tmp_path):
    _, out = _write(tmp_path)
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/x{1..2}.tar") == ["a/x1.tar", "a/x2.tar", "b/x1.tar", "b/x2.tar"]
    with pytest.raises(ValueError, match="brace"):
        expand_braces("x{3..1}.tar")
    part = ShardSource(str(out / "shard-{000001..000002}.tar"))
    assert len(part) == 10 and part.labels.tolist() == [i % 5 for i in range(5, 15)]
    whole = ShardSource(out)
    assert whole.classes == list("abcde") and len(whole) == 24
    assert whole.tags(whole.tag_vocabulary())[0] == [0, 1]  # "even", "t0"


@pytest.mark.parametrize("backend", BACKENDS)
def test_round_trip_two_ranks_two_workers(backend, tmp_path):
    """Every sample exactly once per epoch over 2 ranks x 2 workers, labels and tags intact,
    the same number of steps on both ranks."""
    src, out = _write(tmp_path)
    source = ShardSource(out)
    tags = source.tags(source.tag_vocabulary())
    for epoch in (0, 1):
        seen, steps = [], []
        for rank in (0, 1):
            loader = build_loader(source, recipes.mae(8), batch_size=3, loader=backend, device="cpu",
                                  num_threads=2, shard_id=rank, num_shards=2, seed=3, shuffle_buffer=4)
            loader.set_epoch(epoch)
            batches = _epoch(loader)
            steps.append(len(batches))
            for idx, labels, shapes in batches:
                assert shapes == [(3, 3, 8, 8)]
                assert labels == [int(src.labels[i]) for i in idx]
                # vocabulary ["even", "t0", "t1", "t2"]: sample i carries t{i % 3}, and "even" when i is
                assert [tags[i] for i in idx] == [sorted({1 + i % 3} | ({0} if i % 2 == 0 else set()))
                                                  for i in idx]
                seen += idx
        assert steps == [4, 4]
        assert sorted(seen) == list(range(24))


def test_stream_order_is_seeded_per_epoch_and_local():
    shard_of = np.repeat(np.arange(6), 10)
    a = stream_indices(shard_of, epoch=0, seed=1, shard_id=0, num_shards=1, buffer_size=8)
    assert sorted(a.tolist()) == list(range(60))
    assert (a == stream_indices(shard_of, epoch=0, seed=1, shard_id=0, num_shards=1, buffer_size=8)).all()
    assert not (a == stream_indices(shard_of, epoch=1, seed=1, shard_id=0, num_shards=1, buffer_size=8)).all()
    assert not (a == stream_indices(shard_of, epoch=0, seed=2, shard_id=0, num_shards=1, buffer_size=8)).all()
    # No buffer: whole shards in a shuffled order, each read front to back.
    plain = stream_indices(shard_of, epoch=0, seed=1, shard_id=0, num_shards=1, buffer_size=0)
    blocks = plain.reshape(6, 10)
    assert all((b == np.arange(b[0], b[0] + 10)).all() for b in blocks)
    assert len({int(b[0]) for b in blocks}) == 6
    # A shuffle buffer of b emits a sample at most b - 1 places before it arrives in the stream.
    arrival = {int(s): t for t, s in enumerate(plain)}
    assert all(t >= arrival[int(s)] - 7 for t, s in enumerate(a))
    # Repeat factors put sample i in the stream repeats[i] times.
    rep = np.arange(60) % 3
    r = stream_indices(shard_of, epoch=0, seed=1, shard_id=0, num_shards=1, buffer_size=8, repeats=rep)
    assert np.bincount(r, minlength=60).tolist() == rep.tolist()


class _LoggedShards(ShardSource):
    """A ShardSource that appends "pid index" to a file on every read, so reads made in
    other processes (DALI's reader workers) are seen."""

    def __init__(self, spec, log):
        super().__init__(spec)
        self.log = str(log)

    def read_bytes(self, i):
        with open(self.log, "a") as f:
            f.write(f"{os.getpid()} {i}\n")
        return super().read_bytes(i)

    def reads(self) -> list[tuple[int, int]]:
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            return [tuple(map(int, line.split())) for line in f]


@pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")
def test_dali_reads_shards_in_worker_processes_in_the_planned_order(tmp_path):
    """No read on the main process; the batches (indices, labels) are the planner's, the same
    as the torchvision backend's for the seed, and each planned sample is read once."""
    src, out = _write(tmp_path)
    source = _LoggedShards(out, tmp_path / "reads.log")
    kw = dict(batch_size=3, device="cpu", num_threads=2, shard_id=1, num_shards=2, seed=7, shuffle_buffer=4,
              drop_last=False)
    loader = build_loader(source, recipes.mae(8), loader="dali", **kw)
    loader.set_epoch(1)
    batches = [(idx, labels) for idx, labels, _ in _epoch(loader)]
    reads = source.reads()
    assert reads and all(pid != os.getpid() for pid, _ in reads)
    planned = [b.tolist() for b in loader.plan(1)]
    assert [idx for idx, _ in batches] == planned and sum(map(len, planned)) == 12
    assert sorted(i for _, i in reads) == sorted(i for b in planned for i in b)
    assert all(lab == [int(src.labels[i]) for i in idx] for idx, lab in batches)
    reference = build_loader(ShardSource(out), recipes.mae(8), loader="torchvision", **kw)
    reference.set_epoch(1)
    assert [(idx, lab) for idx, lab, _ in _epoch(reference)] == batches


@pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")
def test_dali_spawned_reader_workers_read_the_shards(tmp_path, monkeypatch):
    """The start method used once CUDA is initialized: the reader callable and the source
    cross to fresh interpreters by pickling (file descriptors are not carried)."""
    src, out = _write(tmp_path, n=8)
    source = _LoggedShards(out, tmp_path / "reads.log")
    source.read_bytes(0)  # an open shard descriptor that must not be pickled
    monkeypatch.setattr(dali_backend, "start_method", lambda: "spawn")
    loader = build_loader(source, recipes.mae(8), batch_size=4, loader="dali", device="cpu", num_threads=1,
                          seed=1)
    batches = [(idx, labels) for idx, labels, _ in _epoch(loader)]
    assert [idx for idx, _ in batches] == [b.tolist() for b in loader.plan(0)]
    assert all(lab == [int(src.labels[i]) for i in idx] for idx, lab in batches)
    reads = source.reads()  # the first: the read made above, on this process
    assert len(reads) == 9 and reads[0][0] == os.getpid() and all(pid != os.getpid() for pid, _ in reads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_mid_epoch_resume_reads_nothing_before_it_and_repeats_the_batches(backend, tmp_path):
    _, out = _write(tmp_path)
    source = ShardSource(out)
    kw = dict(batch_size=4, loader=backend, device="cpu", num_threads=1, seed=5, shuffle_buffer=6)
    loader = build_loader(source, recipes.mocov2(8), **kw)
    loader.set_epoch(1)
    full = [{"index": b["index"].clone(), "views": [v.clone() for v in b["views"]]} for b in loader]
    counted = _LoggedShards(out, tmp_path / "reads.log")
    resumed = build_loader(counted, recipes.mocov2(8), **kw)
    resumed.set_epoch(1, start=4)
    rest = [{"index": b["index"].clone(), "views": [v.clone() for v in b["views"]]} for b in resumed]
    assert [b["index"].tolist() for b in rest] == [b["index"].tolist() for b in full[4:]]
    if backend == "torchvision":  # augmentations seeded by position in the epoch: identical views
        for a, b in zip(rest, full[4:]):
            assert all((x == y).all() for x, y in zip(a["views"], b["views"]))
    else:  # DALI's reader workers read only the remaining batches' samples
        remaining = sorted(i for b in full[4:] for i in b["index"].tolist())
        assert sorted(i for _, i in counted.reads()) == remaining


def _garble(out):
    """Shard 1: sample 6's PNG replaced by garbage of the same size."""
    with tarfile.open(out / "shard-000001.tar") as tar:
        member = tar.getmember("000000006.png")
    with open(out / "shard-000001.tar", "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * (member.size - 8))


def _corrupt(out):
    """_garble; shard 2: sample 12's image removed; shard 4: truncated in its third sample
    (samples 20, 21 survive)."""
    _garble(out)
    with tarfile.open(out / "shard-000002.tar") as tar:
        kept = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "000000012.png"]
    with tarfile.open(out / "shard-000002.tar", "w", format=tarfile.USTAR_FORMAT) as tar:
        for m, data in kept:
            tar.addfile(m, io.BytesIO(data))
    with tarfile.open(out / "shard-000004.tar") as tar:
        cut = tar.getmember("000000022.png").offset_data + 10
    with open(out / "shard-000004.tar", "r+b") as f:
        f.truncate(cut)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_samples_are_skipped_counted_named_then_refused(backend, tmp_path, caplog):
    _, out = _write(tmp_path)
    _corrupt(out)
    with pytest.warns(UserWarning, match="left out"):
        source = ShardSource(out)
    # Missing image (12) and the truncated shard's two lost samples (22, 23) are known from the headers.
    assert [name.rsplit("/", 1)[-1] for name, _ in source.skipped] == [
        "shard-000002.tar:000000012", "shard-000004.tar", "shard-000004.tar"]
    assert len(source) == 21
    kw = dict(batch_size=7, loader=backend, device="cpu", num_threads=1, shuffle=False)
    loader = build_loader(source, recipes.mae(8), max_skipped_fraction=0.2, **kw)
    with caplog.at_level(logging.WARNING, logger="fastssl.data"):
        batches = _epoch(loader)
    assert [len(idx) for idx, _, _ in batches] == [7, 7, 7]  # the slot is filled, the step count kept
    assert 6 not in [i for idx, _, _ in batches for i in idx]
    assert loader.skipped_samples == 3 + 1
    assert "shard-000001.tar:000000006" in caplog.text
    with pytest.raises(ValueError, match=r"max_skipped_fraction.*shard-000002.tar:000000012"):
        build_loader(source, recipes.mae(8), **kw)
    _, garbled = _write(tmp_path, name="garbled")
    _garble(garbled)
    strict = build_loader(ShardSource(garbled), recipes.mae(8), **kw)
    with pytest.raises(ValueError, match=r"max_skipped_fraction.*shard-000001.tar:000000006"):
        _epoch(strict)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_cut_after_indexing_fails_reads_that_are_skipped_and_named(backend, tmp_path, caplog):
    """Reads that fail in the reader (DALI: a worker process) are filled, counted and named
    by the main process."""
    _, out = _write(tmp_path)
    source = ShardSource(out)
    with tarfile.open(out / "shard-000004.tar") as tar:
        cut = tar.getmember("000000022.png").offset_data + 10
    with open(out / "shard-000004.tar", "r+b") as f:
        f.truncate(cut)
    loader = build_loader(source, recipes.mae(8), batch_size=8, loader=backend, device="cpu", num_threads=1,
                          shuffle=False, max_skipped_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="fastssl.data"):
        batches = _epoch(loader)
    assert [len(idx) for idx, _, _ in batches] == [8, 8, 8] and loader.skipped_samples == 2
    assert not {22, 23} & {i for idx, _, _ in batches for i in idx}
    assert "shard-000004.tar:000000022 (OSError" in caplog.text and "short read" in caplog.text


def test_unreadable_shard_is_skipped_whole(tmp_path):
    _, out = _write(tmp_path)
    (out / "shard-000003.tar").write_bytes(b"not a tar at all" * 10)
    with pytest.warns(UserWarning, match="shard-000003.tar"):
        source = ShardSource(out)
    assert len(source) == 19 and len(source.skipped) == 5  # the manifest says it held 5


def _img2dataset_shard(path, captions, start=0):
    rng = np.random.default_rng(start)
    with tarfile.open(path, "w") as tar:
        for k, caption in enumerate(captions):
            key = f"{start + k:09d}"
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(buf, format="JPEG")
            meta = json.dumps({"url": f"http://x/{key}.jpg", "caption": caption, "key": key}).encode()
            for ext, data in (("jpg", buf.getvalue()), ("txt", caption.encode()), ("json", meta)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_img2dataset_layout_and_hashtag_vocabulary(tmp_path):
    folder = tmp_path / "laion"
    folder.mkdir()
    _img2dataset_shard(folder / "00000.tar", ["a #Dog on grass #dog", "#cat and #dog", "no tags here"])
    _img2dataset_shard(folder / "00001.tar", ["#cat", "#bird #Cat", "#dog"], start=3)
    source = ShardSource(folder)
    assert len(source) == 6 and source.labels.tolist() == [-1] * 6 and source.manifest is None
    assert hashtags("a #Dog on grass #dog #x_1") == ["dog", "x_1"]
    assert vocabulary(source, 2) == [("cat", 3), ("dog", 3)]
    assert vocabulary(source, 5) == [("cat", 3), ("dog", 3), ("bird", 1)]
    assert source.tags(["cat", "dog"]) == [[1], [0, 1], [], [0], [0], [1]]
    loader = build_loader(source, recipes.mae(8), batch_size=3, loader="torchvision", device="cpu",
                          num_threads=1, shuffle=False)
    assert [b["index"].tolist() for b in loader] == [[0, 1, 2], [3, 4, 5]]


def test_shard_source_bad_spec(tmp_path):
    with pytest.raises(ValueError, match="no manifest.json and no"):
        ShardSource(tmp_path)
    with pytest.raises(ValueError, match="brace pattern"):
        ShardSource(str(tmp_path / "x.zip"))


def _png_folder(root, n=6, bad=None):
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)).save(root / c / f"{k}.png")
    if bad:
        (root / bad).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    return root


@pytest.mark.skipif(not dali_backend.HAS_DALI, reason="DALI not installed")
def test_dali_reads_image_folders_with_its_file_reader_not_a_python_feeder(tmp_path, monkeypatch):
    from fastssl.data import ImageFolderSource

    source = ImageFolderSource(_png_folder(tmp_path / "f"))
    reads = []
    monkeypatch.setattr(ImageFolderSource, "read_bytes", lambda self, i: reads.append(i))
    loader = build_loader(source, recipes.mae(8), batch_size=5, loader="dali", device="cpu", num_threads=1,
                          shuffle=True, seed=2, drop_last=False)
    batches = [(b["index"].tolist(), b["label"].tolist()) for b in loader]
    assert reads == []  # nothing read in Python: fn.readers.file did it
    planned = [b.tolist() for b in loader.plan(0)]
    assert [idx for idx, _ in batches] == planned and [len(b) for b in planned] == [5, 5, 2]
    assert all(lab == [int(source.labels[i]) for i in idx] for idx, lab in batches)


@pytest.mark.parametrize("backend", BACKENDS)
def test_image_folder_bad_file_is_skipped_and_counted(backend, tmp_path, caplog):
    from fastssl.data import ImageFolderSource

    source = ImageFolderSource(_png_folder(tmp_path / "f", bad="b/zz.png"))
    loader = build_loader(source, recipes.mae(8), batch_size=13, loader=backend, device="cpu", num_threads=1,
                          max_skipped_fraction=0.1)
    with caplog.at_level(logging.WARNING, logger="fastssl.data"):
        batches = _epoch(loader)
    assert [len(idx) for idx, _, _ in batches] == [13] and loader.skipped_samples == 1
    assert "zz.png" in caplog.text
