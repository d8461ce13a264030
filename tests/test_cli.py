import json

import numpy as np
import pytest
from PIL import Image

from fastssl.cli import main


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_method(capsys):
    err = _error(capsys, ["train", "--method", "simclr"])
    assert "--method: expected one of" in err and "mocov2" in err and "'simclr'" in err


def test_missing_data_path(capsys, tmp_path):
    err = _error(capsys, ["train", "--method", "rotnet", "--data", str(tmp_path / "nowhere")])
    assert "--data: expected 'fashion-mnist' or an existing image folder" in err and "nowhere" in err


def test_bad_override_key(capsys):
    err = _error(capsys, ["train", "--method", "mocov2", "tempreture=0.1"])
    assert "unknown key 'tempreture'" in err and "temperature" in err
    err = _error(capsys, ["train", "--method", "mocov2", "queue_size=many"])
    assert "queue_size" in err and "'many'" in err
    err = _error(capsys, ["train", "--method", "mocov2", "noequals"])
    assert "expected key=value" in err


def test_bench_unknown_name_and_bad_checkpoint(capsys, tmp_path):
    assert "bench: expected names among" in _error(capsys, ["bench", "no_such_bench"])
    err = _error(capsys, ["eval", "--checkpoint", str(tmp_path / "x.pt")])
    assert "checkpoint: expected an existing file" in err


def _image_folder(root, n_per_class=8):
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(("dark", "bright")):
            (root / split / name).mkdir(parents=True)
            for i in range(n_per_class):
                pixels = rng.integers(0, 100, (16, 16, 3)) + 150 * c
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")


@pytest.mark.slow
def test_train_then_eval_end_to_end(capsys, tmp_path):
    _image_folder(tmp_path / "data")
    out = tmp_path / "run"
    argv = ["train", "--method", "rotnet", "--data", str(tmp_path / "data"), "--backbone", "resnet8",
            "--epochs", "2", "--batch-size", "8", "--out", str(out), "image_size=16", "num_threads=1",
            "data_backend=torchvision", "log_every=1"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("method", "backbone", "epochs", "steps", "images_per_second", "knn_top1",
                "knn_top1_random_init", "device"):
        assert key in summary, key
    assert summary["method"] == "rotnet" and summary["steps"] == 4 and summary["epochs"] == 2
    assert 0.0 <= summary["knn_top1"] <= 1.0
    assert "image_size: 16" in (out / "config.yaml").read_text()
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert "kNN top-1" in capsys.readouterr().out
    assert main(["eval", "--checkpoint", str(out / "last.pt")]) == 0
    printed = capsys.readouterr().out
    assert "kNN top-1" in printed and "linear probe top-1" in printed


def test_weak_method_trains_on_its_resampling_sampler(monkeypatch, tmp_path):
    import fastssl.data
    from fastssl.data import ResamplingSampler

    _image_folder(tmp_path / "data")
    seen = {}
    real_build_loader = fastssl.data.build_loader

    def recording_build_loader(source, recipe, **kwargs):
        seen.setdefault("samplers", []).append(kwargs.get("sampler"))
        return real_build_loader(source, recipe, **kwargs)

    monkeypatch.setattr(fastssl.data, "build_loader", recording_build_loader)
    argv = ["train", "--method", "weak", "--data", str(tmp_path / "data"), "--backbone", "resnet8",
            "--loss", "sigmoid", "--sampling", "sqrt", "--epochs", "1", "--batch-size", "8",
            "--out", str(tmp_path / "run"), "image_size=16", "num_threads=1", "num_classes=2",
            "data_backend=torchvision", "eval_knn=false"]
    assert main(argv) == 0
    pretrain_sampler = seen["samplers"][0]
    assert isinstance(pretrain_sampler, ResamplingSampler) and pretrain_sampler.mode == "sqrt"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "loss: sigmoid" in config and "sampling: sqrt" in config


def test_loss_flag_is_rejected_by_methods_without_it(capsys):
    err = _error(capsys, ["train", "--method", "mocov2", "--loss", "sigmoid"])
    assert "unknown key 'loss'" in err


@pytest.mark.parametrize("method, backbone, size",
                         [("mocov2", "resnet20", 32), ("dino", "vit_tiny_patch7", 28)])
def test_fashion_mnist_runs_start_from_the_methods_preset(tmp_path, method, backbone, size):
    """--data fashion-mnist takes the method's small-image preset (not its ImageNet defaults);
    flags and key=value overrides still win over it."""
    import yaml

    out = tmp_path / "run"
    argv = ["train", "--method", method, "--data", "fashion-mnist", "--batch-size", "64", "--out", str(out),
            "max_steps=0", "eval_knn=false", "num_threads=1", "data_backend=torchvision", "seed=3"]
    assert main(argv) == 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert (config["backbone"], config["image_size"]) == (backbone, size)
    assert (config["batch_size"], config["seed"]) == (64, 3)
