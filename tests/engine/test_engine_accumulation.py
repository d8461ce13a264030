"""accum_steps: 4 micro-batches of 2 equal one batch of 8 through the Trainer, for DINO (the
center and the EMA teacher move once per optimizer step, on all 8 rows) and MAE: the same
losses, parameters, teacher and center after two SGD steps."""

import pytest
import torch
from ssl_tiny import SIZES, MultiViewLoader, full_state, record_losses, tiny_method

from fastssl.engine import Trainer
from fastssl.engine.parallel import split_micro_batches


def _run(name, out, accum_steps):
    method = tiny_method(name, out, max_steps=2, optimizer="sgd", momentum=0.9, accum_steps=accum_steps)
    losses = record_losses(method)
    Trainer(method, MultiViewLoader(SIZES[name]), progress=False, log=lambda m: None).fit()
    return losses, full_state(method)


@pytest.mark.parametrize("name", ["dino", "mae"])
def test_four_micro_batches_equal_one_batch_of_four_times_the_size(tmp_path, name):
    micro_losses, accumulated = _run(name, str(tmp_path / "accum"), 4)
    batch_losses, whole = _run(name, str(tmp_path / "whole"), 1)
    assert len(micro_losses) == 8 and len(batch_losses) == 2
    for step in range(2):  # the batch loss is the mean of its micro-batches' losses (equal sizes)
        mean = sum(micro_losses[4 * step:4 * step + 4]) / 4
        assert abs(mean - batch_losses[step]) < 1e-5 * max(1.0, abs(batch_losses[step])), step
    for key, value in whole.items():
        torch.testing.assert_close(accumulated[key], value, rtol=1e-5, atol=1e-6, msg=key)
    if name == "dino":  # the center moved (two updates), identically
        assert whole["criterion.center"].abs().max() > 0


def test_split_micro_batches_keeps_rows_together_and_rejects_uneven_batches():
    batch = {"views": [torch.arange(8.0), torch.arange(8.0) + 10], "index": torch.arange(8), "epoch": 3}
    parts = split_micro_batches(batch, 4)
    assert [p["index"].tolist() for p in parts] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert [p["views"][1].tolist() for p in parts][2] == [14.0, 15.0]
    assert all(p["epoch"] == 3 for p in parts)
    with pytest.raises(ValueError, match="accum_steps"):
        split_micro_batches(batch, 3)
