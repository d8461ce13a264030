"""Fused SigLIP loss: the pairwise sigmoid image-text loss, streamed over tiles of the texts.

Math (Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training", eq. 1). With image
features x [N, D], text features y [M, D] (normalised by the caller, as open_clip does), the
logit scale t (open_clip passes exp of its learned log-scale) and bias b:

    logit_ij = t · x_i·y_j + b,    z_ij = +1 if j == i + label_offset else -1
    loss     = -(1/N) Σ_i Σ_j log σ(z_ij · logit_ij)

label_offset = None makes every pair negative (another rank's texts in the distributed loss).
Gradients, with G_ij = ∂loss/∂logit_ij = -z_ij σ(-z_ij logit_ij) / N:

    ∂x_i = t Σ_j G_ij y_j,   ∂y_j = t Σ_i G_ij x_i,   ∂t = Σ_ij G_ij x_i·y_j,   ∂b = Σ_ij G_ij

The kernels never hold more than a tile of the N × M logits, and no labels matrix exists:

1. ``_siglip_loss_fwd_kernel``: grid (image tiles, text splits, D chunks of the accumulator).
   Each program streams its split's text tiles through ``tl.dot``, sums -log σ per row and,
   when a gradient is needed, the rows of G and G·s and Σ_j G_ij y_j (the image gradient for a
   unit incoming gradient). Per-split partials are summed in a fixed order by torch (no atomics:
   deterministic), so the scale and bias gradients are per-row partial sums reduced once.
2. ``_siglip_loss_bwd_kernel``: grid (text tiles, image splits, D chunks): recomputes the
   logits tiles and accumulates Σ_i G_ij x_i (the pairs are symmetric), scaled by the incoming
   gradient when the splits are summed.

Matmul-equivalents (2·N·M·D flops each): forward 1 (2 with the image gradient), text gradient 2.
Extra memory: O(splits · (N + M) · D) fp32, independent of N·M.

Precision: fp32 accumulation; fp32 inputs use tf32x3 dots (close to fp32 accuracy on tensor
cores), 16-bit tiles go to the tensor cores as they are and G is rounded to the input dtype for
the gradient dots (as the 16-bit reference rounds it). -log σ(u) is evaluated as
max(-u, 0) + log1p(exp(-|u|)), so no logit overflows and the small negatives' terms keep their digits.
"""

from typing import Optional

import torch
import torch.nn.functional as F

from fastssl.ops.backend import HAS_TRITON, resolve_kernel_backend
from fastssl.validation import check_image_text, check_int

if HAS_TRITON:  # without triton only the reference runs (resolve_backend refuses "triton")
    from fastssl.ops._siglip_loss_kernels import siglip_loss_bwd, siglip_loss_fwd


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastssl::siglip_loss_fwd", mutates_args=())
def _fwd_op(
    # typing.Optional: the spelling every torch version's schema inference knows.
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor, logit_bias: Optional[torch.Tensor],  # noqa: UP045
    label_offset: int, positives: bool, compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return siglip_loss_fwd(image, text, logit_scale, logit_bias, label_offset=label_offset, positives=positives,
                           compute_grad=compute_grad)


@_fwd_op.register_fake
def _(image, text, logit_scale, logit_bias, label_offset, positives, compute_grad):
    f32 = {"dtype": torch.float32}
    grad_shape = image.shape if compute_grad else (0,)
    scalar_shape = () if compute_grad else (0,)
    return (image.new_empty((), **f32), image.new_empty(grad_shape, **f32), image.new_empty(scalar_shape, **f32),
            image.new_empty(scalar_shape, **f32))


@torch.library.custom_op("fastssl::siglip_loss_bwd", mutates_args=())
def _bwd_op(
    grad: torch.Tensor, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor,
    logit_bias: Optional[torch.Tensor], label_offset: int, positives: bool,  # noqa: UP045
) -> torch.Tensor:
    return siglip_loss_bwd(grad, image, text, logit_scale, logit_bias, label_offset=label_offset,
                           positives=positives)


@_bwd_op.register_fake
def _(grad, image, text, logit_scale, logit_bias, label_offset, positives):
    return text.new_empty(text.shape)


def _setup_context(ctx, inputs, output):
    image, text, logit_scale, logit_bias, label_offset, positives, compute_grad = inputs
    _, dimage_dir, dscale_dir, dbias_dir = output
    ctx.save_for_backward(image, text, logit_scale, logit_bias, dimage_dir, dscale_dir, dbias_dir)
    ctx.set_materialize_grads(False)  # the internal outputs get no gradient: no zero tensors for them
    ctx.label_offset, ctx.positives, ctx.compute_grad = label_offset, positives, compute_grad


def _backward(ctx, grad_loss, *unused_grads):
    # Only the loss leaves the public function; the direction outputs' incoming gradients are ignored.
    image, text, logit_scale, logit_bias, dimage_dir, dscale_dir, dbias_dir = ctx.saved_tensors
    if any(ctx.needs_input_grad[:4]) and not ctx.compute_grad:
        raise RuntimeError("fastssl::siglip_loss_fwd was called with compute_grad=False; its inputs have no gradient")
    g = grad_loss.to(torch.float32)
    dimage = (g * dimage_dir).to(image.dtype) if ctx.needs_input_grad[0] else None
    dtext = None
    if ctx.needs_input_grad[1]:
        dtext = _bwd_op(g, image, text, logit_scale, logit_bias, ctx.label_offset, ctx.positives)
    dscale = (g * dscale_dir).to(logit_scale.dtype).reshape(logit_scale.shape) if ctx.needs_input_grad[2] else None
    dbias = None
    if logit_bias is not None and ctx.needs_input_grad[3]:
        dbias = (g * dbias_dir).to(logit_bias.dtype).reshape(logit_bias.shape)
    return dimage, dtext, dscale, dbias, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference and public API


def siglip_loss_ref(
    image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None, *, label_offset: int | None = 0,
) -> torch.Tensor:
    """The paper's formula in plain PyTorch; materialises the [N, M] logits and signs."""
    logits = logit_scale * image @ text.T + (0.0 if logit_bias is None else logit_bias)
    signs = -torch.ones_like(logits)
    if label_offset is not None:
        signs.diagonal(label_offset).fill_(1.0)
    return -F.logsigmoid(signs * logits).sum() / image.shape[0]


def siglip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None, *, label_offset: int | None = 0, backend: str = "auto",
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023) without materialising the logits (Triton backend).

    image_features [N, D], text_features [M, D] (one dtype, one device; rows may be strided views),
    logit_scale t and logit_bias b: one-element tensors (gradients flow to them) or numbers; b may be None.
    Returns -(1/N) Σ_ij log σ(z_ij (t x_i·y_j + b)) with z_ij = +1 for j == i + label_offset and -1
    otherwise (label_offset = None: all pairs negative); a 0-d tensor in image_features' dtype.
    float64 runs the reference on backend="auto" and is refused by backend="triton".
    backend: "auto" (Triton on CUDA, else `siglip_loss_ref`), "triton", "torch".
    """
    scale, bias = check_image_text(image_features, text_features, logit_scale, logit_bias)
    N, M = image_features.shape[0], text_features.shape[0]
    if label_offset is not None:
        if M < N:
            raise ValueError(f"text_features must have at least N={N} rows (one positive text per image) unless "
                             f"label_offset=None, got shape {tuple(text_features.shape)}")
        label_offset = check_int("label_offset", label_offset, low=0, high=M - N)
    if resolve_kernel_backend("siglip_loss", backend, image_features, text_features) == "torch":
        return siglip_loss_ref(image_features, text_features, logit_scale, logit_bias, label_offset=label_offset)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (image_features, text_features, scale, bias))
    loss, _, _, _ = _fwd_op(image_features, text_features, scale, bias, 0 if label_offset is None else label_offset,
                            label_offset is not None, needs_grad)
    return loss.to(image_features.dtype)
