"""Shard folders after a killed or failed write: the writer finishes them, the reader refuses
them until finished, and lost samples are counted as many as were lost."""

import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from fastssl.cli import main
from fastssl.data import ArraySource, ShardSource, build_loader, recipes, write_shards


def _images(n=24, seed=0):
    rng = np.random.default_rng(seed)
    return ArraySource(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), np.arange(n) % 5)


def _kill_midway(out, keep):
    """What a write killed after `keep` shards leaves: those shards, a partial temporary file, no manifest."""
    os.remove(out / "manifest.json")
    for k in range(keep, len(list(out.glob("shard-*.tar")))):
        os.remove(out / f"shard-{k:06d}.tar")
        os.remove(out / f"shard-{k:06d}.idx")
    (out / f".shard-{keep:06d}.tar.tmp").write_bytes(b"\0" * 700)


def test_a_killed_write_is_finished_by_a_rerun_keeping_its_shards(tmp_path):
    fresh, out = tmp_path / "fresh", tmp_path / "out"
    write_shards(_images(), fresh, shard_size=5)
    write_shards(_images(), out, shard_size=5)
    _kill_midway(out, keep=2)
    kept = [os.stat(out / f"shard-{k:06d}.tar").st_ino for k in range(2)]
    manifest = write_shards(_images(), out, shard_size=5)
    assert manifest["samples_per_shard"] == [5, 5, 5, 5, 4]
    assert [os.stat(out / f"shard-{k:06d}.tar").st_ino for k in range(2)] == kept  # not rewritten
    assert sorted(os.listdir(out)) == sorted(os.listdir(fresh))  # the temporary file is gone
    for name in os.listdir(fresh):
        assert (out / name).read_bytes() == (fresh / name).read_bytes(), name


def test_a_damaged_finished_shard_is_rewritten_and_other_data_refused(tmp_path):
    out = tmp_path / "out"
    write_shards(_images(), out, shard_size=5)
    good = (out / "shard-000001.tar").read_bytes()
    _kill_midway(out, keep=3)
    (out / "shard-000001.tar").write_bytes(good[:1000])
    write_shards(_images(), out, shard_size=5)
    assert (out / "shard-000001.tar").read_bytes() == good
    _kill_midway(out, keep=3)
    with pytest.raises(ValueError, match=r"shard-000000.tar holds other samples than 0..5 .*--overwrite"):
        write_shards(_images(), out, shard_size=6)  # another shard size: other samples in shard 0
    relabeled = ArraySource(_images().images, np.arange(24) % 3)
    with pytest.raises(ValueError, match=r"holds other samples .*labels"):
        write_shards(relabeled, out, shard_size=5)
    with pytest.raises(ValueError, match=r"holds shards this write would not make \(shard-000002.tar"):
        write_shards(_images(8), out, shard_size=5)
    assert not (out / "manifest.json").exists()  # refusals change nothing


def test_a_complete_folder_is_refused_unless_overwritten(tmp_path):
    out = tmp_path / "out"
    write_shards(_images(), out, shard_size=5)
    with pytest.raises(ValueError, match=r"already holds a complete shard set .*--overwrite"):
        write_shards(_images(), out, shard_size=5)
    manifest = write_shards(_images(10, seed=1), out, shard_size=4, overwrite=True)
    assert manifest["samples_per_shard"] == [4, 4, 2] and sorted(p.name for p in out.glob("*.tar")) == [
        "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert len(ShardSource(out)) == 10


def test_the_shards_command_finishes_an_unfinished_folder(tmp_path):
    folder = tmp_path / "images"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (folder / c).mkdir(parents=True)
        for k in range(6):
            Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(folder / c / f"{k}.png")
    out = tmp_path / "out"
    assert main(["shards", str(folder), str(out), "--shard-size", "4"]) == 0
    _kill_midway(out, keep=1)
    assert main(["shards", str(folder), str(out), "--shard-size", "4"]) == 0
    assert len(ShardSource(out)) == 12 and json.loads((out / "manifest.json").read_text())["total"] == 12
    assert main(["shards", str(folder), str(out), "--shard-size", "4"]) == 2  # complete: refused


def test_the_reader_refuses_an_unfinished_folder_and_reads_named_shards(tmp_path):
    out = tmp_path / "out"
    write_shards(_images(), out, shard_size=5)
    _kill_midway(out, keep=3)
    with pytest.raises(ValueError, match=r"no manifest.json: the write did not finish.*Re-run.*"
                                         r"--data '.*/out/shard-\{000000..000002\}.tar'"):
        ShardSource(out)
    assert len(ShardSource(f"{out}/shard-{{000000..000002}}.tar")) == 15  # named: read as they are
    # Other tools' shards without a manifest (no index files beside them) read as before.
    other = tmp_path / "webdataset"
    other.mkdir()
    os.replace(out / "shard-000000.tar", other / "shard-000000.tar")
    assert len(ShardSource(other)) == 5


def _garble_and_cut(out):
    """Shard 1 replaced by garbage; shard 0 cut inside its 21st sample (30 of 50 lost)."""
    (out / "shard-000001.tar").write_bytes(b"not a tar at all" * 100)
    with tarfile.open(out / "shard-000000.tar") as tar:
        cut = tar.getmember("000000020.png").offset_data + 10
    with open(out / "shard-000000.tar", "r+b") as f:
        f.truncate(cut)


@pytest.mark.parametrize("layout", ["manifest", "index files", "img2dataset stats", "nothing"])
def test_lost_samples_are_counted_as_many_as_were_lost(layout, tmp_path):
    out = tmp_path / "out"
    write_shards(_images(150), out, shard_size=50)
    _garble_and_cut(out)
    spec = str(out)
    if layout != "manifest":
        spec = f"{out}/shard-{{000000..000002}}.tar"
        os.remove(out / "manifest.json")
    if layout in ("img2dataset stats", "nothing"):
        for k in range(3):
            os.remove(out / f"shard-{k:06d}.idx")
    if layout == "img2dataset stats":
        for k in range(3):
            (out / f"shard-{k:06d}_stats.json").write_text(json.dumps({"count": 60, "successes": 50}))
    count = "at least 2" if layout == "nothing" else "80"
    with pytest.warns(UserWarning, match=rf"{count} sample\(s\) left out"):
        source = ShardSource(spec)
    assert len(source) == 70
    if layout == "nothing":  # no count anywhere: the damage counts once per shard, said to be a lower bound
        assert len(source.skipped) == 2 and all("lower bound" in why for _, why in source.skipped)
        return
    assert len(source.skipped) == 80  # 30 cut from shard 0, all 50 of shard 1
    assert sum("30 of its 50 samples lost" in why for _, why in source.skipped) == 30
    with pytest.raises(ValueError, match=r"80 of 150 of the dataset's samples are bad .*skipped_fraction"):
        build_loader(source, recipes.mae(8), batch_size=10, loader="torchvision", device="cpu",
                     num_threads=1, max_skipped_fraction=0.1)
