"""random_masking's randomness: every kept subset and (position, rank) pair equally likely
(chi-square), consecutive rows independent, a seeded generator reproducible and equal on both
backends (the official noise, torch.rand(N, L), drawn from it)."""

import itertools
import math

import torch

from fastssl.ops.mae import random_masking

BACKENDS = ("torch", "triton")


def chi2_critical(dof: int, z: float = 3.09) -> float:
    """Upper critical value of chi-square (Wilson-Hilferty), z = 3.09 <-> p = 0.001."""
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


def test_kept_positions_uniform_chi_square():
    """Per row, every kept subset (C(6, 3) = 20) and every (position, rank) pair is equally likely."""
    L, rows_per_draw, draws = 6, 2000, 5
    subsets = {s: i for i, s in enumerate(itertools.combinations(range(L), 3))}
    subset_counts = torch.zeros(len(subsets))
    rank_counts = torch.zeros(L, L)
    x = torch.zeros(rows_per_draw, L, 1)
    for seed in range(draws):
        _, mask, ids = random_masking(x, 0.5, generator=torch.Generator().manual_seed(seed), backend="torch")
        kept = (mask == 0).nonzero()[:, 1].reshape(rows_per_draw, 3)
        for row in kept.tolist():
            subset_counts[subsets[tuple(row)]] += 1
        rank_counts += torch.nn.functional.one_hot(ids, L).sum(0)
    total = rows_per_draw * draws
    expected = total / len(subsets)
    stat = ((subset_counts - expected) ** 2 / expected).sum().item()
    assert stat < chi2_critical(len(subsets) - 1), stat
    expected = total / L
    stat = ((rank_counts - expected) ** 2 / expected).sum().item()
    assert stat < chi2_critical((L - 1) ** 2), stat  # margins are fixed: (L-1)^2 dof


def test_rows_are_independent_permutations():
    """Consecutive rows of one call: the joint law of their first-ranked tokens is uniform."""
    L = 5
    _, _, ids = random_masking(torch.zeros(20001, L, 1), 0.4, generator=torch.Generator().manual_seed(7),
                               backend="torch")
    first = ids.argmin(1)
    pairs = torch.zeros(L, L)
    pairs.index_put_((first[:-1], first[1:]), torch.ones(20000), accumulate=True)
    expected = 20000 / L**2
    stat = ((pairs - expected) ** 2 / expected).sum().item()
    assert stat < chi2_critical(L * L - 1), stat


def test_seeded_generator_reproduces_and_backends_agree(device):
    x = torch.randn(4, 49, 8, device=device)
    seeded = lambda seed: torch.Generator(device).manual_seed(seed)
    outs = [random_masking(x, 0.75, generator=seeded(3), backend=b) for b in BACKENDS]
    again = random_masking(x, 0.75, generator=seeded(3), backend="triton")
    other = random_masking(x, 0.75, generator=seeded(4), backend="triton")
    for a, b, c in zip(outs[0], outs[1], again):
        assert torch.equal(a, b) and torch.equal(b, c)
    assert not torch.equal(outs[1][2], other[2])
    # documented equivalence: generator draws the official noise, torch.rand(N, L)
    noise = torch.rand(4, 49, generator=seeded(3), device=device)
    assert torch.equal(random_masking(x, 0.75, noise=noise)[2], outs[0][2])
    # the default generator is used (and reproducible) without one
    torch.manual_seed(11)
    first = random_masking(x, 0.5)[2]
    torch.manual_seed(11)
    assert torch.equal(random_masking(x, 0.5)[2], first)
