import json

import pytest
from engine_tiny import TinyLoader, TinyMethod, tiny_config

from fastssl.engine import Trainer
from fastssl.viz import draw_run_curves


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_monitor_runs_every_eval_every_epochs_into_that_steps_record(tmp_path):
    calls = []
    monitor = lambda enc: calls.append(enc) or {"knn_top1": 0.25 * len(calls)}
    cfg = tiny_config(tmp_path, epochs=3, eval_every=0.5)   # 4 steps/epoch: after every 2nd step
    method = TinyMethod(cfg)
    Trainer(method, TinyLoader(), monitor=monitor, progress=False, log=lambda m: None).fit()
    records = _records(tmp_path)
    assert [r["step"] for r in records] == list(range(12))  # still one row per step
    monitored = {r["step"]: r["knn_top1_subset"] for r in records if "knn_top1_subset" in r}
    # the first call scores the random init (before any step): the summary holds it
    assert monitored == {1: 0.5, 3: 0.75, 5: 1.0, 7: 1.25, 9: 1.5, 11: 1.75}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["knn_top1_subset_random_init"] == 0.25
    assert 0 < summary["monitor_seconds"] <= summary["train_seconds"]
    assert len(calls) == 7 and all(enc is method.net for enc in calls)


def test_monitor_also_scores_the_last_step_of_a_short_run(tmp_path):
    cfg = tiny_config(tmp_path, epochs=3, eval_every=1.0, max_steps=3)
    Trainer(TinyMethod(cfg), TinyLoader(), monitor=lambda enc: {"knn_top1": 0.5}, progress=False,
            log=lambda m: None).fit()
    assert [r.get("knn_top1_subset") for r in _records(tmp_path)] == [None, None, 0.5]


def test_eval_every_zero_turns_the_monitor_off_and_negative_is_refused(tmp_path):
    cfg = tiny_config(tmp_path / "off", eval_every=0)
    Trainer(TinyMethod(cfg), TinyLoader(), monitor=lambda enc: {"knn_top1": 0.5}, progress=False,
            log=lambda m: None).fit()
    assert not any("knn_top1_subset" in r for r in _records(tmp_path / "off"))
    with pytest.raises(ValueError, match="eval_every must be a number >= 0"):
        tiny_config(tmp_path / "neg", eval_every=-1)


def test_the_cli_hook_draws_curves_png(tmp_path):
    """fastssl train passes draw_run_curves as the Trainer's on_summary: every CLI run draws it."""
    pytest.importorskip("matplotlib", reason="curves.png needs the viz extra (make installs it)")
    cfg = tiny_config(tmp_path, epochs=2, eval_every=1.0)
    Trainer(TinyMethod(cfg), TinyLoader(), monitor=lambda enc: {"knn_top1": 0.5},
            evaluator=lambda enc: {"knn_top1": 0.6}, progress=False, log=lambda m: None,
            on_summary=draw_run_curves).fit()
    png = (tmp_path / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_deterministic_mode_holds_for_the_run_only(tmp_path):
    import torch

    seen = []
    monitor = lambda enc: seen.append(torch.are_deterministic_algorithms_enabled()) or {"knn_top1": 0.5}
    cfg = tiny_config(tmp_path, epochs=1, deterministic=True, eval_every=1.0)
    Trainer(TinyMethod(cfg), TinyLoader(), monitor=monitor, progress=False, log=lambda m: None).fit()
    assert seen == [True, True] and not torch.are_deterministic_algorithms_enabled()
