"""The compile gate's flag grid: every option and dtype combination the public ops accept, each at
one small shape, so the gate compiles each kernel in every flag/dtype configuration a caller can
reach (the CPU suite's coverage check, gate_coverage.py, compares what it launches with these).

The shape grid (compile_gate.py) sizes the tiles at paper scales; here the shapes are picked
small so that each configuration takes the launcher's fixed tiles: one compile per kernel
configuration and target, no autotuned expansion. The dtypes are those each op takes on a card:
float32, bfloat16 and float16 for every op, float64 too for the ops that run it in their kernels
(DINO, iBOT, MAE: gradcheck on a GPU); InfoNCE, CLIP and SigLIP run float64 on their reference.
Mixed dtypes are those the library makes: an fp32 query against a 16-bit KeyQueue (or the
reverse), a float32 or float64 center beside 16-bit logits, fp32 image targets beside 16-bit
predictions. Gradients: none (evaluation), the query's only (a momentum key), or every input's.

The grid compiles for sm_90 only (compile_gate.FLAG_GRID_TARGETS): what a flag or dtype selects
compiles alike for every target, while each card's tiles are the shape grid's concern; sm_90 is
the target the coverage check compares with. About 460 compiles beyond the shape grid's."""

from __future__ import annotations

import itertools
from functools import partial

GRADS = ("none", "query", "all")
DINO_CALLS = ("dino", "dino+sum", "soft-ce", "soft-ce crops", "soft-ce exclude-same", "ibot tokens",
              "ibot tokens+sum", "ibot rows", "ibot rows+sum", "ibot cross-entropy",
              "ibot cross-entropy tokens")


def _t(*shape, dtype, grad=False):
    import torch

    return torch.empty(*shape, device="cuda", dtype=dtype, requires_grad=grad)


def _dtypes(fp64: bool = False) -> dict:
    import torch

    out = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    return out | ({"fp64": torch.float64} if fp64 else {})


def _info_nce(dt, queue_dt, *, normalize: bool, form: str, grads: str) -> None:
    import torch

    from fastssl.ops.info_nce import info_nce

    N, D = 64, 32 if dt == torch.float32 else 64  # D held whole in registers (ONE_CHUNK)
    q, k = _t(N, D, dtype=dt, grad=grads != "none"), _t(N, D, dtype=dt, grad=grads == "all")
    if form == "queue":
        info_nce(q, k, _t(1024, D, dtype=queue_dt), normalize=normalize, backend="triton")
    elif form == "nt-xent":  # both views stacked: the other view is the positive, self excluded
        info_nce(q, k, label_offset=0, exclude_self=True, normalize=normalize, backend="triton")
    else:
        info_nce(q, k, normalize=normalize, backend="triton")


def _clip(dt, *, grads: str, local: bool) -> None:
    import torch

    from fastssl.ops.clip_loss import clip_loss

    N, D = 64, 32 if dt == torch.float32 else 64
    image, text = _t(N, D, dtype=dt, grad=grads != "none"), _t(N, D, dtype=dt, grad=grads == "all")
    scale = _t((), dtype=torch.float32, grad=grads != "none")
    kw = dict(all_image_features=_t(2 * N, D, dtype=dt, grad=grads == "all"),
              all_text_features=_t(2 * N, D, dtype=dt, grad=grads == "all")) if local else {}
    clip_loss(image, text, scale, **kw, backend="triton")


def _siglip(dt, *, bias: bool, positives: bool, grads: str, N: int) -> None:
    import torch

    from fastssl.ops.siglip_loss import siglip_loss

    M, D = N, 64
    image, text = _t(N, D, dtype=dt, grad=grads != "none"), _t(M, D, dtype=dt, grad=grads == "all")
    scale = _t((), dtype=torch.float32, grad=grads != "none")
    b = _t((), dtype=torch.float32, grad=grads != "none") if bias else None
    siglip_loss(image, text, scale, b, label_offset=0 if positives else None, backend="triton")


def _dino(dt, center_dt, *, call: str) -> None:
    import torch

    from fastssl.ops.dino_loss import dino_loss, dino_loss_with_teacher_sum, soft_cross_entropy
    from fastssl.ops.ibot_patch_loss import (
        ibot_patch_cross_entropy,
        ibot_patch_loss,
        ibot_patch_loss_with_teacher_sum,
    )

    B, K, crops = 8, 1024, 4
    if call in ("dino", "dino+sum"):
        fn = dino_loss if call == "dino" else dino_loss_with_teacher_sum
        fn(_t(crops * B, K, dtype=dt, grad=True), _t(2 * B, K, dtype=dt), _t(1, K, dtype=center_dt),
           n_crops=crops, backend="triton")
    elif call.startswith("soft-ce"):  # multi-label targets (one block), or crops against targets
        if call == "soft-ce":
            soft_cross_entropy(_t(B, K, dtype=dt, grad=True), _t(B, K, dtype=dt), backend="triton")
        else:
            soft_cross_entropy(_t(crops * B, K, dtype=dt, grad=True), _t(2 * B, K, dtype=dt), n_crops=crops,
                               n_targets=2, exclude_same=call == "soft-ce exclude-same", backend="triton")
    else:  # iBOT's masked patches: token layout [B, L, K] (gathered rows) or the heads' [n, K] rows
        L, n = 16, 40
        masks = torch.empty(B, L, device="cuda", dtype=torch.bool)
        idx = torch.empty(n, device="cuda", dtype=torch.int64)
        weight = _t(n, dtype=torch.float32)
        center = _t(1, 1, K, dtype=center_dt)
        if call == "ibot tokens":
            ibot_patch_loss(_t(B, L, K, dtype=dt, grad=True), _t(B, L, K, dtype=dt), center, masks=masks,
                            mask_indices=idx, backend="triton")
        elif call == "ibot tokens+sum":
            ibot_patch_loss_with_teacher_sum(_t(B, L, K, dtype=dt, grad=True), _t(B, L, K, dtype=dt), center,
                                             masks=masks, mask_indices=idx, backend="triton")
        elif call == "ibot cross-entropy tokens":
            ibot_patch_cross_entropy(_t(B, L, K, dtype=dt, grad=True), _t(B, L, K, dtype=center_dt),
                                     masks=masks, mask_indices=idx, backend="triton")
        elif call == "ibot rows":
            ibot_patch_loss(_t(n, K, dtype=dt, grad=True), _t(n, K, dtype=dt), center, masks=masks,
                            masks_weight=weight, backend="triton")
        elif call == "ibot rows+sum":
            ibot_patch_loss_with_teacher_sum(_t(n, K, dtype=dt, grad=True), _t(n, K, dtype=dt), center,
                                             masks=masks, mask_indices=idx, masks_weight=weight,
                                             backend="triton")
        else:
            ibot_patch_cross_entropy(_t(n, K, dtype=dt, grad=True), _t(n, K, dtype=center_dt), masks=masks,
                                     masks_weight=weight, backend="triton")


def _mae_tokens(dt, *, pos: bool, cls: bool) -> None:
    from fastssl.ops.mae import random_masking, unshuffle_tokens

    N, L, D = 4, 16, 64
    x = _t(N, L, D, dtype=dt, grad=True)
    pos_embed = _t(L, D, dtype=dt) if pos else None
    cls_token = _t(D, dtype=dt) if cls else None
    kept, _, ids = random_masking(x, 0.75, pos_embed=pos_embed, cls_token=cls_token, backend="triton")
    dec_pos = _t(L + cls, D, dtype=dt) if pos else None
    unshuffle_tokens(_t(N, kept.shape[1], D, dtype=dt, grad=True), _t(D, dtype=dt, grad=True), ids,
                     pos_embed=dec_pos, with_cls_token=cls, backend="triton")


def _mae_loss(dt, target_dt, *, cls: bool, image_target: bool, norm_pix: bool) -> None:
    from fastssl.ops.mae import mae_loss

    N, L, p = 4, 16, 4
    mask = _t(N, L, dtype=dt)
    pred = _t(N, L + cls, 3 * p * p, dtype=dt, grad=True)
    target = _t(N, 3, 4 * p, 4 * p, dtype=target_dt) if image_target else _t(N, L, 3 * p * p, dtype=target_dt)
    mae_loss(pred, target, mask, norm_pix_loss=norm_pix, patch_size=p if image_target else None,
             with_cls_token=cls, backend="triton")


def flag_scenarios() -> list:
    """(name, callable) for each option combination of each op, per dtype."""
    import torch

    out = []
    for (name, dt), normalize, form, grads in itertools.product(_dtypes().items(), (True, False),
                                                                ("in-batch", "nt-xent", "queue"), GRADS):
        queues = {name: dt} if form != "queue" else (  # a KeyQueue's dtype may differ from the query's
            _dtypes() if dt == torch.float32 else {name: dt, "fp32": torch.float32})
        for qname, qdt in queues.items():
            label = f"flags info_nce {form} normalize={normalize} grads={grads} {name}"
            out.append((label + f" queue {qname}" * (form == "queue"),
                        partial(_info_nce, dt, qdt, normalize=normalize, form=form, grads=grads)))
    for (name, dt), grads, local in itertools.product(_dtypes().items(), GRADS, (False, True)):
        out.append((f"flags clip grads={grads} local={local} {name}",
                    partial(_clip, dt, grads=grads, local=local)))
    # N = M = 64: one split of the streamed rows; 4096: several, summed in fp32
    for (name, dt), bias, positives, grads, N in itertools.product(
            _dtypes().items(), (False, True), (False, True), GRADS, (64, 4096)):
        out.append((f"flags siglip bias={bias} positives={positives} grads={grads} N=M={N} {name}",
                    partial(_siglip, dt, bias=bias, positives=positives, grads=grads, N=N)))
    for (name, dt), call in itertools.product(_dtypes(fp64=True).items(), DINO_CALLS):
        centers = {"fp32": torch.float32, name: dt, "fp64": torch.float64}
        if call.startswith("soft-ce"):
            centers = {name: dt}  # no center: the targets, in the logits' dtype
        for cname, cdt in centers.items():
            out.append((f"flags dino {call} {name} center {cname}", partial(_dino, dt, cdt, call=call)))
    for (name, dt), pos, cls in itertools.product(_dtypes(fp64=True).items(), (False, True), (False, True)):
        out.append((f"flags mae tokens pos={pos} cls={cls} {name}",
                    partial(_mae_tokens, dt, pos=pos, cls=cls)))
    for (name, dt), cls, image_target, norm_pix in itertools.product(
            _dtypes(fp64=True).items(), (False, True), (False, True), (False, True)):
        targets = {name: dt} | ({"fp32": torch.float32} if dt in (torch.bfloat16, torch.float16) else {})
        for tname, tdt in targets.items():  # 16-bit predictions against fp32 targets (images kept in fp32)
            out.append((f"flags mae loss cls={cls} image_target={image_target} norm_pix={norm_pix} {name} "
                        f"target {tname}", partial(_mae_loss, dt, tdt, cls=cls, image_target=image_target,
                                                   norm_pix=norm_pix)))
    return out
