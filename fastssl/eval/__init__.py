"""Evaluation of frozen features: weighted kNN (DINO's protocol) and a linear probe."""

from fastssl.eval.evaluator import (
    Evaluator,
    FixedIndices,
    build_evaluator,
    check_knn_labels,
    subsample_indices,
)
from fastssl.eval.features import extract_features
from fastssl.eval.knn import knn_predict, knn_top1
from fastssl.eval.linear import linear_probe

__all__ = ["Evaluator", "FixedIndices", "build_evaluator", "check_knn_labels", "extract_features",
           "knn_predict", "knn_top1", "linear_probe", "subsample_indices"]
