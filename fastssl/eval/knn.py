"""Weighted k-nearest-neighbour classification of frozen features (Wu et al. 2018, as in DINO's
eval_knn.py): cosine similarity to every training feature, the k most similar vote for their
class with weight exp(sim / T), the class with the largest total wins."""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from fastssl.validation import check_positive, check_tensor


@torch.no_grad()
def knn_predict(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                k: int = 20, temperature: float = 0.07, num_classes: int | None = None,
                chunk_size: int = 1024, progress: str | None = None) -> torch.Tensor:
    """train_features [N, D], train_labels [N] (int64 in [0, C)), test_features [M, D] ->
    predicted labels [M]. score_c(x) = sum over the top-k neighbours n with label c of
    exp(cos(x, f_n) / T). Features are L2-normalised here; similarities in fp32.
    progress: a label for a progress bar over the test chunks on stderr; None shows none."""
    check_tensor("train_features", train_features, ndim=2)
    check_tensor("test_features", test_features, ndim=2, device=train_features.device)
    check_tensor("train_labels", train_labels, ndim=1, dtypes=(torch.int64, torch.int32),
                 device=train_features.device)
    if train_labels.shape[0] != train_features.shape[0]:
        raise ValueError(f"train_labels: expected {train_features.shape[0]} labels (one per train feature), "
                         f"got {train_labels.shape[0]}")
    if test_features.shape[1] != train_features.shape[1]:
        raise ValueError(f"test_features: expected dim {train_features.shape[1]} like train_features, "
                         f"got {test_features.shape[1]}")
    if not 1 <= k <= train_features.shape[0]:
        raise ValueError(f"k: expected 1 <= k <= {train_features.shape[0]} (train size), got {k}")
    check_positive("temperature", temperature)
    num_classes = int(train_labels.max()) + 1 if num_classes is None else num_classes
    train = F.normalize(train_features.float(), dim=1)
    labels = train_labels.long()
    preds = []
    starts = range(0, test_features.shape[0], chunk_size)
    if progress is not None:
        from tqdm import tqdm

        starts = tqdm(starts, desc=progress, unit="chunk", leave=False, mininterval=1.0, file=sys.stderr,
                      dynamic_ncols=True)
    for start in starts:
        test = F.normalize(test_features[start:start + chunk_size].float(), dim=1)
        sim, idx = (test @ train.T).topk(k, dim=1)
        votes = torch.zeros(test.shape[0], num_classes, device=test.device)
        votes.scatter_add_(1, labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(dim=1))
    return torch.cat(preds)


def knn_top1(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
             test_labels: torch.Tensor, k: int = 20, temperature: float = 0.07,
             progress: str | None = None) -> float:
    """Fraction of test samples whose weighted-kNN prediction equals their label."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    pred = knn_predict(train_features, train_labels, test_features, k, temperature, num_classes,
                       progress=progress)
    return (pred == test_labels.to(pred.device)).float().mean().item()
