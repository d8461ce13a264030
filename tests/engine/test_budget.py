"""engine.budget: the steps that fit in a wall-clock budget, from measured step times."""

import time

from fastssl.engine.budget import TimeBudget


def _budget(seconds, planned=1000, logged=None):
    return TimeBudget(seconds, start=time.perf_counter(), planned_steps=planned, steps_per_epoch=10, world=1,
                      log=(logged if logged is not None else []).append)


def _feed(budget, times, total):
    """after_step for each time, steps counted from 1; returns the answers."""
    return [budget.after_step(t, step=i + 1, total_steps=total) for i, t in enumerate(times)]


def test_the_first_answer_comes_after_two_warm_up_and_twelve_timed_steps():
    logged = []
    budget = _budget(100.0, logged=logged)
    # warm-up steps are slow (compilation); the timed ones take 1 s, one outlier excepted
    answers = _feed(budget, [30.0, 20.0] + [1.0] * 11 + [9.0], total=1000)
    assert answers[:13] == [None] * 13
    # 95% of the ~100 s left at 1 s a step (the median ignores the outlier): 94 more steps after 14
    assert answers[13] == 14 + 94
    assert logged == ["time budget: 1.00 s/step, evaluation 0 s: training 108 of 1000 steps (10.80 epochs)"]


def test_recalibration_every_50_steps_on_the_latest_50():
    budget = _budget(1000.0)
    answers = _feed(budget, [1.0] * 14 + [2.0] * 50, total=1000)
    assert [i for i, a in enumerate(answers) if a is not None] == [13, 63]
    # at step 64 the last 50 steps took 2 s: 95% of ~1000 s left / 2 s = 474 more steps (and a bit
    # less left than 1000 s, since the clock has run) -> 64 + 474 at most
    assert 64 + 470 <= answers[63] <= 64 + 475


def test_the_budget_never_lengthens_a_run_and_always_allows_one_more_step():
    assert _feed(_budget(1e6, planned=40), [0.01] * 14, total=40)[-1] == 40
    assert _feed(_budget(0.0), [1.0] * 14, total=1000)[-1] == 15


def test_an_answer_within_one_percent_keeps_the_current_length():
    budget = _budget(100.0)
    assert _feed(budget, [1.0] * 14, total=108)[-1] == 108
    budget = _budget(100.0)
    assert _feed(budget, [1.0] * 14, total=107)[-1] == 107


def test_evaluation_time_and_per_step_extras_are_kept_out_of_the_training_time():
    budget = _budget(100.0)
    answers = [budget.after_step(1.0, step=i + 1, total_steps=1000, eval_s=50.0, extra_s_per_step=1.0)
               for i in range(14)]
    # (100 - 50) s left at 1 + 1 s a step: int(0.95 * ~50 / 2) = 23 more steps
    assert answers[-1] == 14 + 23
