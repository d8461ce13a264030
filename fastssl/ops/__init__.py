"""Fused ops, all laid out alike: `<op>.py` holds the math (docstring), the custom ops, the
`<op>_ref` reference and the public function; `_<op>_kernels.py` (`_mae_kernels.py` for the MAE
family, `_dino_loss_kernels.py` for dino_loss and ibot_patch_loss) holds the Triton kernels, their
launchers and their traffic formulas (`KERNEL_TRAFFIC`). clip_loss runs the InfoNCE kernels with
their CLIP flags: `_clip_loss_kernels.py` holds its launchers only, `_info_nce_tiles.py` the InfoNCE
kernels' tile tables and launch shapes. `_tiles.py` holds what the streaming kernels share (a Triton
prologue, tile arithmetic), `_traffic.py` what the traffic formulas share.
`fastssl.ops.backend` picks the implementation."""

import importlib

from fastssl.ops.backend import HAS_TRITON
from fastssl.ops.clip_loss import clip_loss, clip_loss_ref
from fastssl.ops.dino_loss import dino_loss, dino_loss_ref, dino_loss_with_teacher_sum, soft_cross_entropy
from fastssl.ops.ibot_patch_loss import (
    ibot_patch_cross_entropy,
    ibot_patch_loss,
    ibot_patch_loss_ref,
    ibot_patch_loss_with_teacher_sum,
)
from fastssl.ops.info_nce import info_nce, info_nce_ref
from fastssl.ops.mae import mae_loss, patchify, random_masking, unpatchify, unshuffle_tokens
from fastssl.ops.siglip_loss import siglip_loss, siglip_loss_ref

__all__ = [
    "clip_loss", "clip_loss_ref", "dino_loss", "dino_loss_ref", "dino_loss_with_teacher_sum",
    "ibot_patch_cross_entropy", "ibot_patch_loss", "ibot_patch_loss_ref", "ibot_patch_loss_with_teacher_sum",
    "info_nce", "info_nce_ref", "kernel_traffic", "mae_loss", "patchify", "random_masking", "siglip_loss",
    "siglip_loss_ref", "soft_cross_entropy", "triton_kernels", "unpatchify", "unshuffle_tokens",
]

_KERNEL_MODULES = ("_dino_loss_kernels", "_info_nce_kernels", "_mae_kernels", "_siglip_loss_kernels")


def kernel_traffic() -> dict:
    """Every Triton kernel's traffic formula by kernel name: args (name -> value of one launch) ->
    (bytes read, bytes written, FLOPs); see fastssl.ops._traffic. Empty without triton."""
    if not HAS_TRITON:
        return {}
    table = {}
    for name in _KERNEL_MODULES:
        table.update(importlib.import_module(f"fastssl.ops.{name}").KERNEL_TRAFFIC)
    return table


def triton_kernels() -> dict:
    """Every @triton.jit function of the fused ops (kernels and their helpers) by name, for the
    compile checks. Empty without triton."""
    if not HAS_TRITON:
        return {}
    from triton.runtime.jit import JITFunction

    found = {}
    for name in _KERNEL_MODULES:
        module = importlib.import_module(f"fastssl.ops.{name}")
        found.update({k: v for k, v in vars(module).items() if isinstance(v, JITFunction)})
    return found
