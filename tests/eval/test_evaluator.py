import numpy as np
import pytest
import torch
from torch import nn

from fastssl.config import MethodConfig
from fastssl.data import ArraySource
from fastssl.engine import resolve_config
from fastssl.eval import build_evaluator, subsample_indices

CFG = resolve_config(MethodConfig, overrides=dict(image_size=16, loader="torchvision", data_device="cpu",
                                                  num_threads=1, seed=3))


def _dark_and_bright(n_per_class: int, seed: int) -> ArraySource:
    """Class 0: pixels in [0, 100); class 1: in [150, 250). After normalisation the classes point in
    opposite directions, so cosine kNN on raw pixels classifies every image right."""
    rng = np.random.default_rng(seed)
    labels = np.arange(2 * n_per_class) % 2
    images = rng.integers(0, 100, (2 * n_per_class, 16, 16)) + 150 * labels[:, None, None]
    return ArraySource(images.astype(np.uint8), labels)


class _Recorder(nn.Module):
    """Flattened pixels as features; remembers a fingerprint (pixel sum) of every image it sees."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))  # extract_features looks up the device here
        self.seen: list[float] = []

    def forward(self, x):
        self.seen += x.flatten(1).sum(1).tolist()
        return x.flatten(1) * self.weight


def test_subsample_indices_are_fixed_distinct_and_sorted():
    a, b = subsample_indices(1000, 50, seed=7), subsample_indices(1000, 50, seed=7)
    assert np.array_equal(a, b) and len(np.unique(a)) == 50 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 1000
    assert not np.array_equal(a, subsample_indices(1000, 50, seed=8))
    assert subsample_indices(10, None, 0) is None and subsample_indices(10, 10, 0) is None
    with pytest.raises(ValueError, match="subsample size"):
        subsample_indices(10, 0, 0)


def test_full_evaluation_separates_the_classes_and_shows_progress(capsys):
    train, test = _dark_and_bright(12, seed=0), _dark_and_bright(5, seed=1)
    encoder = _Recorder()
    result = build_evaluator(CFG, train, test, torch.device("cpu"), linear=True)(encoder)
    assert result["knn_top1"] == 1.0 and result["linear_top1"] == 1.0
    assert len(encoder.seen) == 24 + 10
    err = capsys.readouterr().err
    assert "train features" in err and "test features" in err and "kNN" in err


def test_subsample_is_the_same_images_at_every_call_and_quiet(capsys):
    train, test = _dark_and_bright(30, seed=0), _dark_and_bright(20, seed=1)
    evaluate = build_evaluator(CFG, train, test, torch.device("cpu"), max_train=8, max_test=6, progress=False)
    first, second = _Recorder(), _Recorder()
    assert evaluate(first)["knn_top1"] == 1.0
    evaluate(second)
    assert len(first.seen) == 8 + 6 and first.seen == second.seen
    assert capsys.readouterr().err == ""


def test_one_class_split_is_refused_with_the_reason():
    one_class = ArraySource(np.zeros((6, 16, 16), np.uint8), np.zeros(6, np.int64))
    with pytest.raises(ValueError, match=r"train split has 1 class.*eval_knn=false"):
        build_evaluator(CFG, one_class, _dark_and_bright(3, seed=1), torch.device("cpu"))
    with pytest.raises(ValueError, match="test split has 1 class"):
        build_evaluator(CFG, _dark_and_bright(3, seed=1), one_class, torch.device("cpu"))


def test_cli_refuses_knn_on_a_one_class_folder_in_one_line(tmp_path, capsys):
    from PIL import Image

    from fastssl.cli import main

    for split in ("train", "val"):
        (tmp_path / split / "only").mkdir(parents=True)
        for i in range(8):
            image = Image.fromarray(np.full((16, 16, 3), 10 * i, np.uint8))
            image.save(tmp_path / split / "only" / f"{i}.png")
    argv = ["train", "--method", "rotnet", "--data", str(tmp_path), "--backbone", "resnet8",
            "--batch-size", "4", "--out", str(tmp_path / "run"), "image_size=16", "num_threads=1",
            "loader=torchvision"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "kNN evaluation: the train split has 1 class(es)" in err and "eval_knn=false" in err
    assert "Traceback" not in err and not (tmp_path / "run" / "last.pt").exists()


def test_eval_size_sets_the_side_of_the_evaluated_images():
    """Training crops of 12 px, whole images evaluated at 16 (eval_size): the encoder sees 16x16."""

    shapes = []

    class Shapes(_Recorder):
        def forward(self, x):
            shapes.append(tuple(x.shape[1:]))
            return super().forward(x)

    train, test = _dark_and_bright(4, seed=0), _dark_and_bright(2, seed=1)
    for cfg, side in ((resolve_config(MethodConfig, overrides=dict(image_size=12, eval_size=16)), 16),
                      (resolve_config(MethodConfig, overrides=dict(image_size=12)), 12)):
        shapes.clear()
        build_evaluator(cfg, train, test, torch.device("cpu"), progress=False)(Shapes())
        assert set(shapes) == {(3, side, side)}
