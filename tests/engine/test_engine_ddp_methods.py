"""2-process gloo DDP of MoCo v3 through the Trainer equals one process on the full batch.

SyncBatchNorm runs only on GPUs, and per-rank BatchNorm statistics legitimately differ from
full-batch ones, so BatchNorm layers are replaced by Identity in both runs: everything else
(keys gathered across ranks, symmetric loss, DDP gradient averaging, LARS, momentum
encoder) must match."""

import torch
from dist_utils import run_gloo
from engine_tiny import TinyLoader
from torch import nn

from fastssl.engine import Trainer, resolve_config


def _strip_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _strip_bn(child)


def _mocov3_run(rank, world, out):
    from fastssl.methods import METHODS

    cls = METHODS["mocov3"]
    cfg = resolve_config(cls.config_class, None, dict(
        backbone="resnet8", image_size=4, batch_size=8, epochs=1, mlp_hidden_dim=32, moco_dim=16,
        optimizer="lars", base_lr=0.6, lr_batch_divisor=8, warmup_epochs=0.0, sync_bn=False, max_steps=2,
        out=out, eval_knn=False))
    torch.manual_seed(0)
    method = cls(cfg)
    _strip_bn(method)
    losses = []
    method.register_forward_hook(lambda m, args, output: losses.append(output["loss"].item()))
    Trainer(method, TinyLoader(shard_id=rank, num_shards=world), progress=False, log=lambda m: None).fit()
    return {"losses": losses, "state": {k: v.clone() for k, v in method.state_dict().items()}}


def test_mocov3_two_process_gloo_equals_one_process(tmp_path):
    ranks = run_gloo(_mocov3_run, 2, str(tmp_path / "ddp"))
    one = _mocov3_run(0, 1, str(tmp_path / "one"))
    # Each rank's loss is the mean over its queries against all gathered keys: their mean is the full loss.
    for step in range(2):
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert abs(mean - one["losses"][step]) < 1e-5 * max(1.0, abs(one["losses"][step])), step
    for name, p in one["state"].items():
        for r in range(2):
            torch.testing.assert_close(ranks[r]["state"][name], p, rtol=1e-4, atol=1e-5, msg=name)
