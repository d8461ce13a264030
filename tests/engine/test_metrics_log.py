"""engine.metrics_log: rows of metrics.jsonl, read in one transfer, cut before a non-finite loss."""

import json

import pytest
import torch

from fastssl.engine.metrics_log import MetricsLog


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _step(log, step, loss, **plain):
    log.add({"step": step, "epoch": 0} | plain, {"loss": torch.tensor(loss), "acc": torch.tensor([0.5])})


def test_flush_reads_the_pending_values_and_appends_one_row_per_step(tmp_path):
    log = MetricsLog(tmp_path, write=True)
    _step(log, 0, 2.0, lr=0.1)
    _step(log, 1, 1.5, lr=0.2)
    assert not log.path.exists()  # nothing is read or written before the flush
    assert log.flush() == (1.5, None)
    _step(log, 2, 1.0, lr=0.3)
    assert log.flush() == (1.0, None)
    assert _rows(log.path) == [{"step": s, "epoch": 0, "lr": lr, "loss": loss, "acc": 0.5}
                               for s, lr, loss in ((0, 0.1, 2.0), (1, 0.2, 1.5), (2, 0.3, 1.0))]
    assert log.pending == [] and log.flush()[1] is None


def test_the_first_non_finite_loss_ends_the_rows_before_it(tmp_path):
    log = MetricsLog(tmp_path, write=True)
    for step, loss in enumerate((1.0, 0.9, float("nan"), 0.8, float("inf"))):
        _step(log, step, loss)
    last, bad = log.flush()
    assert last == float("inf") and bad[0] == 2 and str(bad[1]) == "nan"
    assert [r["step"] for r in _rows(log.path)] == [0, 1]


def test_an_agreement_decides_the_bad_step(tmp_path):
    log = MetricsLog(tmp_path, write=True, agree=lambda local: (1, float("inf")))  # another rank's inf
    for step in range(3):
        _step(log, step, 1.0)
    assert log.flush()[1] == (1, float("inf"))
    assert [r["step"] for r in _rows(log.path)] == [0]


def test_other_ranks_write_nothing(tmp_path):
    log = MetricsLog(tmp_path, write=False)
    _step(log, 0, 1.0)
    assert log.flush() == (1.0, None) and not log.path.exists()


def test_keep_before_drops_rows_to_retrain_and_a_half_written_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(6))
    path.write_text(rows + '{"step": 6, "lo')
    MetricsLog(tmp_path, write=True).keep_before(4)
    assert [r["step"] for r in _rows(path)] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no temp file left


def test_tensorboard_mirrors_the_rows(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is optional")
    log = MetricsLog(tmp_path, write=True, tensorboard=True)
    _step(log, 0, 1.0)
    log.flush()
    log.close()
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
