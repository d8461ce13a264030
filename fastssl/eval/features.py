"""Frozen-feature extraction for kNN / linear evaluation."""

from __future__ import annotations

import sys
from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def extract_features(encoder: nn.Module, batches: Iterable, device: torch.device | str | None = None,
                     channels_last: bool = False,
                     progress: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run `encoder` (eval mode) over `batches` — loader dicts {"views": [x], "label": y} or
    (x, y) pairs — and return (features [N, F] fp32 on CPU, labels [N] int64).
    progress: a label for a progress bar on stderr (a pass over a large split takes minutes on
    a CPU and must not look hung); None shows none."""
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    if progress is not None:
        from tqdm import tqdm

        total = len(batches) if hasattr(batches, "__len__") else None
        batches = tqdm(batches, desc=progress, total=total, unit="batch", leave=False, mininterval=1.0,
                       file=sys.stderr, dynamic_ncols=True)
    try:
        for batch in batches:
            x, y = (batch["views"][0], batch["label"]) if isinstance(batch, dict) else batch
            f = encoder(x.to(device, non_blocking=True).contiguous(memory_format=fmt))
            feats.append(f.float().flatten(1).cpu())
            labels.append(y.long().cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("batches: expected at least one batch, got none")
    return torch.cat(feats), torch.cat(labels)
