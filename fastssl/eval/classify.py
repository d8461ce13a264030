"""Accuracy of a classifier on a labelled split: top-1, top-5 and the most-confused pairs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from fastssl.eval.features import extract_features

CONFUSED_PAIRS = 5


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[C, C] int64 counts, rows the true class and columns the predicted one."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)


def most_confused(confusion: torch.Tensor, names: list[str] | None = None, k: int = CONFUSED_PAIRS
                  ) -> list[dict]:
    """The k largest off-diagonal cells: [{"true", "predicted", "count", "fraction"}], fraction
    of the true class's images; class names when given, else indices."""
    off = confusion.clone()
    off.fill_diagonal_(0)
    counts, flat = off.flatten().topk(min(k, off.numel()))
    rows = confusion.sum(1)
    out = []
    for count, i in zip(counts.tolist(), flat.tolist()):
        if count == 0:
            break
        t, p = divmod(i, confusion.shape[0])
        out.append({"true": names[t] if names else t, "predicted": names[p] if names else p,
                    "count": count, "fraction": count / max(int(rows[t]), 1)})
    return out


def classification_scores(logits: torch.Tensor, labels: torch.Tensor, names: list[str] | None = None
                          ) -> dict:
    """{"top1", "top5" (top-k with k = min(5, classes)), "test_images", "confused_pairs"}."""
    num_classes = logits.shape[1]
    top = logits.topk(min(5, num_classes), dim=1).indices
    hit = top == labels[:, None]
    confusion = confusion_matrix(top[:, 0], labels, num_classes)
    return {"top1": hit[:, 0].float().mean().item(), "top5": hit.any(1).float().mean().item(),
            "test_images": int(labels.numel()), "confused_pairs": most_confused(confusion, names)}


def build_classifier_evaluator(batches: Callable[[], Iterable], device: torch.device, *,
                               names: list[str] | None = None, channels_last: bool = False
                               ) -> Callable[[nn.Module], dict]:
    """Callable(classifier) -> classification_scores over the batches `batches()` yields
    (loader dicts or (x, y) pairs). Every rank of a distributed run scores the whole split:
    the same numbers on every rank and no collective inside."""

    def evaluate(classifier: nn.Module) -> dict:
        logits, labels = extract_features(classifier, batches(), device, channels_last)
        return classification_scores(logits, labels, names)

    return evaluate
