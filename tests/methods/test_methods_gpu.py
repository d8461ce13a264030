"""Every method's training step, fused against the reference, judged against float64 by the
design rule (tests/grad_compare.py: loss and every parameter gradient): on CUDA under bf16
autocast, as training runs; on the CPU under the interpreter in fp32, where a backward off by 1%
must fail it. RotNet, context prediction and colorization call no fused op and have nothing to
compare (checked: their step launches no kernel); every other method is compared on CUDA. On CUDA,
each method's second
step (after a warm-up step that autotunes) runs under torch.cuda.set_sync_debug_mode("error"):
the training step never waits for the device."""

import importlib

import pytest
import torch
from grad_compare import compare_step, method_backend, scaled_backward
from method_helpers import build, context, make_batch, one_thread, optimizer  # noqa: F401

from fastssl.methods import METHODS

NO_FUSED_OP = ("colorization", "context", "rotnet")
FUSED = sorted(set(METHODS) - set(NO_FUSED_OP))  # a new method is compared unless it joins NO_FUSED_OP
info_nce_module = importlib.import_module("fastssl.ops.info_nce")
mae_module = importlib.import_module("fastssl.ops.mae")
ibot_module = importlib.import_module("fastssl.ops.ibot_patch_loss")
dino_module = importlib.import_module("fastssl.ops.dino_loss")


def _ctx(method, step: int = 0):
    schedules = method.schedules(total_steps=100, steps_per_epoch=10)
    return context(step=step, epoch=1, **{k: float(v[step]) for k, v in schedules.items()})


@pytest.mark.parametrize("name", ["mocov2", "mocov3", "simclr", "dino", "mae", "dinov2", "instdisc", "weak"])
def test_fused_step_within_the_rule_on_cpu(name):
    method = build(name)
    batch = make_batch(method, batch_size=4)
    ctx = _ctx(method)
    assert compare_step(method, batch, ctx, device="cpu", dtype=torch.float32, backend="triton") == []


# (method, custom op, index of the backward's output, parameters whose gradient must be flagged)
BROKEN = [
    # the query gradient (MoCo v3's keys come from the momentum encoder): everything below the loss
    ("mocov3", info_nce_module._fwd_op, 0, {"dbase_encoder.0.conv1.weight", "dpredictor.0.weight"}),
    # the patch tokens' gradient: exactly the patch embedding below the masking
    ("mae", mae_module._random_masking_fwd_op, 0,
     {"dmodel.patch_embed.proj.weight", "dmodel.patch_embed.proj.bias"}),
    # iBOT's student-token gradient: the mask token reaches the loss through iBOT alone
    ("dinov2", ibot_module._fwd_op, 0, {"dstudent.mask_token", "dstudent.head.mlp.0.weight"}),
    # the logits' gradient of the multi-label softmax: the classifier and the backbone below it
    ("weak", dino_module._fwd_op, 0, {"dclassifier.weight", "dclassifier.bias", "dbackbone.conv1.weight"}),
]


@pytest.mark.parametrize("name,op,index,flagged", BROKEN,
                         ids=["mocov3-query", "mae-patch-tokens", "dinov2-ibot", "weak-logits"])
def test_a_gradient_off_by_one_percent_fails_the_step_comparison(name, op, index, flagged):
    method = build(name)
    batch, ctx = make_batch(method, batch_size=4), _ctx(method)
    with scaled_backward(op, 1.01, index):
        failures = compare_step(method, batch, ctx, device="cpu", dtype=torch.float32, backend="triton")
    got = {line.split(":")[0] for line in failures}
    assert flagged <= got if name != "mae" else flagged == got, failures


@pytest.mark.parametrize("name", NO_FUSED_OP)
def test_methods_outside_the_comparison_launch_no_kernel(name, monkeypatch):
    """Why a method is left out of the fused-vs-reference comparison: its step, with every op
    asked for its kernel, launches none (under the interpreter, where each launch is seen)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches, run = [], InterpretedFunction.run

    def counting_run(self, *args, **kwargs):
        launches.append(self)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", counting_run)
    method = build(name)
    with method_backend(method, "triton"):
        loss = method(make_batch(method, batch_size=4), _ctx(method))["loss"]
    loss.backward()
    assert torch.isfinite(loss) and launches == []


@pytest.mark.gpu
@pytest.mark.parametrize("name", FUSED)
def test_bf16_step_fused_within_the_rule_on_cuda(name):
    """backend="triton": "auto" would send a small label space (weak) to the reference."""
    method = build(name)
    batch = make_batch(method, batch_size=16)
    ctx = _ctx(method)
    assert compare_step(method, batch, ctx, device="cuda", dtype=torch.bfloat16, backend="triton") == []


def _train_step(method, opt, batch, ctx):
    """The engine's step (fastssl/method.py) under bf16 autocast."""
    opt.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = method(batch, ctx)["loss"]
    loss.backward()
    method.before_optimizer_step(ctx)
    opt.step()
    method.after_optimizer_step(ctx)  # EMA teacher, queue push
    return loss.detach()


@pytest.mark.gpu
@pytest.mark.sync_debug
@pytest.mark.parametrize("name", sorted(METHODS))
def test_training_step_never_waits_for_the_gpu(name):
    method = build(name).cuda()
    opt = optimizer(method, 1e-3)
    batch = make_batch(method, batch_size=16)
    batch = {k: [v.cuda() for v in x] if k == "views" else x.cuda() for k, x in batch.items()}
    _train_step(method, opt, batch, _ctx(method, 0))  # warm-up: autotuning and lazy initialization sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss = _train_step(method, opt, batch, _ctx(method, 1))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss)
