"""parallel=fsdp (FSDP2 over a 2-process gloo group) through the Trainer equals one process on
the full batch, for DINO (sharded student, EMA teacher, heads; center all-reduced) and MAE
(sharded encoder and decoder), with activation checkpointing: the same losses and the same
parameters after two steps."""

import pytest
import torch
from dist_utils import run_gloo
from ssl_tiny import SIZES, MultiViewLoader, full_state, record_losses, tiny_method
from torch.distributed.tensor import DTensor

from fastssl.engine import Trainer
from fastssl.engine.parallel import check_parallel_config


def _run(rank, world, name, out, overrides):
    method = tiny_method(name, out, max_steps=2, **overrides)
    losses = record_losses(method)
    loader = MultiViewLoader(SIZES[name], shard_id=rank, num_shards=world)
    Trainer(method, loader, progress=False, log=lambda m: None).fit()
    sharded = sum(isinstance(p, DTensor) for p in method.parameters())
    return {"losses": losses, "state": full_state(method), "sharded": sharded,
            "params": sum(1 for _ in method.parameters())}


def _run_both(rank, world, out, overrides):
    return {name: _run(rank, world, name, f"{out}/{name}", overrides) for name in ("dino", "mae")}


# SGD: attention's key bias has an exactly-zero gradient (softmax is shift-invariant), so
# AdamW would turn each run's float rounding in it into full +-lr steps; SGD keeps the
# comparison linear in the gradients. AdamW on shards is exercised by the DCP resume test.
SETTINGS = {"optimizer": "sgd", "momentum": 0.9}


@pytest.mark.slow  # ~70 s on a busy 2-core CPU: spawning two processes that import torch and timm
def test_fsdp_two_processes_equal_one_process(tmp_path):
    ranks = run_gloo(_run_both, 2, str(tmp_path / "fsdp"),
                     SETTINGS | {"parallel": "fsdp", "activation_checkpointing": True})
    for name in ("dino", "mae"):
        one = _run(0, 1, name, str(tmp_path / "one" / name), SETTINGS)
        fsdp = [ranks[r][name] for r in range(2)]
        assert fsdp[0]["sharded"] == fsdp[0]["params"] > 0  # every parameter (teacher included) is a shard
        for step in range(2):
            mean = (fsdp[0]["losses"][step] + fsdp[1]["losses"][step]) / 2
            assert abs(mean - one["losses"][step]) < 1e-5 * max(1.0, abs(one["losses"][step])), (name, step)
        assert one["state"].keys() == fsdp[0]["state"].keys()
        for key, value in one["state"].items():
            for r in range(2):
                torch.testing.assert_close(fsdp[r]["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
        # the run moved the parameters (the comparison is not between two initial states)
        start = full_state(tiny_method(name, str(tmp_path / "x")))
        assert any(not torch.allclose(start[k], v) for k, v in one["state"].items() if v.is_floating_point())


def test_fsdp_refuses_resnets(tmp_path):
    from fastssl.engine import resolve_config
    from fastssl.methods import METHODS

    cls = METHODS["mocov3"]
    cfg = resolve_config(cls.config_class, None, dict(backbone="resnet8", image_size=8, parallel="fsdp",
                                                      mlp_hidden_dim=16, moco_dim=8, out=str(tmp_path)))
    with pytest.raises(ValueError, match=r"parallel=fsdp.*resnet8.*parallel=ddp"):
        check_parallel_config(cfg, cls(cfg))
    cfg.parallel = "zero3"
    with pytest.raises(ValueError, match="parallel: expected one of"):
        check_parallel_config(cfg, cls(cfg))
