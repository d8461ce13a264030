"""Linear probe: a single linear layer trained on frozen, precomputed features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.validation import check_positive, check_tensor


def linear_probe(train_features: torch.Tensor, train_labels: torch.Tensor, test_features: torch.Tensor,
                 test_labels: torch.Tensor, epochs: int = 30, lr: float = 0.1, weight_decay: float = 0.0,
                 batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """Train W [D, C], b [C] with SGD (momentum 0.9, cosine LR) and cross-entropy on
    standardised features (train mean/std, so one LR fits any backbone's feature scale);
    returns {"linear_top1": test accuracy, "linear_train_top1": train accuracy}."""
    check_tensor("train_features", train_features, ndim=2)
    check_tensor("test_features", test_features, ndim=2, device=train_features.device)
    for name, labels, feats in (("train_labels", train_labels, train_features),
                                ("test_labels", test_labels, test_features)):
        check_tensor(name, labels, ndim=1, dtypes=(torch.int64, torch.int32), device=train_features.device)
        if labels.shape[0] != feats.shape[0]:
            raise ValueError(f"{name}: expected {feats.shape[0]} labels, got {labels.shape[0]}")
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs, batch_size: expected >= 1, got {epochs}, {batch_size}")
    check_positive("lr", lr)
    mean, std = train_features.float().mean(0), train_features.float().std(0).clamp_min(1e-6)
    x_train, x_test = (train_features.float() - mean) / std, (test_features.float() - mean) / std
    y_train, y_test = train_labels.long(), test_labels.long()
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x_train.shape[1], num_classes).to(x_train.device)
    with torch.no_grad():
        layer.weight.normal_(0, 0.01, generator=gen)
        layer.bias.zero_()
    opt = torch.optim.SGD(layer.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    n = x_train.shape[0]
    steps = epochs * ((n + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    with torch.enable_grad():
        for _ in range(epochs):
            perm = torch.randperm(n, generator=gen).to(x_train.device)
            for start in range(0, n, batch_size):
                idx = perm[start:start + batch_size]
                loss = F.cross_entropy(layer(x_train[idx]), y_train[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    with torch.no_grad():
        train_acc = (layer(x_train).argmax(1) == y_train).float().mean().item()
        test_acc = (layer(x_test).argmax(1) == y_test).float().mean().item()
    return {"linear_top1": test_acc, "linear_train_top1": train_acc}
