"""Fused ops: Triton kernels with a pure-PyTorch reference (`*_ref`) each."""
from fastssl.ops.dino_loss import dino_loss, dino_loss_ref, dino_update_center_, soft_cross_entropy  # noqa: F401
from fastssl.ops.info_nce import info_nce, info_nce_ref  # noqa: F401
from fastssl.ops.mae import mae_loss, patchify, random_masking, unpatchify, unshuffle_tokens  # noqa: F401
