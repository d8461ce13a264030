import math

import pytest
import torch

from fastssl.eval import extract_features, knn_predict, knn_top1, linear_probe

# Unit-norm directions: cos((1,0), .) = 1, 0.6, 0.6, -1. f2 is scaled by 5 (kNN uses cosine).
TRAIN = torch.tensor([[1.0, 0.0], [3.0, 4.0], [0.6, -0.8], [-1.0, 0.0]])
LABELS = torch.tensor([0, 1, 1, 0])
QUERY = torch.tensor([[2.0, 0.0]])


def test_weighted_knn_hand_example():
    # k = 3 keeps f1, f2, f3. T = 0.5: class 0 gets e^(1/0.5) = 7.39, class 1 gets 2 e^(0.6/0.5) = 6.64 -> 0,
    # although the plain majority of the 3 neighbours is class 1.
    assert 7.38 < math.exp(2) and 2 * math.exp(1.2) < 6.65
    assert knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=0.5).tolist() == [0]
    # T = 1: e^1 = 2.72 against 2 e^0.6 = 3.64 -> class 1.
    assert knn_predict(TRAIN, LABELS, QUERY, k=3, temperature=1.0).tolist() == [1]
    # k = 1: nearest neighbour only.
    assert knn_predict(TRAIN, LABELS, torch.tensor([[0.0, 1.0]]), k=1).tolist() == [1]


def test_knn_top1_and_chunking():
    torch.manual_seed(0)
    centers = torch.randn(5, 16) * 3
    y_train, y_test = torch.arange(100) % 5, torch.arange(37) % 5
    x_train, x_test = centers[y_train] + torch.randn(100, 16), centers[y_test] + torch.randn(37, 16)
    acc = knn_top1(x_train, y_train, x_test, y_test, k=20, temperature=0.07)
    assert acc > 0.9
    whole = knn_predict(x_train, y_train, x_test, k=20, chunk_size=4096)
    assert torch.equal(whole, knn_predict(x_train, y_train, x_test, k=20, chunk_size=5))
    assert knn_top1(x_train, y_train, x_test, (y_test + 1) % 5) < 0.1


def test_knn_rejects_bad_input():
    with pytest.raises(ValueError, match=r"k: expected 1 <= k <= 4"):
        knn_predict(TRAIN, LABELS, QUERY, k=5)
    with pytest.raises(ValueError, match="train_labels: expected 4 labels"):
        knn_predict(TRAIN, LABELS[:3], QUERY)
    with pytest.raises(ValueError, match="test_features: expected dim 2"):
        knn_predict(TRAIN, LABELS, torch.zeros(1, 3))
    with pytest.raises(ValueError, match="temperature"):
        knn_predict(TRAIN, LABELS, QUERY, k=2, temperature=0.0)


def test_linear_probe_learns_separable_problem():
    torch.manual_seed(0)
    w = torch.randn(10, 3)
    x_train, x_test = torch.randn(600, 10) * 4 + 7, torch.randn(200, 10) * 4 + 7   # offset, scaled features
    y_train, y_test = ((x_train - 7) @ w).argmax(1), ((x_test - 7) @ w).argmax(1)  # linearly separable labels
    result = linear_probe(x_train, y_train, x_test, y_test, epochs=20, lr=0.1)
    assert result["linear_top1"] > 0.93 and result["linear_train_top1"] > 0.95
    chance = linear_probe(x_train, y_train[torch.randperm(600)], x_test, y_test, epochs=5)
    assert chance["linear_top1"] < 0.6
    with pytest.raises(ValueError, match="test_labels: expected 200 labels, got 199"):
        linear_probe(x_train, y_train, x_test, y_test[:199])


def test_extract_features_from_loader_batches_and_pairs():
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4), torch.nn.Dropout(0.5))
    x, y = torch.randn(6, 3, 2, 2), torch.arange(6)
    batches = [{"views": [x[:4]], "label": y[:4]}, {"views": [x[4:]], "label": y[4:]}]
    feats, labels = extract_features(encoder, batches)
    assert encoder.training                                # mode restored
    torch.testing.assert_close(feats, encoder[1](x.flatten(1)).detach())   # eval mode: dropout off
    assert labels.tolist() == list(range(6))
    feats2, _ = extract_features(encoder, [(x, y)])
    torch.testing.assert_close(feats2, feats)
