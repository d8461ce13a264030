"""fastssl.data.resolve_loader: the one rule for a run's "auto" loader and device, which the
CLI, the evaluator and build_loader all follow."""

import pytest
import torch

from fastssl.data import resolve_loader


def _dali_imports() -> bool:
    try:
        import nvidia.dali.fn  # noqa: F401
    except ImportError:
        return False
    return True


DALI_IMPORTS = _dali_imports()


def test_auto_picks_dali_exactly_when_it_imports():
    expected = "dali" if DALI_IMPORTS else "torchvision"
    assert resolve_loader("auto", "cpu")[0] == expected
    assert resolve_loader("torchvision", "cpu") == ("torchvision", "cpu")


def test_auto_device_follows_the_training_device():
    assert resolve_loader("torchvision", "auto", train_device=torch.device("cpu"))[1] == "cpu"
    assert resolve_loader("torchvision", "auto", train_device=torch.device("cuda", 1))[1] == "gpu"
    alone = "gpu" if torch.cuda.is_available() else "cpu"  # no training device: where CUDA is
    assert resolve_loader("torchvision", "auto")[1] == alone
    assert resolve_loader("torchvision", "cuda:1", train_device=torch.device("cpu"))[1] == "cuda:1"


def test_unknown_choice_and_missing_dali_are_named():
    with pytest.raises(ValueError, match=r"loader must be one of dali, torchvision, auto; got 'pil'"):
        resolve_loader("pil")
    if not DALI_IMPORTS:
        with pytest.raises(ImportError, match=r"NVIDIA DALI is not installed.*loader='torchvision'"):
            resolve_loader("dali")
    else:
        assert resolve_loader("dali", "cpu") == ("dali", "cpu")


def test_the_cli_and_the_evaluator_take_the_same_answer(tmp_path):
    from fastssl.cli import _data_options
    from fastssl.config import MethodConfig
    from fastssl.engine import resolve_config

    cfg = resolve_config(MethodConfig, overrides=dict(loader="auto", data_device="auto", num_threads=1))
    options = _data_options(cfg, torch.device("cpu"))
    assert (options["loader"], options["device"]) == resolve_loader("auto", "auto",
                                                                     train_device=torch.device("cpu"))
