"""fastssl.distributed without a process group, and all_gather_rows over 3 gloo processes (the
other gathers' 2-process behaviour is tested in tests/methods/test_ddp.py and through the
losses' gather tests)."""

import pytest
import torch

from fastssl.distributed import (
    all_gather_no_grad,
    all_gather_rows,
    all_gather_with_grad,
    batch_shuffle,
    batch_unshuffle,
)


def test_gathers_are_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert all_gather_with_grad(x) is x
    assert all_gather_no_grad(x) is x
    assert all_gather_rows(x) is x


def _rows_of_rank(rank: int) -> torch.Tensor:
    n = (5, 0, 3)[rank]   # unequal shards, one of them empty
    return torch.arange(n * 2, dtype=torch.float64).reshape(n, 2) + 100 * rank


def _gather_rows(rank, world):
    return all_gather_rows(_rows_of_rank(rank), chunk_rows=2)   # 2 rows per message: 3 rounds


def test_all_gather_rows_concatenates_unequal_shards_in_rank_order():
    from dist_utils import run_gloo

    expected = torch.cat([_rows_of_rank(r) for r in range(3)])
    for got in run_gloo(_gather_rows, 3):
        assert torch.equal(got, expected)


def test_batch_shuffle_in_one_process_permutes_and_unshuffle_restores():
    x = torch.arange(10.0)[:, None].repeat(1, 3)
    shuffled, inverse = batch_shuffle(x, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(shuffled, x[perm])
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(batch_unshuffle(shuffled * 2, inverse), x * 2)


def test_batch_unshuffle_rejects_an_inverse_of_another_batch():
    _, inverse = batch_shuffle(torch.randn(6, 2))
    with pytest.raises(ValueError, match=r"inverse: expected 1 \* 4 entries .* got 6"):
        batch_unshuffle(torch.randn(4, 2), inverse)
