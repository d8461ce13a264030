"""curves.png: loss, learning rate and kNN over a run's steps, from its metrics.jsonl.

Imports nothing else from fastssl; `fastssl.viz.draw_run_curves` draws it at the end of a run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl -> one record per step in step order (a step logged twice, by a run resumed
    from an earlier checkpoint, keeps its latest record)."""
    by_step: dict[int, dict[str, Any]] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step[int(record["step"])] = record
    return [by_step[s] for s in sorted(by_step)]


def _smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over `window` steps (shorter at the start), for a readable loss curve."""
    csum = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)


def plot_curves(metrics_path: str | Path, out_path: str | Path,
                summary: dict[str, Any] | None = None) -> Path:
    """Draw loss (raw and smoothed), learning rate and kNN top-1 against the step into out_path (PNG).

    kNN: the fixed-subsample values logged during training (`knn_top1_subset`, from the subsample's
    random-init value at step 0 when `summary` has it), and, from `summary` when given, the final
    full-split kNN and the random-init kNN as reference lines. The subsample's smaller memory bank
    reads lower than the full split: compare the curve with its own start."""
    records = read_metrics(metrics_path)
    summary = summary or {}
    steps = np.array([r["step"] + 1 for r in records])  # step s's record is the state after s + 1 updates
    loss = np.array([r.get("loss", np.nan) for r in records], dtype=float)
    lr = np.array([r.get("lr", np.nan) for r in records], dtype=float)
    knn = [(r["step"] + 1, r["knn_top1_subset"]) for r in records if "knn_top1_subset" in r]
    if "knn_top1_subset_random_init" in summary:
        knn.insert(0, (0, summary["knn_top1_subset_random_init"]))

    fig = Figure(figsize=(12, 3.4), dpi=100, layout="constrained")
    ax_loss, ax_lr, ax_knn = fig.subplots(1, 3)
    title = " ".join(str(summary[k]) for k in ("method", "backbone") if k in summary)
    if title:
        fig.suptitle(title)
    if len(steps):
        ax_loss.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="per step")
        ax_loss.plot(steps, _smooth(loss, max(1, len(steps) // 50)), color="tab:blue", lw=1.5,
                     label="smoothed")
        ax_loss.legend(loc="upper right", fontsize=8)
        ax_lr.plot(steps, lr, color="tab:orange")
    ax_loss.set(title="training loss", xlabel="step")
    ax_lr.set(title="learning rate", xlabel="step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    if knn:
        x, y = zip(*knn)
        ax_knn.plot(x, 100 * np.array(y), "o-", color="tab:green", ms=4,
                    label="fixed subsample (from random init)")
    for key, label, style in (("knn_top1", "final kNN, test split", "-"),
                              ("knn_top1_random_init", "random init, test split", ":")):
        if key in summary:
            ax_knn.axhline(100 * summary[key], color="gray", ls=style, lw=1.2,
                           label=f"{label}: {summary[key]:.2%}")
    if knn or "knn_top1" in summary:
        ax_knn.legend(loc="lower right", fontsize=8)
    else:
        ax_knn.text(0.5, 0.5, "no kNN evaluation in this run", ha="center", va="center",
                    transform=ax_knn.transAxes, color="gray")
    ax_knn.set(title="kNN top-1 (k=20, T=0.07) %", xlabel="step")
    if len(steps):
        for ax in (ax_loss, ax_lr, ax_knn):
            ax.set_xlim(0, steps[-1])
            ax.grid(alpha=0.3)
    out_path = Path(out_path)
    fig.savefig(out_path)
    return out_path
