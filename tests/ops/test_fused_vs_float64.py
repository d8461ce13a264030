"""Every fused op in its training form (tests/grad_compare.py: MoCo v2 with its queue, in-batch
with and without normalization, DINO, multi-label, the MAE pipeline in the model's layout, SigLIP
with its learned scale and bias, iBOT's patch loss, CLIP's one grid with its learned scale), loss
and every gradient against float64 by DESIGN.md's rule: on the CPU under the interpreter in fp32
and fp16, on CUDA in bf16 and fp32. And the comparison shown to catch a wrong backward: each
registered backward, its gradient scaled by 1.01, fails it."""

import importlib

import pytest
import torch
from grad_compare import OP_CASES, compare, info_nce_queue, scaled_backward

info_nce_module = importlib.import_module("fastssl.ops.info_nce")
dino_module = importlib.import_module("fastssl.ops.dino_loss")
mae_module = importlib.import_module("fastssl.ops.mae")
siglip_module = importlib.import_module("fastssl.ops.siglip_loss")
ibot_module = importlib.import_module("fastssl.ops.ibot_patch_loss")
clip_module = importlib.import_module("fastssl.ops.clip_loss")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("name", list(OP_CASES))
def test_fused_within_the_rule_on_cpu(name, dtype):
    assert compare(OP_CASES[name], device="cpu", dtype=dtype, backend="triton") == []


# (case, custom op, index of the backward's output, the gradients that must be flagged)
BROKEN = [
    ("info_nce_queue", info_nce_module._fwd_op, 0, {"dquery"}),
    ("info_nce_in_batch", info_nce_module._fwd_op, 1, {"dkey"}),
    ("info_nce_unnormalized", info_nce_module._fwd_op, 0, {"dquery"}),
    ("dino_loss", dino_module._fwd_op, 0, {"dstudent"}),
    ("multilabel", dino_module._fwd_op, 0, {"dlogits"}),
    ("mae_pipeline", mae_module._random_masking_fwd_op, 0, {"dpatch_tokens"}),
    ("mae_pipeline", mae_module._random_masking_fwd_op, 4, {"dcls_token"}),
    ("mae_pipeline", mae_module._unshuffle_tokens_fwd_op, 2, {"dmask_token"}),
    ("mae_pipeline", mae_module._mae_loss_fwd_op, 0,
     {"dpatch_tokens", "dcls_token", "dmask_token", "ddecoder_embed", "ddecoder_pred"}),
    ("siglip", siglip_module._fwd_op, 1, {"dtext"}),
    ("siglip", siglip_module._fwd_op, 2, {"dlogit_scale"}),
    ("ibot_patch_loss", ibot_module._fwd_op, 0, {"dstudent"}),
    ("clip", clip_module._fwd_op, 0, {"dimage", "dlog_scale"}),  # the scaled rows' gradient feeds both
    ("clip", clip_module._fwd_op, 1, {"dtext"}),
]


@pytest.mark.parametrize("name,op,index,flagged", BROKEN,
                         ids=[f"{b[0]}-{b[1]._name}-{b[2]}" for b in BROKEN])
def test_a_gradient_off_by_one_percent_fails_the_comparison(name, op, index, flagged):
    with scaled_backward(op, 1.01, index):
        failures = compare(OP_CASES[name], device="cpu", dtype=torch.float32, backend="triton")
    assert {line.split(":")[0] for line in failures} == flagged, failures
    assert compare(OP_CASES[name], device="cpu", dtype=torch.float32, backend="triton") == []  # restored


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name", list(OP_CASES))
def test_fused_within_the_rule_on_cuda(name, dtype):
    assert compare(OP_CASES[name], device="cuda", dtype=dtype, backend="auto") == []


@pytest.mark.gpu
def test_fp32_query_against_a_bf16_queue_on_cuda():
    """MoCo v2 on CUDA: an fp32 query (outside autocast) against the bf16 KeyQueue."""
    def case(**kw):
        return info_nce_queue(**kw, N=256, K=4096, D=128, queue_dtype=torch.bfloat16)

    assert compare(case, device="cuda", dtype=torch.float32, backend="auto") == []
