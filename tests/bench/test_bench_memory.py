"""The memory plan measures on fake tensors what a real step holds: its parameter, gradient and
AdamW bytes equal the model's own tensor sizes (counted on a real, unsharded model here),
FSDP divides them by the world size (up to dim-0 padding), activation checkpointing lowers
the activations, and activations grow with the per-GPU batch. Runs in a subprocess, which
joins a fake process group of 4 ranks. The published rows of the scale-out plan are pinned to
counts made here by hand: DINOv2's ViT-g/14 model state, HSDP's shards (those of FSDP over one
node's 8 GPUs), the memory bank's bytes."""

import json
import math
from pathlib import Path

import forked
import pytest
import torch

from fastssl.bank import MemoryBank
from fastssl.bench import memory
from fastssl.bench.report import read_rows
from fastssl.engine import resolve_config
from fastssl.methods import METHODS

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
STATE = ("params", "grads", "optimizer", "teacher")

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


def _published(**key) -> list[dict]:
    return [r for r in read_rows(RESULTS / "memory_plan.jsonl")
            if all(memory.ac_mode(r[k]) == v if k == "checkpointing" else r[k] == v for k, v in key.items())]


def giant_params(image_size: int = 224, depth: int = 40) -> int:
    """DINOv2's vit_giant2 (embed 1536, 24 heads) with ffn_layer=swiglufused and layer scale, counted
    from its definition: the fused SwiGLU's hidden width is (int(4 D * 2 / 3) + 7) // 8 * 8, its w12
    maps D to both halves, w3 one half back to D; each block has two layer-scale vectors."""
    D, patch = 1536, 14
    hidden = (int(4 * D * 2 / 3) + 7) // 8 * 8
    tokens = 1 + (image_size // patch) ** 2  # class token + patches, each with a position
    embed = 3 * patch * patch * D + D + D + tokens * D  # patch conv (+ bias), class token, positions
    attention = (D * 3 * D + 3 * D) + (D * D + D)
    swiglu = (D * 2 * hidden + 2 * hidden) + (hidden * D + D)
    block = 2 * D + attention + D + 2 * D + swiglu + D  # norm1, attn, ls1, norm2, ffn, ls2
    return embed + depth * block + 2 * D


def test_published_dinov2_giant_rows_hold_its_model_state_counted_by_hand():
    """DINOv2's vitg14 configuration on DDP: vit_giant2 + a DINO head and a separate iBOT head
    (3-layer MLP 1536 -> 2048 -> 2048 -> 384, weight-normed 384 -> 131,072 prototypes whose gain g
    is frozen) + the mask token, fp32."""
    D, K, hidden, bottleneck = 1536, 131072, 2048, 384
    backbone = giant_params()
    mlp = (D * hidden + hidden) + (hidden * hidden + hidden) + (hidden * bottleneck + bottleneck)
    trainable = backbone + 2 * (mlp + K * bottleneck) + D
    tensors = 4 + 40 * 14 + 2 + 2 * 7 + 1  # embeddings, 40 blocks of 14, final norm, heads, mask token
    rows = _published(method="dinov2", backbone="vit_giant_patch14", parallel="ddp")
    assert rows
    for r in rows:
        assert r["params"] == r["grads"] == 4 * trainable
        assert r["optimizer"] == 2 * 4 * trainable + 4 * tensors  # exp_avg, exp_avg_sq, a step per tensor
        assert r["teacher"] == 4 * (trainable + 2 * K) + 4 * 2 * K  # the teacher, and the student's gains
        assert r["per_gpu_batch"] == 12 and r["out_dim"] == K


def test_published_hsdp_rows_shard_like_fsdp_over_one_node():
    """2 x 8 HSDP holds the shards FSDP over 8 GPUs holds (ceil(d0 / 8) rows of every tensor), for
    ViT-L, ViT-H and ViT-g with selective activation checkpointing; about an eighth of a DDP replica's."""
    hsdp = _published(parallel="hsdp")
    assert {(r["backbone"], memory.ac_mode(r["checkpointing"])) for r in hsdp} >= {
        (b, "selective") for b in ("vit_large_patch16", "vit_huge_patch14", "vit_giant_patch14")}
    for r in hsdp:
        assert r["mesh"] == [2, 8] and r["world"] == 16
        key = dict(method=r["method"], backbone=r["backbone"], world=8)
        (fsdp,) = _published(parallel="fsdp", checkpointing="none", **key)
        (ddp,) = _published(parallel="ddp", checkpointing="none", **key)
        assert {k: r[k] for k in STATE} == {k: fsdp[k] for k in STATE}
        assert ddp["params"] / 8 <= r["params"] < ddp["params"] / 7


def test_bank_rows_are_the_bank_bytes_by_hand():
    rows = {(r["dataset"], r["dtype"]): r for r in memory.bank_rows()}
    n, d, b, m = 1_281_167, 128, 256 // 8, 4096
    fp32, bf16 = rows["ImageNet-1k", "float32"], rows["ImageNet-1k", "bfloat16"]
    assert fp32["bank"] == n * d * 4 + (n + 1) * 4 + 8  # rows, an int32 claim per row (+ 1), a counter
    assert bf16["bank"] == n * d * 2 + (n + 1) * 4 + 8
    assert fp32["negatives_bytes"] == b * m * (d * 4 + 8)  # rows and their int64 indices
    assert bf16["negatives_bytes"] == b * m * (d * 2 + 8 + d * 4)  # and the float32 copy
    bank = MemoryBank(1000, 16, dtype=torch.bfloat16)  # the formula is every buffer a bank holds
    held = sum(t.numel() * t.element_size() for t in bank.buffers())
    assert held == MemoryBank.bytes(1000, 16, torch.bfloat16)
    published = read_rows(RESULTS / "memory_bank.jsonl")
    assert [{k: r[k] for k in fp32} for r in published] == memory.bank_rows()
