"""Launchers behind fastssl.ops.clip_loss (see that module for the math): the InfoNCE kernels of
_info_nce_kernels.py with their CLIP flags (COLUMN_STATS in the forward, OUTER_LSE in the key
gradient), so CLIP has no kernel, and no traffic formula, of its own.

Imported only where triton is installed: fastssl.ops.clip_loss runs its reference without it."""

import torch

from fastssl.ops._info_nce_kernels import _LOG2E
from fastssl.ops._info_nce_launchers import info_nce_bwd, info_nce_combine, info_nce_partials

_TEMPERATURE_ONE = dict(temperature=1.0, label_offset=0, exclude_self=False)  # the scale is in the rows


def clip_loss_fwd(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """One sweep over the logits l_ij = image_i·text_j (image rows already scaled by t). Returns
    (row_loss, col_loss, row_lse2, col_lse2), each [N] fp32: the image→text cross-entropy of each
    image row, the text→image one of each text column, and their base-2 log-sum-exps."""
    empty = image.new_empty(0, dtype=torch.float32)
    parts = info_nce_partials(image, text, empty, empty, scale2=_LOG2E, label_offset=0, scale_rows=False,
                              scale_cols=False, compute_dq=False, exclude_self=False, column_stats=True)
    flags = dict(scale2=_LOG2E, **_TEMPERATURE_ONE, has_queue=False, normalize=False, compute_dq=False,
                 compute_dk=False)
    row_loss, row_lse2, _, _ = info_nce_combine(image, text, empty, empty, parts["m"], parts["l"], empty, **flags)
    # the columns' partials, one per image tile, merged like the rows' splits with the roles swapped
    col_loss, col_lse2, _, _ = info_nce_combine(text, image, empty, empty, parts["col_m"], parts["col_l"], empty,
                                                **flags)
    return row_loss, col_loss, row_lse2, col_lse2


def clip_loss_bwd(
    image: torch.Tensor, text: torch.Tensor, row_lse2: torch.Tensor, col_lse2: torch.Tensor,
    grad_row: torch.Tensor, grad_col: torch.Tensor, *, compute_dimage: bool, compute_dtext: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of Σ_i grad_row_i · row_loss_i + Σ_j grad_col_j · col_loss_j: (dimage, dtext) in the
    inputs' dtypes (empty where not wanted). Each is the InfoNCE key gradient with the keys' own
    softmax added (OUTER_LSE): the image rows as keys of the text queries, then the reverse."""
    dimage = info_nce_bwd(text, image, col_lse2, grad_col, normalize=False, outer_lse2=row_lse2, outer_grad=grad_row,
                          **_TEMPERATURE_ONE) if compute_dimage else image.new_empty(0)
    dtext = info_nce_bwd(image, text, row_lse2, grad_row, normalize=False, outer_lse2=col_lse2, outer_grad=grad_col,
                         **_TEMPERATURE_ONE) if compute_dtext else text.new_empty(0)
    return dimage, dtext
