"""parallel=fsdp on the shipped Fashion-MNIST presets of DINO (channels-last, here with a ViT
backbone) and MAE: `fastssl train` under `torchrun --standalone` with 2 gloo ranks, 2 steps."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fastssl.data.sources import FASHION_MNIST_ROOT
from fastssl.engine.parallel import shard_method

REPO = Path(__file__).resolve().parents[2]
SMALL = ["max_steps=2", "batch_size=8", "eval_knn=false", "loader=torchvision", "num_threads=1",
         "log_every=1", "vit_depth=1"]
RUNS = {
    # a 7-px-patch ViT on the preset's crops at the images' own 28 px (the preset's ResNet trains at 20)
    "dino": ["backbone=vit_tiny_patch7", "image_size=28", "local_crop_size=14", "out_dim=64",
             "head_hidden_dim=32", "bottleneck_dim=16", "n_local_crops=2"],
    "mae": ["decoder_dim=16", "decoder_depth=1"],
}


@pytest.mark.slow  # ~1 min per method on a busy 2-core CPU: two processes importing torch and timm
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_ROOT), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("method", sorted(RUNS))
def test_fsdp_trains_the_shipped_preset(method, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastssl.cli", "train", "--method", method, "--data", "fashion-mnist",
           "--out", str(tmp_path / "run"), "parallel=fsdp", *SMALL, *RUNS[method]]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{method}: the fashion-mnist preset" in run.stdout + run.stderr
    assert "fsdp:" in run.stdout + run.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["world_size"] == 2


def test_channels_last_parameters_are_made_contiguous_before_sharding(monkeypatch):
    """On one process (a 1-rank gloo group): the channels-last conv weight that FSDP2 refuses
    is contiguous, with the same values, once sharded."""
    import torch.distributed as dist

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29700 + os.getpid() % 200))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        class Tiny(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(3, 4, 7, stride=7)

            def shard_units(self):
                return []

            def forward(self, x):
                return self.conv(x)

        method = Tiny().to(memory_format=torch.channels_last)
        assert not method.conv.weight.is_contiguous()
        weight = method.conv.weight.detach().clone()
        shard_method(method, torch.device("cpu"))
        full = method.conv.weight.full_tensor()
        assert full.is_contiguous() and torch.equal(full, weight)
        x = torch.randn(2, 3, 14, 14).contiguous(memory_format=torch.channels_last)
        bias = method.conv.bias.full_tensor()
        assert torch.allclose(method(x), nn.functional.conv2d(x, weight, bias, stride=7), atol=1e-6)
    finally:
        dist.destroy_process_group()
