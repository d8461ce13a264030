"""Model FLOPs, TFLOP/s and MFU of a training step, and compiled transformer blocks.

- the FLOPs counted on meta tensors for a ViT classifier (the weak method) equal the closed
  form: forward 24 N d^2 + 4 N^2 d per block per sample, the patch embedding and the head;
  the backward twice the forward's matmuls, less the patch embedding's input gradient;
- the Trainer's metrics rows carry TFLOP/s = those FLOPs / the step's seconds; MFU only on a
  card with a known peak (none on the CPU);
- compile=auto leaves the CPU eager; a block whose compilation fails (inductor without a
  working C++ compiler) logs one line and runs eagerly, with the eager result."""

import json

import pytest
import torch
from ssl_tiny import SIZES, MultiViewLoader, tiny_method
from timm.models.vision_transformer import Block

from fastssl.engine import Trainer
from fastssl.engine.flops import StepFlops, card_peak_tflops, step_flops
from fastssl.engine.parallel import compile_method, compile_with_fallback


def _closed_form(batch, depth=2, d=192, patch=4, side=16, classes=4):
    patches = (side // patch) ** 2
    tokens = patches + 1
    embed = 2 * patches * 3 * patch * patch * d
    blocks = depth * (24 * tokens * d * d + 4 * tokens * tokens * d)
    forward = batch * (blocks + embed) + 2 * batch * d * classes
    return 3 * forward - batch * embed


def test_step_flops_of_a_vit_classifier_equal_the_closed_form(tmp_path):
    method = tiny_method("weak", str(tmp_path))
    for batch in (4, 8):
        assert step_flops(method, [16], batch) == _closed_form(batch)


def test_rates_and_card_peaks():
    assert StepFlops(2 * 10**12, None).rates(2.0) == {"tflops": 1.0}
    assert StepFlops(989.5e12, 989.5).rates(2.0) == {"tflops": 494.75, "mfu": 0.5}
    assert StepFlops(None, 989.5).rates(1.0) == {}
    assert card_peak_tflops("NVIDIA H100 80GB HBM3") == 989.5
    assert card_peak_tflops("NVIDIA H100 PCIe") == 756.5
    assert card_peak_tflops("NVIDIA H200") == 989.5
    assert card_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert card_peak_tflops("NVIDIA GeForce GTX 1080") is None


def test_metrics_rows_carry_tflops_and_no_mfu_on_the_cpu(tmp_path):
    method = tiny_method("weak", str(tmp_path), max_steps=2)
    Trainer(method, MultiViewLoader(SIZES["weak"]), progress=False, log=lambda m: None).fit()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert len(rows) == 2
    for row in rows:
        assert "mfu" not in row
        step_seconds = 8 / row["img_per_s"]
        assert row["tflops"] * 1e12 * step_seconds == pytest.approx(_closed_form(8), rel=1e-6)


def test_compile_auto_leaves_the_cpu_eager(tmp_path):
    method = tiny_method("dino", str(tmp_path))
    assert compile_method(method, "auto", torch.device("cpu")) == 0
    assert compile_method(method, "false", torch.device("cuda")) == 0
    assert all(m._compiled_call_impl is None for m in method.modules())


def test_a_block_that_fails_to_compile_warns_once_and_runs_eagerly():
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = Block(dim=16, num_heads=2)
    x = torch.randn(2, 5, 16)
    expected = block(x)
    lines = []
    # config.patch restores the entry afterwards (monkeypatch would delete it: later compiles fail)
    with inductor_config.patch({"cpp.cxx": ("fastssl-no-such-compiler",)}):
        compile_with_fallback(block, log=lines.append)
        for _ in range(2):
            torch.testing.assert_close(block(x), expected, rtol=0, atol=0)
    assert len(lines) == 1 and lines[0].startswith("compile: Block failed to compile (")
    assert "running it eagerly" in lines[0] and "\n" not in lines[0]
    assert block._compiled_call_impl is None
    torch._dynamo.reset()
