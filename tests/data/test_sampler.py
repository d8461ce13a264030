"""ResamplingSampler: class shares against the resampling formulas (computed here
independently), reproducibility, DDP partitioning, errors."""

import math
import random

import pytest
import torch

from fastssl.data.labels import LabelTable
from fastssl.data.sampler import ResamplingSampler

# Power-law class sizes, single label per image.
SIZES = [800, 400, 200, 100, 50, 25, 12, 6]
SINGLE = [[c] for c, n in enumerate(SIZES) for _ in range(n)]
DRAWS = 200_000


def class_shares(sampler, labels, num_classes):
    idx = sampler.epoch_indices()
    per_image = torch.tensor([row[0] for row in labels])
    return torch.bincount(per_image[idx], minlength=num_classes).double() / idx.numel()


def tolerance(p, n=DRAWS):
    # 5 standard deviations of a multinomial share, plus a hair for p ~ 0.
    return 5 * math.sqrt(p * (1 - p) / n) + 1e-4


@pytest.mark.parametrize("mode", ["natural", "uniform", "sqrt", "inverse_sqrt"])
def test_single_label_class_shares(mode):
    total = sum(SIZES)
    rare_threshold, rare_factor = 30, 4.0
    if mode == "natural":
        expected = [n / total for n in SIZES]
    elif mode == "uniform":
        expected = [1 / len(SIZES)] * len(SIZES)
    elif mode == "sqrt":
        z = sum(math.sqrt(n) for n in SIZES)
        expected = [math.sqrt(n) / z for n in SIZES]
    else:  # class mass n * n^-1/2, times the factor for classes rarer than the threshold
        mass = [math.sqrt(n) * (rare_factor if n < rare_threshold else 1.0) for n in SIZES]
        expected = [m / sum(mass) for m in mass]
    kwargs = {"rare_threshold": rare_threshold, "rare_factor": rare_factor} if mode == "inverse_sqrt" else {}
    sampler = ResamplingSampler(SINGLE, mode, num_samples=DRAWS, seed=3, **kwargs)
    got = class_shares(sampler, SINGLE, len(SIZES))
    for c, p in enumerate(expected):
        assert abs(got[c].item() - p) < tolerance(p), (mode, c, got[c].item(), p)


def random_multilabel(num_images=600, num_classes=12, seed=0):
    rng = random.Random(seed)
    weights = [1 / (c + 1) ** 1.2 for c in range(num_classes)]
    rows = []
    for _ in range(num_images):
        k = rng.choice([1, 1, 2, 3])
        row = set()
        while len(row) < k:
            row.add(rng.choices(range(num_classes), weights)[0])
        rows.append(sorted(row))
    return rows


def expected_image_probs(rows, mode, rare_threshold=None, rare_factor=1.0):
    counts = {}
    for row in rows:
        for c in row:
            counts[c] = counts.get(c, 0) + 1
    if mode == "uniform":  # label uniformly among present labels, then an image carrying it
        w = [sum(1 / len(counts) / counts[c] for c in row) for row in rows]
    else:
        w = [sum(counts[c] ** -0.5 for c in row) / len(row) for row in rows]
        if rare_threshold is not None:
            w = [wi * (rare_factor if any(counts[c] < rare_threshold for c in row) else 1.0)
                 for wi, row in zip(w, rows)]
    z = sum(w)
    return [wi / z for wi in w]


@pytest.mark.parametrize("mode,rare", [("uniform", None), ("sqrt", None), ("inverse_sqrt", 20)])
def test_multilabel_probabilities_and_label_shares(mode, rare):
    rows = random_multilabel()
    kwargs = {"rare_threshold": rare, "rare_factor": 10.0} if rare else {}
    expected = expected_image_probs(rows, mode, rare, 10.0)
    sampler = ResamplingSampler(rows, mode, num_samples=DRAWS, seed=1, **kwargs)
    torch.testing.assert_close(sampler.probabilities, torch.tensor(expected, dtype=torch.float64))
    # Empirical: per draw, how often each label is present vs the sum of P(i) over images carrying it.
    idx = sampler.epoch_indices().tolist()
    num_classes = 12
    hits = [0] * num_classes
    for i in idx:
        for c in rows[i]:
            hits[c] += 1
    for c in range(num_classes):
        p = sum(pi for pi, row in zip(expected, rows) if c in row)
        assert abs(hits[c] / len(idx) - p) < tolerance(p), (mode, c)


def test_inverse_sqrt_without_threshold_is_sqrt():
    rows = random_multilabel(200)
    a = ResamplingSampler(rows, "sqrt", seed=5)
    b = ResamplingSampler(rows, "inverse_sqrt", seed=5)
    assert torch.equal(a.probabilities, b.probabilities)
    assert list(a) == list(b)


def test_natural_epoch_is_a_permutation_and_reshuffles():
    s = ResamplingSampler(SINGLE, "natural", seed=0)
    first = list(s)
    assert sorted(first) == list(range(len(SINGLE)))
    s.set_epoch(1)
    second = list(s)
    assert sorted(second) == list(range(len(SINGLE))) and second != first


@pytest.mark.parametrize("mode", ["natural", "sqrt"])
def test_reproducible_by_seed_and_epoch(mode):
    rows = random_multilabel(300)
    a = ResamplingSampler(rows, mode, seed=7)
    b = ResamplingSampler(rows, mode, seed=7)
    a.set_epoch(4)
    b.set_epoch(4)
    assert list(a) == list(b)
    b.set_epoch(5)
    assert list(a) != list(b)
    c = ResamplingSampler(rows, mode, seed=8)
    c.set_epoch(4)
    assert list(a) != list(c)


@pytest.mark.parametrize("mode", ["natural", "uniform", "sqrt"])
@pytest.mark.parametrize("num_samples,world", [(1000, 4), (1001, 3), (7, 2)])
def test_ddp_shares_disjoint_and_covering(mode, num_samples, world):
    rows = random_multilabel(250)
    shards, samplers = [], []
    for r in range(world):
        s = ResamplingSampler(rows, mode, num_samples=num_samples, seed=2, rank=r, world_size=world)
        s.set_epoch(3)
        shards.append(list(s))
        samplers.append(s)
        assert len(shards[-1]) == len(s) == math.ceil(num_samples / world)
    # Every rank computes the same padded epoch and keeps draws r, r + W, ...: interleaving
    # the shards must rebuild that epoch exactly (disjoint positions, nothing left out).
    epoch = samplers[0].epoch_indices().tolist()
    assert len(epoch) == world * len(shards[0]) >= num_samples
    assert all(s.epoch_indices().tolist() == epoch for s in samplers)
    woven = [shards[j % world][j // world] for j in range(len(epoch))]
    assert woven == epoch
    assert shards[0] != shards[1]


def test_natural_ddp_partitions_the_images():
    s = [ResamplingSampler(SINGLE, "natural", seed=1, rank=r, world_size=3) for r in range(3)]
    sets = [set(x) for x in s]
    assert len(SINGLE) % 3 == 0
    assert all(not (sets[i] & sets[j]) for i in range(3) for j in range(i + 1, 3))
    assert set.union(*sets) == set(range(len(SINGLE)))


def test_errors():
    rows = [[0], [1, 2]]
    with pytest.raises(ValueError, match="mode must be one of"):
        ResamplingSampler(rows, "balanced")
    with pytest.raises(ValueError, match=r"labels\[1\] is empty"):
        ResamplingSampler([[0], []], "sqrt")
    ResamplingSampler([[0], []], "natural")  # natural sampling does not read labels
    table = LabelTable([[0], [1, 2]], 3)
    assert torch.equal(ResamplingSampler(table, "uniform").probabilities,
                       ResamplingSampler(rows, "uniform").probabilities)
    with pytest.raises(TypeError, match="list of label-index lists"):
        ResamplingSampler(torch.tensor([0, 1]), "sqrt")
    with pytest.raises(ValueError, match=r"labels\[0\] must hold label indices >= 0, got -1"):
        ResamplingSampler([[-1]], "sqrt")
    with pytest.raises(ValueError, match=r"rank must be an int in \[0, world_size=2\), got 2"):
        ResamplingSampler(rows, rank=2, world_size=2)
    with pytest.raises(ValueError, match="num_samples must be a positive int"):
        ResamplingSampler(rows, num_samples=0)
    with pytest.raises(ValueError, match="rare_threshold applies to mode='inverse_sqrt' only"):
        ResamplingSampler(rows, "sqrt", rare_threshold=5)
    with pytest.raises(ValueError, match="rare_factor must be a positive"):
        ResamplingSampler(rows, "inverse_sqrt", rare_threshold=5, rare_factor=0)
    s = ResamplingSampler(rows, "sqrt")
    with pytest.raises(ValueError, match="epoch must be an int >= 0, got -1"):
        s.set_epoch(-1)
    assert s.epoch == 0
