"""Fused CLIP loss: symmetric InfoNCE over image-text logits, both directions from one sweep.

Math (Radford et al. 2021, CLIP, Fig. 3; open_clip's ClipLoss). With image features x [N, D],
text features y (normalised by the caller, as open_clip's model does), the logit scale t (open_clip
passes exp of its learned log-scale) and labels i + o:

    loss = ½ [ (1/N) Σ_i CE(t x_i · Yᵀ, i + o) + (1/N) Σ_i CE(t y_i · Xᵀ, i + o) ]

* one grid (no all_* features; one process, or open_clip's local_loss=False on gathered features):
  Y = y, X = x, o = 0, so the text→image logits are the image→text grid transposed: the first
  term's log-sum-exps run along the rows of l_ij = t x_i·y_j, the second's along its columns.
* local form (all_image_features X, all_text_features Y: every rank's rows, gathered; o = rank·N):
  this rank's images against all texts and its texts against all images. These are two grids
  (the columns of the first hold only this rank's images), so each direction is its own
  row-wise InfoNCE sweep (fastssl.ops.info_nce at temperature 1); never an N × M buffer.

Gradients of the one grid, with p = row softmax, q = column softmax of l and g the incoming ones:

    ∂(t x_i) = Σ_j (g_row_i p_ij + g_col_j q_ij) y_j − (g_row_i + g_col_i) y_i,   ∂y_j likewise.

The kernels (the InfoNCE kernels with their CLIP flags, launched from _clip_loss_kernels.py):

1. forward: ``_info_nce_fwd_kernel`` with COLUMN_STATS streams the texts past each tile of image
   rows: the rows' online log-sum-exp (per column split, as InfoNCE), and per tile the columns'
   (max, Σ 2^(l − max)) written to an fp32 [image tiles, N] buffer (1/BLOCK_N of the logits);
   ``_info_nce_combine_kernel`` merges the rows' splits, then, with the roles swapped, the
   columns' tiles, and subtracts the diagonal logit: both cross-entropies from one sweep.
2. backward: ``_info_nce_bwd_kernel`` with OUTER_LSE, twice: the image gradient with the image
   rows as keys of the text queries (each tile recomputed, p and q from the two saved
   log-sum-exps), then the text gradient with the roles swapped; no atomics (deterministic).
   Above 128 columns the gradient is made in column chunks by one program that keeps each
   tile's probabilities for the later chunks (KEEP_P, see fastssl.ops.info_nce) in a bounded
   workspace, band of key rows after band, and a gradient made in one split is finished in
   the kernel (DIRECT).

Matmul-equivalents (2·N²·D flops each): forward 1; backward 2 per feature set that needs a
gradient, at any D. Extra memory: O(N·D + N²/BLOCK_N) fp32 and, where D is chunked, the kept
probabilities' workspace, at most 48 MiB at any N and number of ranks (larger problems run in
bands through it; where bands too small to fill the device would not pay, each chunk recomputes
the logits, one matmul more per chunk); no fp32 N × N logits and no N × world·N buffer.

The scale multiplies the image rows (and, in the local form, the text rows) before the sweep, in
open_clip's order of operations (`logit_scale * image_features @ text_features.T`): the kernels run
at temperature 1 and t's gradient, Σ_i x_i · ∂loss/∂(t x_i), is autograd's through that [N, D]
product. A logit bias b (SigLIP-style models pass one) shifts every logit of a row and of a
column alike, and cross-entropy is invariant to that: it changes neither the loss nor the
features' gradients, and its own gradient Σ (Σ_j p_ij − 1) / N is 0, which the fused path returns
exactly (the reference's is round-off).
"""

import torch
import torch.nn.functional as F

from fastssl.ops.backend import HAS_TRITON, resolve_kernel_backend
from fastssl.ops.info_nce import info_nce
from fastssl.validation import check_image_text, check_int, check_same_dtype, check_tensor

if HAS_TRITON:  # without triton only the reference runs (resolve_backend refuses "triton")
    from fastssl.ops._clip_loss_kernels import clip_loss_bwd, clip_loss_fwd


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("fastssl::clip_loss_fwd", mutates_args=())
def _fwd_op(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return clip_loss_fwd(image, text)


@_fwd_op.register_fake
def _(image, text):
    return tuple(image.new_empty(image.shape[0], dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("fastssl::clip_loss_bwd", mutates_args=())
def _bwd_op(
    image: torch.Tensor, text: torch.Tensor, row_lse2: torch.Tensor, col_lse2: torch.Tensor, grad_row: torch.Tensor,
    grad_col: torch.Tensor, compute_dimage: bool, compute_dtext: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return clip_loss_bwd(image, text, row_lse2, col_lse2, grad_row, grad_col, compute_dimage=compute_dimage,
                         compute_dtext=compute_dtext)


@_bwd_op.register_fake
def _(image, text, row_lse2, col_lse2, grad_row, grad_col, compute_dimage, compute_dtext):
    return (image.new_empty(image.shape if compute_dimage else (0,)),  # contiguous, like the launcher's
            text.new_empty(text.shape if compute_dtext else (0,)))


def _setup_context(ctx, inputs, output):
    image, text = inputs
    _, _, row_lse2, col_lse2 = output
    ctx.save_for_backward(image, text, row_lse2, col_lse2)
    ctx.set_materialize_grads(False)  # the log-sum-exps get no gradient: no zero tensors for them


def _backward(ctx, grad_row, grad_col, *unused_grads):
    # The log-sum-exps are internal (the public function returns only the loss): their incoming
    # gradients are ignored.
    image, text, row_lse2, col_lse2 = ctx.saved_tensors
    need_image, need_text = ctx.needs_input_grad
    dimage, dtext = _bwd_op(image, text, row_lse2, col_lse2, grad_row, grad_col, need_image, need_text)
    return (dimage if need_image else None), (dtext if need_text else None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- reference and public API


def clip_loss_ref(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None, *, all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None, label_offset: int = 0,
) -> torch.Tensor:
    """open_clip's formula in plain PyTorch; materialises both [N, M] logits. Same arguments as `clip_loss`."""
    texts = text_features if all_text_features is None else all_text_features
    images = image_features if all_image_features is None else all_image_features
    logits_per_image = logit_scale * image_features @ texts.T
    logits_per_text = logit_scale * text_features @ images.T
    if logit_bias is not None:
        logits_per_image, logits_per_text = logits_per_image + logit_bias, logits_per_text + logit_bias
    labels = torch.arange(image_features.shape[0], device=image_features.device) + label_offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def clip_loss(
    image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float | None = None, *, all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None, label_offset: int = 0, backend: str = "auto",
) -> torch.Tensor:
    """CLIP's symmetric contrastive loss (Radford et al. 2021) without materialising the logits (Triton backend).

    image_features, text_features [N, D] (one dtype, one device; rows may be strided views);
    logit_scale t and logit_bias b: one-element tensors (gradients flow to them) or numbers; b may be
    None. Without all_* features: the N × N grid, label i for row i, both directions from one
    sweep. With all_image_features and all_text_features [M, D] (every rank's rows, rank-major):
    open_clip's local loss, this rank's rows against all M, labels i + label_offset (rank·N).
    Returns ½ (CE(image→text) + CE(text→image)), a 0-d tensor in image_features' dtype.
    float64 runs the reference on backend="auto" and is refused by backend="triton".
    backend: "auto" (Triton on CUDA, else `clip_loss_ref`), "triton", "torch".
    """
    scale, bias = check_image_text(image_features, text_features, logit_scale, logit_bias)
    N, D = image_features.shape
    if text_features.shape[0] != N:
        raise ValueError(f"text_features must have N={N} rows like image_features (one text per image), got "
                         f"shape {tuple(text_features.shape)}")
    if (all_image_features is None) != (all_text_features is None):
        raise ValueError("all_image_features and all_text_features go together (the local loss), got one of them; "
                         "pass both or neither")
    local = all_image_features is not None
    features = (image_features, text_features)
    if local:
        for name, x in (("all_image_features", all_image_features), ("all_text_features", all_text_features)):
            check_tensor(name, x, ndim=2, device=image_features.device, like="image_features")
        check_same_dtype(("image_features", "all_image_features", "all_text_features"),
                         (image_features, all_image_features, all_text_features))
        if all_image_features.shape != all_text_features.shape or all_image_features.shape[1] != D \
                or all_image_features.shape[0] < N:
            raise ValueError(f"all_image_features and all_text_features must both be [M, {D}] with M >= N={N}, got "
                             f"{tuple(all_image_features.shape)} and {tuple(all_text_features.shape)}")
        label_offset = check_int("label_offset", label_offset, low=0, high=all_image_features.shape[0] - N)
        features += (all_image_features, all_text_features)
    elif check_int("label_offset", label_offset) != 0:
        raise ValueError(f"label_offset applies to the local loss (all_image_features and all_text_features "
                         f"given); the one grid's labels are its diagonal, got label_offset={label_offset}")
    if resolve_kernel_backend("clip_loss", backend, *features) == "torch":
        return clip_loss_ref(image_features, text_features, logit_scale, logit_bias,
                             all_image_features=all_image_features, all_text_features=all_text_features,
                             label_offset=label_offset)
    scale = scale.reshape(())
    if local:
        kw = dict(temperature=1.0, normalize=False, label_offset=label_offset, backend="triton")
        loss = (info_nce(scale * image_features, all_text_features, **kw)
                + info_nce(scale * text_features, all_image_features, **kw)) / 2
    else:
        row_loss, col_loss, _, _ = _fwd_op(scale * image_features, text_features)
        loss = (row_loss + col_loss).mean() / 2
    if bias is not None:
        loss = loss + 0.0 * bias.reshape(())  # in the graph: its gradient is the exact zero
    return loss.to(image_features.dtype)
