"""Multi-label losses (Mahajan et al. 2018) against float64 formulas written here; the fused path
(the DINO soft-target kernel under the interpreter) against the torch path."""

import math

import pytest
import torch
import torch.nn.functional as F

from fastssl.data.labels import multi_hot
from fastssl.losses import multilabel_sigmoid_loss, multilabel_softmax_loss
from fastssl.losses.multilabel import FUSED_MIN_CLASSES


def label_lists(n, c, k_values, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(c, generator=g)[:k_values[i % len(k_values)]].tolist() for i in range(n)]


def softmax_loss_fp64(logits, lists):
    """-(1/N) sum_n sum_{c in labels_n} (1/k_n) log softmax(logits_n)_c, one row at a time."""
    total = 0.0
    for row, labels in zip(logits.double(), lists):
        log_p = row - torch.logsumexp(row, dim=0)
        total = total - log_p[torch.tensor(labels, dtype=torch.long)].sum() / len(labels)
    return total / len(lists)


def value_and_grad(fn, logits, *args, **kw):
    x = logits.detach().clone().requires_grad_(True)
    loss = fn(x, *args, **kw)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach().cpu(), grad.cpu()


@pytest.mark.parametrize("backend,C,dtype", [("torch", 50, torch.float64), ("triton", 50, torch.float32),
                                             ("triton", FUSED_MIN_CLASSES + 3, torch.float32)])
def test_value_and_gradient_k_from_one_to_many(backend, C, dtype, device):
    k_values = [1, 2, 5, 17, C]
    lists = label_lists(5, C, k_values)
    logits = 4 * torch.randn(5, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    dev = device if backend == "triton" else "cpu"  # the kernel on CUDA when present, else interpreted
    loss, grad = value_and_grad(multilabel_softmax_loss, logits.to(dev, dtype), lists, backend=backend)
    want, want_grad = value_and_grad(softmax_loss_fp64, logits, lists)
    assert loss.dtype == dtype
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), want, **tol)
    # d/dx = (softmax(x) - y/k) / N
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4 if dtype == torch.float32 else 1e-10,
                               atol=1e-7 if dtype == torch.float32 else 1e-14)


def test_single_label_equals_cross_entropy_and_lists_equal_multi_hot(device):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 30, generator=g)
    labels = torch.randint(0, 30, (6,), generator=g)
    lists = [[int(c)] for c in labels]
    torch.testing.assert_close(multilabel_softmax_loss(logits, lists, backend="torch"),
                               F.cross_entropy(logits, labels))
    torch.testing.assert_close(multilabel_softmax_loss(logits.to(device), lists, backend="triton").cpu(),
                               F.cross_entropy(logits, labels))
    lists = [[1, 4, 4], [0], [2, 3], [29, 0], [5], [7, 8, 9]]  # a repeated label counts once
    dense = torch.zeros(6, 30, dtype=torch.bool)
    for row, labels in enumerate(lists):
        dense[row, labels] = True
    torch.testing.assert_close(multilabel_softmax_loss(logits, lists), multilabel_softmax_loss(logits, dense))
    fused = multilabel_softmax_loss(logits.to(device), dense.long(), backend="triton").cpu()
    torch.testing.assert_close(fused, softmax_loss_fp64(logits, [sorted(set(x)) for x in lists]).float())


def test_fused_bf16_within_twice_torch_error(device):
    C = 3000
    lists = label_lists(4, C, [1, 3, 40])
    logits = 3 * torch.randn(4, C, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    truth = softmax_loss_fp64(logits, lists)
    x = logits.bfloat16()
    y = multi_hot(lists, C, dtype=torch.bfloat16)
    low = -(y / y.sum(1, keepdim=True) * x.log_softmax(dim=1)).sum(1).mean()  # the formula run in bf16
    fused = multilabel_softmax_loss(x.to(device), lists, backend="triton").cpu()
    assert (fused.double() - truth).abs() <= 2 * (low.double() - truth).abs() + 1e-3


def test_nan_in_gives_nan_out(device):
    logits = torch.randn(3, 20)
    logits[1, 3] = float("nan")
    assert torch.isnan(multilabel_softmax_loss(logits, [[0], [1, 2], [5]], backend="torch"))
    assert torch.isnan(multilabel_softmax_loss(logits.to(device), [[0], [1, 2], [5]], backend="triton"))


def test_sigmoid_loss_formula():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(4, 12, generator=g, dtype=torch.float64)
    lists = [[0, 3], [], [11], [1, 2, 3, 4]]  # a row without labels is all negatives
    want = 0.0
    for row, labels in zip(logits, lists):
        for c in range(12):
            p = 1 / (1 + math.exp(-row[c].item()))
            want -= math.log(p) if c in labels else math.log(1 - p)
    want /= 4
    torch.testing.assert_close(multilabel_sigmoid_loss(logits, lists).item(), want, rtol=1e-12, atol=1e-12)
    loss = multilabel_sigmoid_loss(logits.float().requires_grad_(True), multi_hot(lists, 12))
    assert loss.dtype == torch.float32


@pytest.mark.parametrize(
    "targets,error,match",
    [
        ([[0], [], [2]], ValueError, "row 1 has none"),
        ([[0], [1], [20]], ValueError, r"targets\[2\] holds label 20, outside \[0, 20\)"),
        ([[0], [-1], [2]], ValueError, r"targets\[1\] holds label -1"),
        ([[0], [1]], ValueError, "one label list per logits row"),
        ([[0], [1.0], [2]], TypeError, r"targets\[1\] must hold int"),
        (torch.full((3, 20), 0.5), ValueError, "multi-hot"),
        (torch.ones(3, 21), ValueError, r"logits' shape \(3, 20\)"),
        ("abc", TypeError, "targets must be"),
    ],
)
def test_clear_errors(targets, error, match):
    with pytest.raises(error, match=match):
        multilabel_softmax_loss(torch.randn(3, 20), targets)


def test_backend_errors():
    with pytest.raises(ValueError, match="backend must be one of"):
        multilabel_softmax_loss(torch.randn(2, 5), [[0], [1]], backend="fast")
    with pytest.raises(ValueError, match="logits must be 2-D"):
        multilabel_softmax_loss(torch.randn(5), [[0]])


def test_validate_false_skips_only_the_data_dependent_checks():
    logits = torch.randn(3, 5, dtype=torch.float64)
    y = torch.zeros(3, 5, dtype=torch.float64)
    y[0, 1] = y[1, 2] = y[1, 4] = y[2, 0] = 1
    expected = multilabel_softmax_loss(logits, y)
    assert torch.equal(multilabel_softmax_loss(logits, y, validate=False), expected)
    assert torch.equal(multilabel_sigmoid_loss(logits, y, validate=False), multilabel_sigmoid_loss(logits, y))
    with pytest.raises(ValueError, match="targets must have the logits' shape"):
        multilabel_softmax_loss(logits, y[:2], validate=False)
