"""Evaluation of frozen features: weighted kNN (DINO's protocol) and a linear probe."""

from fastssl.eval.features import extract_features
from fastssl.eval.knn import knn_predict, knn_top1
from fastssl.eval.linear import linear_probe

__all__ = ["extract_features", "knn_predict", "knn_top1", "linear_probe"]
