"""MAE token ops: random masking, decoder unshuffle with mask tokens, the masked pixel loss.

He et al., "Masked Autoencoders Are Scalable Vision Learners" (2021). The official code
(`random_masking`, `forward_decoder`, `forward_loss` in facebookresearch/mae) does two
argsorts, gathers through an N×L×D int64 index built with `repeat`, concatenates mask tokens
and runs the loss as 6+ passes. Here:

* the permutation comes from one sort of random keys; `ids_restore` is its inverse by a scatter;
* `_compact_kernel` copies kept rows x[n, l] -> x_kept[n, P + ids_restore[n, l]] (adding the
  encoder's position embedding and writing the class token as row 0, P = 1, in the same pass;
  and the mask, or the sum of the removed rows for the mask-token gradient), indexing rows directly;
* `_expand_kernel` rebuilds the full sequence: the class token, kept rows from x_kept, the mask
  token elsewhere, plus the decoder's position embedding - the official cat, gather, cat and add
  as one pass; the same kernel with a zero token is the masking backward;
* `_mae_loss_kernel` is the per-patch-normalized MSE in one pass over pred/target (the target
  read from the images in the patchify layout), and with BACKWARD=True the gradient to pred.

Every kernel reads its inputs through their strides: the patch embedding's transposed output,
the decoder's output with its class-token row and the images reach the kernels without a copy,
in the forward and in the backward (autograd saves the views). The kernels, their launchers
(`random_masking_fwd`/`_bwd`, `unshuffle_tokens_fwd`/`_bwd`, `mae_loss_fwd`/`_bwd`) and their
traffic formulas are in _mae_kernels.py; each kernel states its traffic in its docstring.

Layout: x [N, L, D], ids [N, L] int64, mask [N, L] with 0 = kept, 1 = removed, in the
original token order (as in the official code).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from fastssl.ops.backend import HAS_TRITON, resolve_backend
from fastssl.validation import check_bool, check_int, check_number, check_tensor

if HAS_TRITON:  # without triton only the references run (resolve_backend refuses "triton")
    from fastssl.ops._mae_kernels import (
        mae_loss_bwd,
        mae_loss_fwd,
        random_masking_bwd,
        random_masking_fwd,
        unshuffle_tokens_bwd,
        unshuffle_tokens_fwd,
    )

__all__ = [
    "random_masking",
    "random_masking_ref",
    "unshuffle_tokens",
    "unshuffle_tokens_ref",
    "mae_loss",
    "mae_loss_ref",
    "patchify",
    "unpatchify",
]

NORM_PIX_EPS = 1e-6  # the official forward_loss: (var + 1e-6) ** 0.5
MAX_PATCH_DIM = 16384  # the loss kernel keeps one patch row in registers


# ---------------------------------------------------------------------------------------------
# Custom ops, one fwd/bwd pair per public op (torch.compile traces through them; opcheck runs on
# each in the tests). Autograd saves the inputs themselves (views included), never a copy.
# ---------------------------------------------------------------------------------------------


@torch.library.custom_op("fastssl::random_masking_fwd", mutates_args=())
def _random_masking_fwd_op(x: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                           pos_embed: Optional[torch.Tensor],  # noqa: UP045
                           prefix: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: UP045
    return random_masking_fwd(x, ids_restore, len_keep=len_keep, pos_embed=pos_embed, prefix=prefix)


@_random_masking_fwd_op.register_fake
def _(x, ids_restore, len_keep, pos_embed, prefix):
    N, L, D = x.shape
    return x.new_empty(N, (prefix is not None) + len_keep, D), x.new_empty(N, L)


def _is_d_major(x: torch.Tensor) -> bool:
    return x.shape[1] > 1 and x.shape[2] > 1 and x.stride(2) == x.shape[1] and x.stride(1) == 1


def _random_masking_setup(ctx, inputs, output):
    x, ids_restore, _, _, prefix = inputs
    ctx.save_for_backward(ids_restore)
    ctx.has_prefix = prefix is not None
    # the gradient gets x's layout, so the patch embedding's backward receives a contiguous one
    ctx.d_major = _is_d_major(x)
    ctx.mark_non_differentiable(output[1])


def _random_masking_backward(ctx, grad_x_kept, grad_mask):
    (ids_restore,) = ctx.saved_tensors
    n_prefix = int(ctx.has_prefix)
    grad_x = _random_masking_bwd_op(grad_x_kept[:, n_prefix:], ids_restore, d_major=ctx.d_major)
    grad_prefix = grad_x_kept[:, 0].sum(0) if ctx.has_prefix and ctx.needs_input_grad[4] else None
    return grad_x, None, None, None, grad_prefix


_random_masking_fwd_op.register_autograd(_random_masking_backward, setup_context=_random_masking_setup)


@torch.library.custom_op("fastssl::random_masking_bwd", mutates_args=())
def _random_masking_bwd_op(grad_x_kept: torch.Tensor, ids_restore: torch.Tensor, d_major: bool) -> torch.Tensor:
    return random_masking_bwd(grad_x_kept, ids_restore, d_major=d_major)


@_random_masking_bwd_op.register_fake
def _(grad_x_kept, ids_restore, d_major):
    N, L, D = grad_x_kept.shape[0], ids_restore.shape[1], grad_x_kept.shape[2]
    return grad_x_kept.new_empty(N, D, L).transpose(1, 2) if d_major else grad_x_kept.new_empty(N, L, D)


@torch.library.custom_op("fastssl::unshuffle_tokens_fwd", mutates_args=())
def _unshuffle_tokens_fwd_op(x: torch.Tensor, ids_restore: torch.Tensor, mask_token: torch.Tensor,
                             pos_embed: Optional[torch.Tensor], has_prefix: bool) -> torch.Tensor:  # noqa: UP045
    return unshuffle_tokens_fwd(x, ids_restore, mask_token, pos_embed=pos_embed, has_prefix=has_prefix)


@_unshuffle_tokens_fwd_op.register_fake
def _(x, ids_restore, mask_token, pos_embed, has_prefix):
    return x.new_empty(x.shape[0], int(has_prefix) + ids_restore.shape[1], x.shape[2])


def _unshuffle_tokens_setup(ctx, inputs, output):
    x, ids_restore, _, _, has_prefix = inputs
    ctx.save_for_backward(ids_restore)
    ctx.has_prefix = has_prefix
    ctx.len_keep = x.shape[1] - int(has_prefix)


def _unshuffle_tokens_backward(ctx, grad_out):
    (ids_restore,) = ctx.saved_tensors
    grad_x, grad_token = _unshuffle_tokens_bwd_op(grad_out, ids_restore, len_keep=ctx.len_keep,
                                                  has_prefix=ctx.has_prefix)
    return grad_x, None, grad_token, None, None


_unshuffle_tokens_fwd_op.register_autograd(_unshuffle_tokens_backward, setup_context=_unshuffle_tokens_setup)


@torch.library.custom_op("fastssl::unshuffle_tokens_bwd", mutates_args=())
def _unshuffle_tokens_bwd_op(grad_out: torch.Tensor, ids_restore: torch.Tensor, len_keep: int,
                             has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return unshuffle_tokens_bwd(grad_out, ids_restore, len_keep=len_keep, has_prefix=has_prefix)


@_unshuffle_tokens_bwd_op.register_fake
def _(grad_out, ids_restore, len_keep, has_prefix):
    N, _, D = grad_out.shape
    return grad_out.new_empty(N, int(has_prefix) + len_keep, D), grad_out.new_empty(D)


@torch.library.custom_op("fastssl::mae_loss_fwd", mutates_args=())
def _mae_loss_fwd_op(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix_loss: bool,
                     patch_size: int, has_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return mae_loss_fwd(pred, target, mask, norm_pix_loss=norm_pix_loss, eps=NORM_PIX_EPS, patch_size=patch_size,
                        has_prefix=has_prefix)


@_mae_loss_fwd_op.register_fake
def _(pred, target, mask, norm_pix_loss, patch_size, has_prefix):
    acc = torch.float64 if torch.float64 in (pred.dtype, target.dtype) else torch.float32
    return pred.new_empty((), dtype=torch.promote_types(pred.dtype, target.dtype)), pred.new_empty((), dtype=acc)


def _mae_loss_setup(ctx, inputs, output):
    pred, target, mask, norm_pix_loss, patch_size, has_prefix = inputs
    ctx.save_for_backward(pred, target, mask, output[1])
    ctx.flags = dict(norm_pix_loss=norm_pix_loss, patch_size=patch_size, has_prefix=has_prefix)
    ctx.mark_non_differentiable(output[1])


def _mae_loss_backward(ctx, grad_loss, grad_mask_sum):
    pred, target, mask, mask_sum = ctx.saved_tensors
    return _mae_loss_bwd_op(grad_loss, pred, target, mask, mask_sum, **ctx.flags), None, None, None, None, None


_mae_loss_fwd_op.register_autograd(_mae_loss_backward, setup_context=_mae_loss_setup)


@torch.library.custom_op("fastssl::mae_loss_bwd", mutates_args=())
def _mae_loss_bwd_op(grad_loss: torch.Tensor, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                     mask_sum: torch.Tensor, norm_pix_loss: bool, patch_size: int, has_prefix: bool) -> torch.Tensor:
    return mae_loss_bwd(grad_loss, pred, target, mask, mask_sum, norm_pix_loss=norm_pix_loss, eps=NORM_PIX_EPS,
                        patch_size=patch_size, has_prefix=has_prefix)


@_mae_loss_bwd_op.register_fake
def _(grad_loss, pred, target, mask, mask_sum, norm_pix_loss, patch_size, has_prefix):
    return pred.new_empty(pred.shape)


# ---------------------------------------------------------------------------------------------
# References: the official code path (two argsorts, repeat-built gather index, cat, multi-pass loss)
# ---------------------------------------------------------------------------------------------


def random_masking_ref(
    x: torch.Tensor, mask_ratio: float = 0.75, *, noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None, pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official `random_masking` (stable argsort for ties; noise drawn as `random_masking` draws
    it when not given), after the encoder's `x + pos_embed` when one is given, followed by its
    `torch.cat([cls_token, x])` when cls_token [D] is given. Same arguments as `random_masking`."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(N, L, generator=generator, device=x.device)
    if pos_embed is not None:
        x = x + pos_embed.reshape(L, D).to(x.dtype)
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, D))
    mask = torch.ones(N, L, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    if cls_token is not None:
        x_kept = torch.cat([cls_token.reshape(1, 1, D).to(x.dtype).expand(N, -1, -1), x_kept], dim=1)
    return x_kept, torch.gather(mask, 1, ids_restore), ids_restore


def unshuffle_tokens_ref(x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, *,
                         pos_embed: torch.Tensor | None = None, with_cls_token: bool = False) -> torch.Tensor:
    """The official `forward_decoder` step: cat mask tokens, gather (then, with_cls_token, put row 0
    back in front), then `+ pos_embed` when one is given. Same arguments as `unshuffle_tokens`."""
    cls, x_kept = (x_kept[:, :1], x_kept[:, 1:]) if with_cls_token else (None, x_kept)
    N, K, D = x_kept.shape
    L = ids_restore.shape[1]
    mask_tokens = mask_token.reshape(1, 1, D).to(x_kept.dtype).repeat(N, L - K, 1)
    x_ = torch.cat([x_kept, mask_tokens], dim=1)
    x = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, D))
    if cls is not None:
        x = torch.cat([cls, x], dim=1)
    if pos_embed is not None:
        x = x + pos_embed.reshape(1, x.shape[1], D).to(x.dtype)
    return x


def mae_loss_ref(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool = True,
                 patch_size: int | None = None, with_cls_token: bool = False) -> torch.Tensor:
    """The official `forward_loss` (target = patchify(imgs, patch_size) when patch_size is given;
    pred[:, 1:] when with_cls_token), in fp32 (fp64 stays fp64). Same arguments as `mae_loss`.

    Under autocast the official loss also runs in fp32: bf16 `pred` meets fp32 `target`."""
    if with_cls_token:
        pred = pred[:, 1:]
    if patch_size is not None:
        target = patchify(target, patch_size)
    out_dtype = torch.promote_types(pred.dtype, target.dtype)
    acc = torch.promote_types(out_dtype, torch.float32)
    pred, target = pred.to(acc), target.to(acc)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + NORM_PIX_EPS) ** 0.5
    loss = ((pred - target) ** 2).mean(dim=-1)
    mask = mask.to(acc)
    return ((loss * mask).sum() / mask.sum()).to(out_dtype)


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _check_ids_restore(ids_restore: object, N: int, min_len: int, device: torch.device) -> torch.Tensor:
    check_tensor("ids_restore", ids_restore, ndim=2, dtypes=(torch.int64,), device=device, like="x_kept")
    if ids_restore.shape[0] != N or ids_restore.shape[1] < min_len:
        raise ValueError(
            f"ids_restore must be [N={N}, L] with L >= len_keep={min_len} (a permutation of range(L) per row), "
            f"got shape {tuple(ids_restore.shape)}"
        )
    return ids_restore


def random_masking(
    x: torch.Tensor,
    mask_ratio: float = 0.75,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MAE per-sample random masking (He et al. 2021, `random_masking`).

    x [N, L, D]; len_keep = int(L * (1 - mask_ratio)). With `noise` [N, L]: ids_shuffle =
    argsort(noise) (stable), the first len_keep are kept - identical to the official function.
    Without: noise = torch.rand(N, L, device=x.device) from `generator` (or the default
    generator), the official draw, so the same seed gives the official code's mask (the two sorts
    differ only where two noise values tie, which the official unstable argsort leaves unspecified).

    pos_embed [L, D] or [1, L, D] (optional): the encoder's positional embedding, cast to x's
    dtype and added to the kept rows inside the gather, i.e. the result equals masking
    x + pos_embed without that full-size pass. A pos_embed that requires grad (a learned one)
    is added by torch before the gather instead, so its gradient is exact either way.

    cls_token [D] or [1, 1, D] (optional): written as row 0 of every sample's kept tokens by the
    same pass, i.e. the official encoder's `torch.cat([cls_token + pos_embed[:, :1], x], dim=1)`
    (pass that sum); its gradient is the sum over samples of row 0's.

    x may have any strides (the patch embedding's output is a transposed view): it is read in
    place, and its gradient gets its layout.

    Returns x_kept [N, P + len_keep, D] (P = 1 with cls_token, then x's rows in shuffle order), mask [N, L] in x's dtype
    (0 kept, 1 removed, original order) and ids_restore [N, L] int64 (the inverse permutation).
    Gradient flows to x (zero at removed tokens)."""
    check_tensor("x", x, ndim=3)
    N, L, D = x.shape
    mask_ratio = check_number("mask_ratio", mask_ratio, low=0.0, high=1.0, high_open=True)
    len_keep = int(L * (1 - mask_ratio))
    if len_keep == 0:
        raise ValueError(f"mask_ratio={mask_ratio} keeps int({L} * (1 - {mask_ratio})) = 0 of L={L} tokens; need >= 1")
    if noise is not None:
        if generator is not None:
            raise ValueError("give noise or generator, not both (noise already fixes the permutation)")
        check_tensor("noise", noise, ndim=2, device=x.device, like="x")
        if tuple(noise.shape) != (N, L):
            raise ValueError(f"noise must have shape [N, L] = {(N, L)} like x, got {tuple(noise.shape)}")
    elif generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if generator.device.type != x.device.type:
            raise ValueError(f"generator must be on x's device type {x.device.type}, got {generator.device}")
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=(2, 3), device=x.device, like="x")
        if pos_embed.shape[-2:] != (L, D) or pos_embed.numel() != L * D:
            raise ValueError(f"pos_embed must be [L, D] or [1, L, D] = {(L, D)} like x, got {tuple(pos_embed.shape)}")
    if cls_token is not None:
        check_tensor("cls_token", cls_token, ndim=(1, 3), device=x.device, like="x")
        if cls_token.numel() != D or cls_token.shape[-1] != D:
            raise ValueError(f"cls_token must be [D] or [1, 1, D] with D={D} like x, got {tuple(cls_token.shape)}")
    backend = resolve_backend(backend, x)

    if noise is None:
        noise = torch.rand(N, L, generator=generator, device=x.device)
    if backend == "torch":
        return random_masking_ref(x, mask_ratio, noise=noise, pos_embed=pos_embed, cls_token=cls_token)
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(L, D).to(x.dtype)
        if torch.is_grad_enabled() and pos_embed.requires_grad:
            x, pos_embed = x + pos_embed, None
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    # the inverse permutation by a scatter, not the official second argsort
    positions = torch.arange(L, device=x.device).expand(N, L)
    ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
    if cls_token is not None:
        cls_token = cls_token.reshape(D).to(x.dtype)
    x_kept, mask = _random_masking_fwd_op(x, ids_restore, len_keep=len_keep, pos_embed=pos_embed, prefix=cls_token)
    return x_kept, mask, ids_restore


def unshuffle_tokens(
    x_kept: torch.Tensor, mask_token: torch.Tensor, ids_restore: torch.Tensor, *,
    pos_embed: torch.Tensor | None = None, with_cls_token: bool = False, backend: str = "auto",
) -> torch.Tensor:
    """MAE decoder input (He et al. 2021, `forward_decoder`).

    out[n, P + l] = x_kept[n, P + ids_restore[n, l]] if that index < len_keep else mask_token,
    then + pos_embed. x_kept [N, P + len_keep, D], any strides; with_cls_token (P = 1): row 0 is
    the class token and passes through to out row 0 (the official concat). mask_token [D] or
    [1, 1, D] (cast to x_kept's dtype; its gradient is the sum over all masked positions, in its
    own dtype); ids_restore [N, L] int64, a permutation of range(L) per row (not verified: that
    would cost a host sync; out-of-range ids give mask tokens, never an out-of-bounds access).
    pos_embed [P + L, D] or [1, P + L, D] (optional, cast to x_kept's dtype): added in the same
    pass (one that requires grad is added by torch afterwards, so its gradient is exact).
    Returns a contiguous [N, P + L, D] in x_kept's dtype."""
    check_tensor("x_kept", x_kept, ndim=3)
    check_bool("with_cls_token", with_cls_token)
    n_prefix = int(with_cls_token)
    N, K, D = x_kept.shape
    K -= n_prefix
    if K < 1:
        raise ValueError(f"x_kept must hold {n_prefix} class-token row(s) and >= 1 kept token, got {tuple(x_kept.shape)}")
    check_tensor("mask_token", mask_token, ndim=(1, 3), device=x_kept.device, like="x_kept")
    if mask_token.numel() != D or mask_token.shape[-1] != D:
        raise ValueError(f"mask_token must be [D] or [1, 1, D] with D={D} like x_kept, got {tuple(mask_token.shape)}")
    _check_ids_restore(ids_restore, N, K, x_kept.device)
    L = ids_restore.shape[1]
    if pos_embed is not None:
        check_tensor("pos_embed", pos_embed, ndim=(2, 3), device=x_kept.device, like="x_kept")
        if pos_embed.shape[-2:] != (n_prefix + L, D) or pos_embed.numel() != (n_prefix + L) * D:
            raise ValueError(f"pos_embed must be [P + L, D] or [1, P + L, D] = {(n_prefix + L, D)} "
                             f"(with_cls_token={with_cls_token}), got {tuple(pos_embed.shape)}")
    backend = resolve_backend(backend, x_kept, mask_token, ids_restore)
    if backend == "torch":
        return unshuffle_tokens_ref(x_kept, mask_token, ids_restore, pos_embed=pos_embed, with_cls_token=with_cls_token)
    pos_after = None
    if pos_embed is not None:
        pos_embed = pos_embed.reshape(n_prefix + L, D).to(x_kept.dtype)
        if torch.is_grad_enabled() and pos_embed.requires_grad:
            pos_after, pos_embed = pos_embed, None
    out = _unshuffle_tokens_fwd_op(x_kept, ids_restore, mask_token.reshape(D).to(x_kept.dtype), pos_embed=pos_embed,
                                   has_prefix=with_cls_token)
    return out if pos_after is None else out + pos_after


def mae_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, norm_pix_loss: bool = True,
    patch_size: int | None = None, with_cls_token: bool = False, backend: str = "auto"
) -> torch.Tensor:
    """MAE masked pixel loss (He et al. 2021, `forward_loss`), fp32 math.

    pred [N, L, P], or [N, 1 + L, P] with_cls_token (the decoder's output with its class-token
    row, which gets gradient 0: no slice and no slice-backward pass); target [N, L, P] = patchify(imgs),
    or, with patch_size = p, the images [N, C, H, W] themselves (P = p*p*C, L = HW/p^2), read in
    the patchify layout by the kernel (no patchified copy); mask [N, L] (1 = removed = scored).
    All may have any strides; they are read in place.
    With norm_pix_loss: target <- (target - mean_P) / sqrt(var_P(unbiased) + 1e-6) per patch.
    loss = sum(mask * mean_P (pred - target)^2) / sum(mask): a scalar in
    promote_types(pred, target) (NaN when sum(mask) == 0, as the official code).
    Gradient flows to pred only."""
    check_tensor("pred", pred, ndim=3)
    check_bool("with_cls_token", with_cls_token)
    N, L, P = pred.shape
    L -= int(with_cls_token)
    if L < 1:
        raise ValueError(f"pred must hold a class-token row and >= 1 patch with_cls_token, got {tuple(pred.shape)}")
    if patch_size is None:
        check_tensor("target", target, ndim=3, device=pred.device, like="pred")
        if tuple(target.shape) != (N, L, P):
            raise ValueError(f"target must have pred's shape {(N, L, P)}{' after its class-token row' * with_cls_token}, "
                             f"got {tuple(target.shape)}")
    else:
        check_tensor("target", target, ndim=4, device=pred.device, like="pred")
        patch_size = check_int("patch_size", patch_size, low=1)
        _, C, H, W = target.shape
        if (target.shape[0] != N or H % patch_size or W % patch_size
                or (H // patch_size) * (W // patch_size) != L or patch_size * patch_size * C != P):
            raise ValueError(f"target images [N, C, H, W] must give pred's [N, L, P] = {(N, L, P)} patches of "
                             f"patch_size={patch_size}, got {tuple(target.shape)}")
    check_tensor("mask", mask, ndim=2, device=pred.device, like="pred")
    if tuple(mask.shape) != (N, L):
        raise ValueError(f"mask must have shape [N, L] = {(N, L)} like pred, got {tuple(mask.shape)}")
    check_bool("norm_pix_loss", norm_pix_loss)
    if norm_pix_loss and P < 2:
        raise ValueError(f"norm_pix_loss needs P >= 2 values per patch for the unbiased variance, got P={P}")
    if torch.is_grad_enabled() and (target.requires_grad or mask.requires_grad):
        raise ValueError("mae_loss differentiates pred only; detach target and mask (they require grad)")
    backend = resolve_backend(backend, pred, target, mask)
    if backend == "torch":
        return mae_loss_ref(pred, target, mask, norm_pix_loss=norm_pix_loss, patch_size=patch_size,
                            with_cls_token=with_cls_token)
    if P > MAX_PATCH_DIM:
        raise ValueError(f"backend='triton' supports patch size P <= {MAX_PATCH_DIM}, got P={P}")
    return _mae_loss_fwd_op(pred, target, mask, norm_pix_loss=norm_pix_loss, patch_size=patch_size or 0,
                            has_prefix=with_cls_token)[0]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs [N, C, H, W] -> [N, (H/p)(W/p), p*p*C], the official layout ('nchpwq->nhwpqc')."""
    check_tensor("imgs", imgs, ndim=4, dtypes=None)
    N, C, H, W = imgs.shape
    p = check_int("p", p, low=1)
    if H % p or W % p:
        raise ValueError(f"imgs height and width must be multiples of p={p}, got {H}x{W}")
    h, w = H // p, W // p
    x = imgs.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(N, h * w, p * p * C)


def unpatchify(x: torch.Tensor, p: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """x [N, h*w, p*p*C] -> imgs [N, C, h*p, w*p], the inverse of `patchify`.

    grid = (h, w); the default is the official square grid h = w = sqrt(L)."""
    check_tensor("x", x, ndim=3, dtypes=None)
    N, L, P = x.shape
    p = check_int("p", p, low=1)
    if P % (p * p):
        raise ValueError(f"x's last dim must be p*p*C with p={p}, got {P}")
    C = P // (p * p)
    if grid is None:
        h = w = math.isqrt(L)
        if h * w != L:
            raise ValueError(f"x has L={L} patches, not a square grid; pass grid=(h, w)")
    else:
        h, w = grid
        if h * w != L:
            raise ValueError(f"grid={grid} has {h * w} patches, x has L={L}")
    x = x.reshape(N, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(N, C, h * p, w * p)
