"""A wall-clock budget for a run: the number of steps that fit, calibrated on measured steps.

After CALIBRATION_STEPS timed steps (following WARMUP_STEPS untimed ones), and again every
RECALIBRATE_EVERY steps on the latest speed (a shared machine's speed changes during a run),
the run's length becomes the steps that fit in what is left of the budget, at most the
planned steps and at least one more step."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastssl.engine.run import rank0_value


class TimeBudget:
    """`seconds` of wall-clock time from `start` (perf_counter) for training and evaluations.

    planned_steps: the run's configured length (the budget only shortens it); steps_per_epoch:
    for the log line. world: ranks,
    which all adopt rank 0's answer so they stop at the same step. Feed each step's time to
    `after_step`; at a calibration point it returns the run's length in steps."""

    WARMUP_STEPS = 2         # untimed: the first steps pay for compilation and allocation
    CALIBRATION_STEPS = 12   # timed steps before the budget is first applied
    RECALIBRATE_EVERY = 50
    RESERVE = 0.05           # epoch starts (pipeline set-up), checkpoints and the final save

    def __init__(self, seconds: float, *, start: float, planned_steps: int, steps_per_epoch: int, world: int,
                 log: Callable[[str], None]):
        self.deadline = start + seconds
        self.planned_steps, self.steps_per_epoch = planned_steps, steps_per_epoch
        self.world, self.log = world, log
        self.step_times: list[float] = []

    def after_step(self, step_time: float, *, step: int, total_steps: int, eval_s: float = 0.0,
                   extra_s_per_step: float = 0.0) -> int | None:
        """Record a step's seconds. At a calibration point returns the run's length in steps
        (`total_steps` when the fit is within 1% of it), otherwise None.

        step: steps done; total_steps: the current length; eval_s: seconds still to be spent
        outside steps (the final evaluation); extra_s_per_step: recurring work spread per step
        (evaluations while training)."""
        self.step_times.append(step_time)
        n = len(self.step_times) - self.WARMUP_STEPS - self.CALIBRATION_STEPS
        if n < 0 or n % self.RECALIBRATE_EVERY:
            return None
        window = self.step_times[-self.RECALIBRATE_EVERY:] if n else self.step_times[self.WARMUP_STEPS:]
        step_s = sorted(window)[len(window) // 2] + extra_s_per_step
        remaining = self.deadline - time.perf_counter() - eval_s
        fit = min(max(step + int((1 - self.RESERVE) * remaining / step_s), step + 1), self.planned_steps)
        fit = rank0_value(fit, self.world)  # every rank must stop at the same step
        if abs(fit - total_steps) <= 0.01 * total_steps:
            return total_steps
        self.log(f"time budget: {step_s:.2f} s/step, evaluation {eval_s:.0f} s: training {fit} of "
                 f"{self.planned_steps} steps ({fit / self.steps_per_epoch:.2f} epochs)")
        return fit
