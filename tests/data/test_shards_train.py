"""`fastssl shards` then `fastssl train` / `fastssl eval` on the shards, every method, both
data backends; a 2-process gloo epoch on shards; the folder-data rules of fastssl.data.spec."""

import json
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastssl.cli import main
from fastssl.data import ImageFolderSource, ShardSource, data_splits
from fastssl.data import dali as dali_backend
from fastssl.data.spec import HOLDOUT_EVERY

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "mocov2": ["backbone=resnet8", "queue_size=16", "mlp_hidden_dim=16", "moco_dim=8"],
    "mocov3": ["backbone=resnet8", "mlp_hidden_dim=16", "moco_dim=8"],
    "dino": ["backbone=resnet8", "n_local_crops=2", "local_crop_size=8", "out_dim=32", "head_hidden_dim=16",
             "bottleneck_dim=8"],
    "mae": ["backbone=vit_tiny_patch4", "vit_depth=1", "decoder_dim=16", "decoder_depth=1",
            "decoder_heads=2"],
    "dinov2": ["backbone=vit_tiny_patch4", "vit_depth=1", "n_local_crops=2", "local_crop_size=8",
               "out_dim=32", "head_hidden_dim=16", "bottleneck_dim=8"],
    "rotnet": ["backbone=resnet8"],
    "weak": ["backbone=resnet8"],
}


def _image_folder(root, n_per_class=10, splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c, name in enumerate(("dark", "bright")):
            (root / split / name).mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 100, (18, 16, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shards")
    folder = _image_folder(tmp / "images")
    out = tmp / "data"
    assert main(["shards", str(folder), str(out / "train"), "--shard-size", "6"]) == 0
    assert main(["shards", str(folder), str(out / "val"), "--split", "test", "--shard-size", "6"]) == 0
    return out


def test_shards_command_writes_both_splits(shard_root):
    manifest = json.loads((shard_root / "train" / "manifest.json").read_text())
    assert manifest["total"] == 20 and manifest["samples_per_shard"] == [6, 6, 6, 2]
    assert manifest["class_names"] == ["bright", "dark"]
    val = ShardSource(shard_root / "val")
    assert sorted(val.labels.tolist()) == [0] * 10 + [1] * 10


@pytest.mark.slow  # ~45 s on a loaded 2-core CPU: six runs and an evaluation in one process
def test_train_every_method_on_shards_then_eval(shard_root, tmp_path, capsys):
    """Each method trains 2 steps on the shards (DALI for half of them when installed), the
    brace pattern included; rotnet also runs the kNN evaluation on the val shards and
    `fastssl eval` reads them."""
    for k, (method, extra) in enumerate(TINY.items()):
        backend = "dali" if dali_backend.HAS_DALI and k % 2 else "torchvision"
        pattern = shard_root / "train" / "shard-{000000..000003}.tar"
        data = str(pattern) if method == "mae" else str(shard_root)
        out = tmp_path / method
        argv = ["train", "--method", method, "--data", data, "--batch-size", "4", "--out", str(out),
                "max_steps=2", f"eval_knn={method == 'rotnet'}", "num_threads=1", f"loader={backend}",
                "image_size=16", "log_every=1", *extra]
        assert main(argv) == 0, (method, capsys.readouterr().err)
        summary = json.loads((out / "summary.json").read_text())
        assert summary["steps"] == 2 and summary["skipped_samples"] == 0, method
        if method == "mae":  # the brace pattern has no val split: every 10th image of a class held out
            assert "holding out every 10th image" in capsys.readouterr().err
    summary = json.loads((tmp_path / "rotnet" / "summary.json").read_text())
    assert 0.0 <= summary["knn_top1"] <= 1.0
    checkpoint = str(tmp_path / "rotnet" / "last.pt")
    assert main(["eval", "--checkpoint", checkpoint, "--data", str(shard_root)]) == 0
    assert "kNN top-1" in capsys.readouterr().out


def test_corrupt_shard_is_counted_in_summary(shard_root, tmp_path):
    import shutil
    import tarfile

    data = tmp_path / "data"
    shutil.copytree(shard_root / "train", data)
    with tarfile.open(data / "shard-000000.tar") as tar:
        member = tar.getmembers()[0]  # the first sample's image
    with open(data / "shard-000000.tar", "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * (member.size - 8))
    out = tmp_path / "run"
    argv = ["train", "--method", "rotnet", "--data", str(data), "--batch-size", "18", "--out", str(out),
            "max_steps=1", "eval_knn=false", "num_threads=1", "loader=torchvision", "image_size=16",
            "backbone=resnet8", "seed=1", "max_skipped_fraction=0.1"]
    assert main(argv) == 0
    assert json.loads((out / "summary.json").read_text())["skipped_samples"] == 1
    argv[argv.index("max_skipped_fraction=0.1")] = "max_skipped_fraction=0.01"
    argv[argv.index(str(out))] = str(tmp_path / "run2")
    assert main(argv) == 2  # a clear error, not a traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


WORKER = """
import json, os, sys
import torch.distributed as dist
from fastssl.data import ShardSource, build_loader, recipes
from fastssl.cli import main
dist.init_process_group("gloo")
rank = dist.get_rank()
loader = build_loader(ShardSource(sys.argv[1]), recipes.mae(8), batch_size=3, loader="torchvision",
                      device="cpu", num_threads=2, shard_id=rank, num_shards=2, seed=7, shuffle_buffer=5)
seen = [i for b in loader for i in b["index"].tolist()]
box = [None, None]
dist.all_gather_object(box, seen)
if rank == 0:
    open(sys.argv[2], "w").write(json.dumps(box))
code = main(["train", "--method", "rotnet", "--data", sys.argv[1], "--batch-size", "4", "--out", sys.argv[3],
             "--epochs", "1", "eval_knn=false", "num_threads=1", "loader=torchvision", "image_size=16",
             "backbone=resnet8"])
dist.destroy_process_group()
sys.exit(code)
"""


@pytest.mark.slow  # ~35 s on a loaded 2-core CPU: two processes importing torch, a loader epoch and a run
def test_two_process_gloo_epoch_on_shards(shard_root, tmp_path):
    """2 ranks: disjoint shares covering the epoch, equal steps; a 1-epoch run on shards ends."""
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
                        "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    args = [str(shard_root / "train"), str(tmp_path / "seen.json"), str(tmp_path / "run")]
    procs = [subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, text=True,
                              env=env | {"RANK": str(r), "LOCAL_RANK": str(r)}) for r in (0, 1)]
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs
    a, b = json.loads((tmp_path / "seen.json").read_text())
    assert len(a) == len(b) == 9 and not set(a) & set(b)  # 20 samples, batch 3 per rank: 3 steps each
    assert len(set(a) | set(b)) == 18
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    # 18 samples pretrained on (no val/: 2 held out), 2 per rank per step: 4 steps on each rank.
    assert summary["steps"] == 18 // 4 and summary["world_size"] == 2 and summary["skipped_samples"] == 0


def test_folder_without_val_holds_out_every_tenth_image_per_class(tmp_path):
    folder = _image_folder(tmp_path / "f", n_per_class=25, splits=("train",))
    splits = data_splits(str(folder))
    assert len(splits.test) == 2 * 2 and len(splits.pretrain) == 50 - 4 and splits.train is splits.pretrain
    held = sorted(os.path.basename(p) for p in splits.test.paths)
    # Names sorted as strings: 0, 1, 10, ..., 17 (position 9), 18, 19, 2, 20, ..., 24, 3, 4 (position 19).
    assert held == ["17.png", "17.png", "4.png", "4.png"] and HOLDOUT_EVERY == 10
    assert not set(splits.test.paths) & set(splits.pretrain.paths)
    assert "holding out every 10th image" in splits.notes[0]
    assert splits.is_small() == "46 images of about 16 px"
    one = tmp_path / "one" / "only"
    one.mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(one / "a.png")
    splits = data_splits(str(tmp_path / "one"))
    assert splits.test is None and "one class only" in splits.notes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert isinstance(splits.pretrain, ImageFolderSource)


def test_small_folder_warns_with_the_small_image_preset(tmp_path, capsys):
    folder = _image_folder(tmp_path / "f", n_per_class=4)
    argv = ["train", "--method", "mocov2", "--data", str(folder), "--batch-size", "4", "--out",
            str(tmp_path / "run"), "max_steps=0", "eval_knn=false", "num_threads=1",
            "loader=torchvision"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "is small (8 images of about 16 px" in err and "'fashion-mnist' preset: backbone=resnet8" in err


@pytest.mark.slow  # ~35 s on a loaded 2-core CPU: three short runs through the CLI
def test_mid_epoch_resume_on_shards_repeats_the_uninterrupted_run(shard_root, tmp_path):
    """Stopped after step 2 of a 4-step epoch and resumed: the same losses at steps 2..5 as a
    run that never stopped (the loader restarts at batch 2 without reading batches 0, 1)."""
    def run(out, steps, resume=False):
        argv = ["train", "--method", "rotnet", "--data", str(shard_root), "--batch-size", "4",
                "--out", str(out), f"max_steps={steps}", "eval_knn=false", "num_threads=1",
                "loader=torchvision", "image_size=16", "backbone=resnet8", "log_every=1",
                "checkpoint_every=2", "fused=false"]
        assert main(argv + (["--resume", "auto"] if resume else [])) == 0
        records = map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in records}

    whole = run(tmp_path / "a", 6)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "b", 6, resume=True)
    assert [resumed[s] for s in range(6)] == [whole[s] for s in range(6)]


def test_shards_from_a_labels_file_and_tags_from_labels(tmp_path):
    folder = _image_folder(tmp_path / "img", n_per_class=3, splits=("train",))
    rows = [f"train/{c}/{i}.png,{c},{'night' if c == 'dark' else 'day'}" for c in ("dark", "bright")
            for i in range(3)]
    (folder / "labels.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    assert main(["shards", str(folder / "labels.csv"), str(tmp_path / "s1"), "--shard-size", "4"]) == 0
    s1 = ShardSource(tmp_path / "s1")
    assert s1.tag_vocabulary() == ["bright", "dark", "day", "night"] and s1.labels.tolist() == [-1] * 6
    assert s1.tags(s1.tag_vocabulary())[:3] == [[1, 3]] * 3
    # method weak trains on the tags through the manifest's vocabulary (4 classes, not the default 10)
    out = tmp_path / "weak"
    assert main(["train", "--method", "weak", "--data", str(tmp_path / "s1"), "--batch-size", "2",
                 "--out", str(out), "max_steps=1", "num_threads=1", "loader=torchvision",
                 "image_size=16", "backbone=resnet8"]) == 0
    assert "num_classes: 4" in (out / "config.yaml").read_text()
    single = folder / "single.csv"
    single.write_text("\n".join(r.rsplit(",", 1)[0] for r in rows) + "\n")
    assert main(["shards", str(single), str(tmp_path / "s2")]) == 0
    s2 = ShardSource(tmp_path / "s2")
    assert s2.classes == ["bright", "dark"] and s2.labels.tolist() == [1, 1, 1, 0, 0, 0]
    assert main(["shards", str(folder), str(tmp_path / "s3"), "--labels", str(single)]) == 0
    s3 = ShardSource(tmp_path / "s3")
    assert s3.classes == ["bright", "dark"] and s3.tags(["bright", "dark"]) == [[0]] * 3 + [[1]] * 3
