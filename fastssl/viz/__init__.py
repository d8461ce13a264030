"""Pictures of a run (matplotlib, the optional `viz` extra): curves.png at the end of a run
(`draw_run_curves`, which `fastssl train` hands the Trainer) and the figures of
`fastssl viz RUN` (fastssl.viz.figures)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def draw_run_curves(run_dir: str | Path, summary: dict[str, Any], *,
                    log: Callable[[str], None] = _stderr) -> None:
    """RUN/curves.png (loss, LR, kNN over the steps) from RUN/metrics.jsonl and the summary;
    a note instead when matplotlib, an optional extra, is not installed."""
    try:
        from fastssl.viz.curves import plot_curves
    except ImportError as e:
        log(f"curves.png: not drawn ({e.name} is not installed: pip install 'fastssl[viz]')")
        return
    metrics = Path(run_dir) / "metrics.jsonl"
    if metrics.is_file():
        plot_curves(metrics, Path(run_dir) / "curves.png", summary)
