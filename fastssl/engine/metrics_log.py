"""metrics.jsonl: one JSON object per trained step, written by rank 0, optionally mirrored to
TensorBoard. A step's tensor values stay on the device until a flush reads a window of steps
in one transfer, so logging adds no host sync per step."""

from __future__ import annotations

import errno
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastssl.engine.checkpoint import NoSpaceError, write_text_atomic

FILE = "metrics.jsonl"

NonFinite = tuple[int, float]  # (step, the non-finite loss value)


class MetricsLog:
    """Rows of RUN/metrics.jsonl. `write`: this process writes (rank 0); the others keep only
    the pending values their flush reads. `tensorboard`: also write RUN/tb event files (needs
    the tensorboard package). `agree`: maps this rank's first non-finite loss to the one every
    rank agrees on (fastssl.engine.signals.RankAgreement.first_nonfinite); None: one process."""

    def __init__(self, run_dir: Path, *, write: bool, tensorboard: bool = False,
                 agree: Callable[[NonFinite | None], NonFinite | None] | None = None):
        self.path = Path(run_dir) / FILE
        self.write = write
        self.agree = agree
        self.pending: list[tuple[dict[str, Any], dict[str, torch.Tensor]]] = []
        self.tb = None
        if tensorboard and write:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ValueError("tensorboard: requested, but the package is not installed") from e
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def keep_before(self, step: int) -> None:
        """Drop the rows at or past `step` (a resumed run trains them again) and a last line
        left half-written by a killed run; the file is replaced in one rename."""
        if not self.write or not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the last line of a run killed mid-write
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] < step:
                kept.append(line + "\n")
        write_text_atomic(self.path, "".join(kept))

    def add(self, record: dict[str, Any], values: dict[str, torch.Tensor]) -> None:
        """A trained step: its plain `record` (must hold "step") and its one-element tensors
        (must hold "loss"), read at the next flush."""
        self.pending.append((record, values))

    def flush(self) -> tuple[float, NonFinite | None]:
        """Read the pending steps' values in one transfer and append the rows up to (not
        including) the first step whose loss is non-finite on any rank. Returns (the latest
        loss, that step and value or None). A collective when `agree` is set: every rank
        flushes at the same steps."""
        if not self.pending:
            return float("nan"), None
        numbers = iter(torch.stack([v.float().reshape(()) for _, values in self.pending
                                    for v in values.values()]).tolist())
        for record, values in self.pending:
            record |= {k: next(numbers) for k in values}
        bad = next(((r["step"], r["loss"]) for r, _ in self.pending if not math.isfinite(r["loss"])), None)
        if self.agree is not None:
            bad = self.agree(bad)
        for record, _ in self.pending:
            if bad is not None and record["step"] >= bad[0]:
                break
            self._append(record)
        last = self.pending[-1][0]["loss"]
        self.pending.clear()
        return last, bad

    def _append(self, record: dict[str, Any]) -> None:
        if not self.write:
            return
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise NoSpaceError(self.path) from e
            raise
        if self.tb is not None:
            for k, v in record.items():
                if k not in ("step", "epoch"):
                    self.tb.add_scalar(f"train/{k}", v, record["step"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
