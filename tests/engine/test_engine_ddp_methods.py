"""2-process gloo DDP through the Trainer, one spawn for every method here.

SyncBatchNorm runs only on GPUs, and per-rank BatchNorm statistics legitimately differ from
full-batch ones, so BatchNorm layers are replaced by Identity in every run. MoCo v3 (keys
gathered across ranks, symmetric loss, DDP gradient averaging, LARS, momentum encoder, GradCache
micro-batches) and colorization (each image's targets from its own pixels) must then equal one
process on the full batch. Context prediction draws its patch positions from a generator seeded by
the rank, so its ranks see different pairs by design: they must still hold identical parameters
after every step."""

import torch
import torch.nn.functional as F
from dist_utils import run_gloo
from engine_tiny import TinyLoader
from torch import nn

from fastssl.engine import Trainer, resolve_config

RUNS = {  # method -> the tiny configuration
    "mocov3": dict(backbone="resnet8", image_size=4, mlp_hidden_dim=32, moco_dim=16, optimizer="lars",
                   base_lr=0.6, sync_bn=False, accum_steps=2),  # GradCache: every row against all keys
    "colorization": dict(backbone="resnet8", image_size=4, optimizer="sgd", base_lr=0.5),
    "context": dict(backbone="resnet8", image_size=12, gap=2, jitter=1, head_hidden_dim=16, optimizer="sgd",
                    base_lr=0.5),
}


def _strip_bn(module: nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.Identity())
        else:
            _strip_bn(child)


class ResizedLoader(TinyLoader):
    """TinyLoader's batches with every view resized to `size` px (context needs a 3 x 3 grid of cells)."""

    def __init__(self, size: int, **kw):
        super().__init__(**kw)
        self.size = size

    def __iter__(self):
        for batch in super().__iter__():
            views = [F.interpolate(v, size=self.size, mode="nearest") for v in batch["views"]]
            yield batch | {"views": views}


def _runs(rank, world, out):
    from fastssl.methods import METHODS

    results = {}
    for name, overrides in RUNS.items():
        cls = METHODS[name]
        cfg = resolve_config(cls.config_class, None, dict(
            batch_size=8, epochs=1, lr_batch_divisor=8, warmup_epochs=0.0, max_steps=2, out=f"{out}/{name}",
            eval_knn=False, **overrides))
        torch.manual_seed(0)
        method = cls(cfg)
        _strip_bn(method)
        losses = []
        method.register_forward_hook(lambda m, args, res, losses=losses: losses.append(res["loss"].item()))
        loader = ResizedLoader(cfg.data.image_size, shard_id=rank, num_shards=world)
        Trainer(method, loader, progress=False, log=lambda m: None).fit()
        results[name] = {"losses": losses, "state": {k: v.clone() for k, v in method.state_dict().items()}}
    return results


def test_two_process_gloo_equals_one_process(tmp_path):
    ranks = run_gloo(_runs, 2, str(tmp_path / "ddp"))
    one = _runs(0, 1, str(tmp_path / "one"))
    # MoCo v3: each rank's loss is the mean over its queries against all gathered keys; colorization's
    # is the mean over its pixels: in both, the ranks' mean is the full batch's loss.
    for name in ("mocov3", "colorization"):
        for step in range(2):
            mean = (ranks[0][name]["losses"][step] + ranks[1][name]["losses"][step]) / 2
            full = one[name]["losses"][step]
            assert abs(mean - full) < 1e-5 * max(1.0, abs(full)), (name, step)
        for key, p in one[name]["state"].items():
            for r in range(2):
                torch.testing.assert_close(ranks[r][name]["state"][key], p, rtol=1e-4, atol=1e-5,
                                           msg=f"{name} {key}")
    context = [r["context"] for r in ranks]
    assert context[0]["losses"] != context[1]["losses"]  # other pairs on each rank
    for key, p in context[0]["state"].items():
        torch.testing.assert_close(context[1]["state"][key], p, rtol=0, atol=0, msg=f"context {key}")
