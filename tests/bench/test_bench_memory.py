"""The memory plan measures on fake tensors what a real step holds: its parameter, gradient and
AdamW bytes equal the model's own tensor sizes (counted on a real, unsharded model here),
FSDP divides them by the world size (up to dim-0 padding), activation checkpointing lowers
the activations, and activations grow with the per-GPU batch. Runs in a subprocess, which
joins a fake process group of 4 ranks."""

import json
import math

import forked
import pytest
import torch

from fastssl.engine import resolve_config
from fastssl.methods import METHODS

TINY = dict(image_size=32, vit_depth=2, local_crop_size=16, n_local_crops=2, out_dim=256,
            head_hidden_dim=64, bottleneck_dim=32)
SCRIPT = f"""
import json
from fastssl.bench.memory import join_fake_group, measure
join_fake_group(4)
rows = [measure("dino", "vit_tiny_patch4", p, ac, 4, b, **{TINY!r})
        for p, ac, b in [("ddp", False, 8), ("ddp", True, 8), ("fsdp", False, 8), ("fsdp", True, 8),
                         ("ddp", False, 16)]]
rows.append(measure("dino", "vit_tiny_patch4", "ddp", False, 4, 8, vit_reg_tokens=4, **{TINY!r}))
print(json.dumps(rows))
"""


@pytest.mark.slow  # ~65 s on a busy 2-core CPU (five fake steps in a subprocess that imports torch and timm)
def test_memory_plan_measures_the_models_tensors_and_fsdp_shards_them():
    out = forked.run_code(SCRIPT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ddp, ddp_ac, fsdp, fsdp_ac, ddp_16, ddp_reg4 = json.loads(out.stdout.strip().splitlines()[-1])
    cls = METHODS["dino"]
    model = cls(resolve_config(cls.config_class, None, TINY | {"backbone": "vit_tiny_patch4"}))
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = [p for p in model.parameters() if not p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    assert ddp["params"] == ddp["grads"] == 4 * n_trainable  # fp32 master weights and gradients
    assert ddp["teacher"] == 4 * sum(p.numel() for p in frozen)
    # exp_avg and exp_avg_sq like each parameter, and a float32 step scalar per parameter
    assert ddp["optimizer"] == 2 * ddp["params"] + 4 * len(trainable)
    # FSDP2: each tensor split on dim 0 into 4 chunks of ceil(d0 / 4) rows; rank 0 holds the first
    shard = sum(4 * min(math.ceil(p.shape[0] / 4), p.shape[0]) * (p.numel() // p.shape[0]) for p in trainable)
    assert fsdp["params"] == fsdp["grads"] == shard
    assert fsdp["params"] < ddp["params"] / 3
    for a, b in ((ddp, ddp_ac), (fsdp, fsdp_ac)):
        assert 0 < b["activations"] < a["activations"]
    assert ddp_16["activations"] > 1.5 * ddp["activations"]
    assert all(r["peak"] > r["activations"] for r in (ddp, ddp_ac, fsdp, fsdp_ac))
    torch.testing.assert_close(ddp_ac["params"], ddp["params"])
    # 4 registers of width 192 in student and teacher, and no class-token row in their position tables
    assert ddp_reg4["reg_tokens"] == 4 and ddp_reg4["params"] - ddp["params"] == 4 * (4 - 1) * 192
    assert ddp_reg4["teacher"] - ddp["teacher"] == 4 * (4 - 1) * 192
    assert ddp_reg4["activations"] > ddp["activations"]  # 4 more tokens in every crop
