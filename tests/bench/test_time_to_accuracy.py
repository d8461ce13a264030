"""The time-to-accuracy benchmark on a tiny folder and a budget of seconds: a real `fastssl train`
child with its timers, the row it records, the peer's request per method, and the peer runner's
refusal where its tool is absent."""

import argparse
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastssl.bench import peer_lightly_train, peer_methods
from fastssl.bench import time_to_accuracy as tta

ROOT = Path(__file__).resolve().parents[2]


def _folder(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", 24), ("val", 8)):
        for label in range(2):
            d = root / split / f"class{label}"
            d.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8) + np.uint8(150 * label)
                Image.fromarray(img).save(d / f"{i}.png")
    return root


def test_a_budgeted_run_records_time_steps_knn_and_the_split(tmp_path):
    data = _folder(tmp_path / "data")
    results = tmp_path / "tta.jsonl"
    argv = [
        "--method",
        "simclr",
        "--data",
        str(data),
        "--budget-s",
        "120",
        "--out",
        str(tmp_path / "runs"),
        "--results",
        str(results),
        "backbone=resnet8",
        "image_size=8",
        "batch_size=8",
        "epochs=2",
        "eval_every=1",
        "loader=torchvision",
        "num_threads=1",
        "log_every=1",
    ]
    assert tta.main(argv) == 0
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert row["tool"] == "fastssl" and row["method"] == "simclr" and row["backbone"] == "resnet8"
    assert row["steps"] == 2 * (48 // 8) and row["batch_size"] == 8
    assert 0 <= row["knn_top1"] <= 1 and 0 <= row["knn_top1_random_init"] <= 1
    # the benchmark scores the trained backbone with the evaluator `fastssl train` used: the same top-1
    assert row["knn_top1"] == row["knn_top1_printed"] and 0 <= row["knn_top1_k200"] <= 1
    assert row["command"].startswith("fastssl train --method simclr --data ")
    assert row["images_per_second"] > 0 and row["command_wall_s"] > 0
    curve = row["knn_curve"]
    assert [c["step"] for c in curve] == [6, 12]  # every epoch, the last step included
    assert 0 < curve[0]["seconds"] < curve[1]["seconds"] < row["command_wall_s"]
    split = row["seconds"]
    assert set(split) == {"data", "forward", "backward", "optimizer", "evaluation", "other"}
    assert all(split[k] > 0 for k in ("data", "forward", "backward", "optimizer", "evaluation"))
    assert abs(sum(split.values()) - row["command_wall_s"]) < 1e-6
    assert row["torch"] and row["date"]  # the environment travels with the row


def test_the_peer_runner_says_where_its_tool_is_missing(tmp_path):
    request = {
        "out": str(tmp_path / "peer"),
        "data": str(tmp_path),
        "backbone": "resnet8",
        "image_size": 8,
        "epochs": 1,
        "batch_size": 8,
        "train_args": {},
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    try:
        import lightly_train  # noqa: F401

        pytest.skip("lightly_train is installed here: the runner would train")
    except ImportError:
        pass
    done = subprocess.run(
        [sys.executable, "-m", tta.PEER_RUNNER, json.dumps(request)], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "cannot import lightly_train" in done.stderr and "--peer-python" in done.stderr


def test_a_peer_needs_its_interpreter(capsys):
    with pytest.raises(SystemExit):
        tta.main(["--peer", "lightly-train"])
    assert "--peer-python" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tta.main(["--budget-s", "0"])
    with pytest.raises(SystemExit):  # the demo trains on Fashion-MNIST only
        tta.main(["--data", "/some/folder"])


# each fastssl Fashion-MNIST preset's views (its method's preset and recipe) as lightly-train's transform_args
SIMCLR_VIEWS = {"image_size": [20, 20], "random_resize": {"min_scale": 0.5, "max_scale": 1.0}}
DINO_VIEWS = {  # 2 global crops of 20 px, scale (0.4, 1); 4 local crops of 10 px, scale (0.05, 0.4)
    "image_size": [20, 20],
    "random_resize": {"min_scale": 0.4, "max_scale": 1.0},
    "local_view": {
        "num_views": 4,
        "view_size": [10, 10],
        "random_resize": {"min_scale": 0.05, "max_scale": 0.4},
    },
}


@pytest.mark.parametrize(
    "method, peer_name, modules, views",
    [
        (None, "simclr", ["EmbeddingModel", "SimCLRProjectionHead", "NTXentLoss"], SIMCLR_VIEWS),  # the demo
        ("simclr", "simclr", ["EmbeddingModel", "SimCLRProjectionHead", "NTXentLoss"], SIMCLR_VIEWS),
        ("dino", "dino", ["EmbeddingModel", "DINOProjectionHead", "DINOLoss"], DINO_VIEWS),
    ],
)
def test_the_peer_request_names_its_method_and_carries_fastssl_views(
    tmp_path, method, peer_name, modules, views
):
    args = argparse.Namespace(
        method=method, data="fashion-mnist", overrides=[], peer="lightly-train", peer_epochs=2,
        peer_args='{"seed": 3}',
    )
    cfg = tta._resolved_config(args)
    request = tta.peer_request(args, cfg, tmp_path / "png", tmp_path / "peer")
    assert request["method"] == peer_name and request["forward_modules"] == modules
    assert request["batch_size"] == 128 and request["epochs"] == 2
    assert request["data"] == str(tmp_path / "png") and request["out"] == str(tmp_path / "peer")
    assert request["backbone"] == cfg.model.backbone and request["image_size"] == views["image_size"][0]
    assert request["train_args"] == {"transform_args": views, "seed": 3}  # --peer-args over the defaults
    json.dumps(request)  # travels as one command-line argument


def test_a_pair_without_a_peer_method_is_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        tta.main(["--method", "mocov2", "--peer", "lightly-train", "--peer-python", sys.executable])
    (line,) = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert "--method mocov2 --peer lightly-train" in line and "dino" in line and "simclr" in line
    with pytest.raises(ValueError, match="--peer other: expected one of"):
        peer_methods.peer_method("other", "dino")


def test_the_peer_times_backward_end_at_the_trained_copy_of_the_first_layer():
    # DINO's trainer is handed the teacher and trains a deep copy: the copy's first layer ends backward
    import torch

    teacher = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    student = copy.deepcopy(teacher)
    timers = tta.StepTimers(lambda module: False)
    try:
        peer_lightly_train.watch_trained_first_layer(timers, next(teacher.parameters()))
        optimizer = torch.optim.SGD(student.parameters(), lr=0.1)

        def closure():
            optimizer.zero_grad()
            loss = student(torch.ones(2, 3)).sum()
            loss.backward()
            return loss

        for _ in range(2):
            optimizer.step(closure)
    finally:
        result = timers.result()
    assert len(result["step_ends_s"]) == 2
    assert 0 < result["update_s"] < result["optimizer_s"]  # the update alone, after backward ended
