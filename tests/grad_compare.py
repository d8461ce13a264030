"""Fused vs reference, judged against float64 by DESIGN.md's rule, as plain functions of the
device and dtype: the GPU tests call them on CUDA in bf16 (what training runs), the CPU tests
under the Triton interpreter in fp32 / fp16, where a deliberately broken backward must make them
fail (`scaled_backward`).

The rule, per output and per gradient: max |fused - truth| <= 2 max |reference - truth| + atol,
truth = the reference in float64 on the same inputs, reference = the reference (backend="torch")
in the same low precision, atol = REL_ATOL[dtype] x max |truth|."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fastssl.losses.multilabel import multilabel_softmax_loss
from fastssl.ops import (
    clip_loss,
    dino_loss,
    ibot_patch_loss,
    info_nce,
    mae_loss,
    random_masking,
    siglip_loss,
    unshuffle_tokens,
)

F64 = torch.float64
REL_ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
Values = dict[str, torch.Tensor]


def rule_violations(got: Values, low: Values, truth: Values, rel_atol: float) -> list[str]:
    """One line per value of `truth` that `got` misses by more than the rule allows (empty: all hold)."""
    out = [f"{name}: missing" for name in truth if name not in got or name not in low]
    for name in truth.keys() & got.keys() & low.keys():
        t, g, lo = truth[name].double().cpu(), got[name].double().cpu(), low[name].double().cpu()
        if not torch.isfinite(g).all():
            out.append(f"{name}: not finite")
            continue
        err, ref_err = (g - t).abs().max().item(), (lo - t).abs().max().item()
        budget = 2 * ref_err + rel_atol * t.abs().max().item()
        if err > budget:
            out.append(f"{name}: error {err:.3g} > 2 x reference error {ref_err:.3g} + atol = {budget:.3g}")
    return sorted(out)


@contextlib.contextmanager
def scaled_backward(op_def, scale: float = 1.01, index: int = 0):
    """Within the block, the custom op `op_def`'s registered backward returns its gradient number
    `index` times `scale`: a wrong kernel gradient of the size the rule must catch."""
    original = op_def._backward_fn

    def backward(ctx, *grads):
        out = list(original(ctx, *grads))
        out[index] = None if out[index] is None else out[index] * scale
        return tuple(out)

    op_def._backward_fn = backward
    try:
        yield
    finally:
        op_def._backward_fn = original


def compare(case: Callable[..., Values], *, device: str, dtype: torch.dtype, backend: str) -> list[str]:
    """Run `case(backend=..., dtype=..., device=...)` fused (`backend`), as the reference in dtype and
    in float64, and apply the rule."""
    truth = case(backend="torch", dtype=F64, device=device)
    low = case(backend="torch", dtype=dtype, device=device)
    got = case(backend=backend, dtype=dtype, device=device)
    return rule_violations(got, low, truth, REL_ATOL[dtype])


def _inputs(seed: int, *shapes) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=F64) for s in shapes]


def _grads(loss: torch.Tensor, named: dict[str, torch.Tensor]) -> Values:
    grads = torch.autograd.grad(loss, list(named.values()))
    return {"loss": loss.detach(), **{f"d{name}": g for name, g in zip(named, grads)}}


def _leaf(x: torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    return x.to(device=device, dtype=dtype).requires_grad_()


# ---------------------------------------------------------------- one case per op and flag set


def info_nce_queue(*, backend, dtype, device, N=33, K=130, D=64, queue_dtype=None):
    """MoCo v2: query gradient against [key, queue]; the queue may be stored in another dtype
    (an fp32 query against a bf16 KeyQueue is the CUDA default)."""
    q, k, queue = _inputs(1, (N, D), (N, D), (K, D))
    q = _leaf(q, device, dtype)
    queue = F.normalize(queue, dim=1).to(device, queue_dtype or dtype)
    loss = info_nce(q, k.to(device, dtype), queue, temperature=0.2, backend=backend)
    return _grads(loss, {"query": q})


def info_nce_in_batch(*, backend, dtype, device, N=33, D=64, normalize=True):
    """MoCo v3 / SimCLR: query and key gradients; normalize=False contrasts raw rows."""
    q, k = _inputs(2, (N, D), (N, D))
    if not normalize:
        q, k = 0.2 * q, 0.2 * k
    q, k = _leaf(q, device, dtype), _leaf(k, device, dtype)
    loss = info_nce(q, k, temperature=0.2, normalize=normalize, backend=backend)
    return _grads(loss, {"query": q, "key": k})


def dino(*, backend, dtype, device, B=5, n_crops=4, K=300):
    student, teacher, center = _inputs(3, (n_crops * B, K), (2 * B, K), (1, K))
    s = _leaf(student, device, dtype)
    loss = dino_loss(s, teacher.to(device, dtype), (0.1 * center).to(device), n_crops=n_crops,
                     student_temp=0.1, teacher_temp=0.04, backend=backend)
    return _grads(loss, {"student": s})


def multilabel(*, backend, dtype, device, N=6, C=300):
    (logits,) = _inputs(4, (N, C))
    targets = torch.zeros(N, C)
    targets[torch.arange(N), torch.arange(N) * 7] = 1
    targets[:, 3] = 1
    x = _leaf(logits, device, dtype)
    loss = multilabel_softmax_loss(x, targets.to(device), validate=False, min_fused_classes=0,
                                   backend=backend)
    return _grads(loss, {"logits": x})


def mae_pipeline(*, backend, dtype, device, N=3, p=4, side=16, D=32, Dd=24):
    """The MAE model's own layout and flags: the patch embedding's output as timm's PatchEmbed
    returns it (a transposed view of the convolution's [N, D, L], D-major), the fixed position
    embedding fused into the masking gather, the class token written by the same pass, the
    decoder's unshuffle with the class token and its position embedding, a token mix standing for
    the decoder's attention, a linear prediction, and
    the loss read from the images in the patchify layout, skipping the class-token row."""
    L, P = (side // p) ** 2, p * p * 3
    conv_out, imgs, pos, dec_pos, cls, token, w_dec, w_pred = _inputs(
        5, (N, D, L), (N, 3, side, side), (1, 1 + L, D), (1, 1 + L, Dd), (1, 1, D), (Dd,), (D, Dd), (Dd, P))
    conv_out, cls, token = (_leaf(t, device, dtype) for t in (conv_out, cls, token))
    w_dec, w_pred = _leaf(w_dec / D**0.5, device, dtype), _leaf(w_pred / Dd**0.5, device, dtype)
    pos, dec_pos = pos.to(device, dtype), dec_pos.to(device, dtype)
    noise = torch.rand(N, L, generator=torch.Generator().manual_seed(6)).to(device)
    x = conv_out.transpose(1, 2)  # [N, L, D], D-major
    kept, mask, ids = random_masking(x, 0.75, noise=noise, pos_embed=pos[:, 1:], cls_token=cls + pos[:, :1],
                                     backend=backend)
    full = unshuffle_tokens(kept @ w_dec, token, ids, pos_embed=dec_pos, with_cls_token=True, backend=backend)
    # the decoder's attention: the kept tokens reach the loss, which scores masked positions only
    mixed = full + full.tanh().mean(dim=1, keepdim=True)
    loss = mae_loss(mixed @ w_pred, imgs.to(device, dtype), mask, norm_pix_loss=True, patch_size=p,
                    with_cls_token=True, backend=backend)
    return _grads(loss, {"patch_tokens": conv_out, "cls_token": cls, "mask_token": token,
                         "decoder_embed": w_dec, "decoder_pred": w_pred})


def siglip(*, backend, dtype, device, N=17, M=40, D=48):
    """SigLIP in-batch with its learned scale and bias (gradients for both towers and both scalars)."""
    image, text = _inputs(7, (N, D), (M, D))
    image, text = (_leaf(F.normalize(x, dim=1), device, dtype) for x in (image, text))
    scalar_dtype = F64 if dtype == F64 else torch.float32
    scale = torch.tensor(10.0, dtype=scalar_dtype, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, dtype=scalar_dtype, device=device, requires_grad=True)
    loss = siglip_loss(image, text, scale, bias, backend=backend)
    return _grads(loss, {"image": image, "text": text, "logit_scale": scale, "logit_bias": bias})


def clip(*, backend, dtype, device, N=33, D=48):
    """CLIP's one grid (both directions from one sweep) with open_clip's learned log-scale."""
    feats = [_leaf(F.normalize(x, dim=1), device, dtype) for x in _inputs(10, (N, D), (N, D))]
    scalar = F64 if dtype == F64 else torch.float32
    log_scale = torch.tensor(3.0, dtype=scalar, device=device, requires_grad=True)
    loss = clip_loss(*feats, log_scale.exp(), backend=backend)
    return _grads(loss, {"image": feats[0], "text": feats[1], "log_scale": log_scale})


def ibot(*, backend, dtype, device, B=3, L=10, K=200):
    """iBOT's masked-patch loss on [B, L, K] token logits, DINOv2's [1, 1, K] center."""
    student, teacher, center = _inputs(8, (B, L, K), (B, L, K), (1, 1, K))
    masks = torch.rand(B, L, generator=torch.Generator().manual_seed(9)) < 0.4
    masks[:, 0] = True  # every image has a masked token
    s = _leaf(student, device, dtype)
    loss = ibot_patch_loss(s, teacher.to(device, dtype), (0.1 * center).to(device), masks=masks.to(device),
                           mask_indices=masks.flatten().nonzero().flatten().to(device), backend=backend)
    return _grads(loss, {"student": s})


OP_CASES = {"info_nce_queue": info_nce_queue, "info_nce_in_batch": info_nce_in_batch,
            "info_nce_unnormalized": lambda **kw: info_nce_in_batch(**kw, normalize=False),
            "dino_loss": dino, "multilabel": multilabel, "mae_pipeline": mae_pipeline, "siglip": siglip,
            "ibot_patch_loss": ibot, "clip": clip}


# ---------------------------------------------------------------- a method's training step


@contextlib.contextmanager
def method_backend(method, backend: str):
    """Every fused op of `method` (its own calls and those of the modules that hold a backend of
    their own: its criterion, MAE's model and the model's criterion) forced to `backend`."""
    cls, had = type(method), "backend" in type(method).__dict__
    saved = cls.__dict__.get("backend")
    holders = [m for m in method.modules() if m is not method and hasattr(m, "backend")]
    saved_holders = [m.backend for m in holders]
    cls.backend = property(lambda self: backend)
    for m in holders:
        m.backend = backend
    try:
        yield
    finally:
        if had:
            cls.backend = saved
        else:
            del cls.backend
        for m, value in zip(holders, saved_holders):
            m.backend = value


def step_values(method, batch: dict, ctx, *, backend: str, dtype: torch.dtype, device: str,
                seed: int = 0) -> Values:
    """Loss and every parameter gradient of one training step of a copy of `method` on `device`:
    under autocast to `dtype` on CUDA for a 16-bit dtype (as training runs), else with the method
    and the views cast to `dtype`. Random draws (MAE's mask) repeat from `seed`."""
    import copy

    autocast = device != "cpu" and dtype in (torch.bfloat16, torch.float16)
    m = copy.deepcopy(method).to(device)
    if not autocast:
        m = m.to(dtype)
    views = [v.to(device, torch.float32 if autocast else dtype) for v in batch["views"]]
    batch = {**batch, "views": views, "label": batch["label"].to(device), "index": batch["index"].to(device)}
    with method_backend(m, backend), torch.autocast(device, dtype=dtype, enabled=autocast):
        torch.manual_seed(seed)
        loss = m(batch, ctx)["loss"]
    loss.float().backward()
    return {"loss": loss.detach(), **{f"d{n}": p.grad for n, p in m.named_parameters() if p.grad is not None}}


def compare_step(method, batch: dict, ctx, *, device: str, dtype: torch.dtype, backend: str) -> list[str]:
    """The rule over a training step: the fused step (`backend`) and the reference step in `dtype`
    against the reference step in float64, loss and every parameter gradient."""
    run = lambda backend, dtype: step_values(method, batch, ctx, backend=backend, dtype=dtype, device=device)  # noqa: E731
    return rule_violations(run(backend, dtype), run("torch", dtype), run("torch", F64), REL_ATOL[dtype])
