"""Fixed work is reproducible: the same command twice on the same machine logs the same losses."""

import json

import numpy as np
import pytest
from PIL import Image

from fastssl.cli import build_parser, main


def _image_folder(root, n_per_class=16):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("dark", "bright")):
        (root / name).mkdir(parents=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 100, (16, 16, 3)) + 150 * c
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


def _losses(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_same_seed_same_losses(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="the dali extra is not installed")
    _image_folder(tmp_path / "data")
    runs = []
    for name in ("a", "b"):
        out = tmp_path / name
        argv = ["train", "--method", "mocov3", "--data", str(tmp_path / "data"), "--backbone", "resnet8",
                "--batch-size", "8", "--out", str(out), "image_size=16", "num_threads=1", "max_steps=4",
                "log_every=1", "eval_knn=false", "deterministic=true", "mlp_hidden_dim=32", "moco_dim=16",
                f"loader={backend}", "data_device=cpu"]
        assert main(argv) == 0
        runs.append(_losses(out))
    assert len(runs[0]) == 4 and all(np.isfinite(runs[0]))
    assert runs[0] == runs[1]  # exactly: seeded order, seeded augmentations, deterministic kernels


def test_the_demo_has_no_time_budget_unless_asked():
    assert build_parser().parse_args(["train"]).time_budget is None
    assert build_parser().parse_args(["train", "--time-budget", "60"]).time_budget == 60.0
