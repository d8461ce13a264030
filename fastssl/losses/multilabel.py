"""Losses for multi-label weak supervision (hashtags, JFT-style labels).

Mahajan et al. 2018 ("Exploring the Limits of Weakly Supervised Pretraining") found softmax
cross-entropy against a target spread evenly over an image's k labels (1/k each) better than
per-label sigmoid (binary logistic) losses. Both are here; for large label spaces
(C >= FUSED_MIN_CLASSES) the softmax loss runs on the fused soft-target cross-entropy kernel
that also computes the DINO loss (fastssl/ops/dino_loss.py), which never materialises
log_softmax or the product tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl.data.labels import multi_hot
from fastssl.ops.backend import BACKENDS, resolve_backend
from fastssl.ops.dino_loss import soft_cross_entropy
from fastssl.validation import check_bool, check_choice, check_int, check_tensor

FUSED_MIN_CLASSES = 10_000
TARGET_DTYPES = (torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                 torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dense_targets(targets: Tensor | Sequence[Sequence[int]], n_rows: int, n_classes: int, *,
                   device: torch.device, dtype: torch.dtype, validate: bool) -> Tensor:
    """[N, C] multi-hot targets from a multi-hot tensor or from N lists of label indices.

    Raises a ValueError naming the row for an index outside [0, C), or (tensor input, when
    `validate`) a value other than 0 or 1. Repeated indices in a list count once.
    """
    if isinstance(targets, Tensor):
        check_tensor("targets", targets, ndim=2, dtypes=TARGET_DTYPES)
        if tuple(targets.shape) != (n_rows, n_classes):
            raise ValueError(f"targets must have the logits' shape ({n_rows}, {n_classes}), "
                             f"got {tuple(targets.shape)}")
        bad = (targets != 0) & (targets != 1)
        if validate and bad.any():
            row, col = (int(x) for x in bad.nonzero()[0])
            raise ValueError(f"targets must be multi-hot (0 or 1); row {row}, column {col} holds "
                             f"{targets[row, col].item()}")
        return targets.to(device=device, dtype=dtype)
    if not isinstance(targets, Sequence) or isinstance(targets, (str, bytes)):
        raise TypeError(f"targets must be a [N, C] multi-hot tensor or a list of label-index lists, "
                        f"got {type(targets).__name__}")
    if len(targets) != n_rows:
        raise ValueError(f"targets must hold one label list per logits row ({n_rows}), got {len(targets)}")
    return multi_hot(targets, n_classes, dtype=dtype, name="targets").to(device)


def multilabel_softmax_loss_ref(logits: Tensor, multi_hot_targets: Tensor) -> Tensor:
    """mean_n of -sum_c (y_nc / k_n) * log_softmax(logits_n)_c, k_n = sum_c y_nc (float32 math for halves)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    y = multi_hot_targets.to(dtype)
    return -(y / y.sum(dim=1, keepdim=True) * logits.to(dtype).log_softmax(dim=1)).sum(dim=1).mean()


def multilabel_softmax_loss(logits: Tensor, targets: Tensor | Sequence[Sequence[int]], *,
                            min_fused_classes: int = FUSED_MIN_CLASSES, validate: bool = True,
                            backend: str = "auto") -> Tensor:
    """Softmax cross-entropy with a target of 1/k on each of a row's k labels (Mahajan et al. 2018).

    logits: [N, C] float. targets: multi-hot [N, C] (bool, int or float 0/1) or N lists of label
    indices. Returns the scalar mean over rows of -sum_c (y_c / k) * log_softmax(logits)_c
    (float32; float64 for float64 logits). Every row needs at least one label.
    backend (fastssl.ops.backend): "auto" runs the fused Triton kernel on CUDA, "triton" forces it,
    "torch" is the reference; with "auto", label spaces below min_fused_classes run the reference
    (there torch's log_softmax is as fast).
    validate=False skips the data-dependent checks of a target tensor (values 0/1, no empty row),
    each a device-to-host sync: for training loops whose targets are valid by construction.
    """
    check_tensor("logits", logits, ndim=2)
    check_choice("backend", backend, BACKENDS)
    min_fused_classes = check_int("min_fused_classes", min_fused_classes, low=0)
    check_bool("validate", validate)
    n_rows, n_classes = logits.shape
    y = _dense_targets(targets, n_rows, n_classes, device=logits.device, dtype=logits.dtype,
                       validate=validate)
    if validate:  # a pass over the [N, C] targets: skipped with validate=False
        empty = y.sum(dim=1) == 0
        if empty.any():
            row = int(empty.nonzero()[0])
            raise ValueError(f"every targets row needs at least one label; row {row} has none")
    if backend == "auto" and n_classes < min_fused_classes:
        backend = "torch"
    if resolve_backend(backend, logits) == "torch":
        return multilabel_softmax_loss_ref(logits, y)
    return soft_cross_entropy(logits, y, n_crops=1, n_targets=1, student_temp=1.0, exclude_same=False,
                              backend="triton")


def multilabel_sigmoid_loss(logits: Tensor, targets: Tensor | Sequence[Sequence[int]], *,
                            validate: bool = True) -> Tensor:
    """Per-label sigmoid binary cross-entropy, the baseline of Mahajan et al. 2018.

    logits: [N, C]; targets as for multilabel_softmax_loss (rows without labels are allowed:
    all C labels are negatives). Returns mean_n sum_c BCE(sigmoid(logits_nc), y_nc): summed over
    labels so that its scale per image matches the softmax loss (torch's default mean over N*C
    would shrink gradients by C). Float32 math for half inputs. validate as for the softmax loss.
    """
    check_tensor("logits", logits, ndim=2)
    n_rows, n_classes = logits.shape
    dtype = torch.promote_types(logits.dtype, torch.float32)
    y = _dense_targets(targets, n_rows, n_classes, device=logits.device, dtype=dtype, validate=validate)
    return F.binary_cross_entropy_with_logits(logits.to(dtype), y, reduction="sum") / n_rows
