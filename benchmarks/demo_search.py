"""The demo's recipe search: train each candidate as `fastssl train` (the demo) would, for a fixed
number of epochs, and print one table row per candidate (kNN top-1 k=20 T=0.07 on the test
split, random-init kNN, optional linear probe, steps, speed, wall time, machine load).

    python benchmarks/demo_search.py                       # every candidate, its own epochs
    python benchmarks/demo_search.py --only base pool2 --epochs 2 --threads 1

Each candidate is the demo (fastssl.cli's DEMO_METHOD / DEMO_PRESET / DEMO_VIEW_OVERRIDES) with
some of those replaced, run in a fresh process so nothing carries over. Fixed epochs and a fixed
seed make the losses and kNN independent of the machine's load; only the times depend on it, so
on a shared machine read them as a record of the run, not as speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (what changes against the row it is compared with, demo fields replaced). "preset" keys are
# config keys (DEMO_PRESET), "views" are ViewSpec fields (DEMO_VIEW_OVERRIDES), "method" the method.
CANDIDATES: dict[str, tuple[str, dict]] = {
    "base": ("the demo recipe before the search: MoCo v3, resnet8 (global avg pool), LARS lr 1.0", {
        "method": "mocov3",
        "preset": {"backbone": "resnet8", "optimizer": "lars", "base_lr": 1.0, "weight_decay": 1e-5,
                   "warmup_epochs": 0.5, "mlp_hidden_dim": 512, "moco_dim": 128, "batch_size": 128},
        "views": {"scale": (0.25, 1.0), "blur_p": 0.0, "grayscale_p": 0.0}}),
    "pool2": ("base, features = last stage pooled to 2x2 (resnet8_pool2, 256-d)", {
        "method": "mocov3",
        "preset": {"backbone": "resnet8_pool2", "optimizer": "lars", "base_lr": 1.0, "weight_decay": 1e-5,
                   "warmup_epochs": 0.5, "mlp_hidden_dim": 512, "moco_dim": 128, "batch_size": 128},
        "views": {"scale": (0.25, 1.0), "blur_p": 0.0, "grayscale_p": 0.0}}),
}


def _child(name: str, out: str, epochs: int, linear: bool) -> int:
    """Run one candidate in this process: patch the demo's recipe, then `fastssl train`."""
    sys.path.insert(0, str(ROOT))
    from fastssl import cli

    spec = CANDIDATES[name][1]
    cli.DEMO_METHOD = spec.get("method", cli.DEMO_METHOD)
    cli.DEMO_PRESET = dict(cli.DEMO_PRESET) | spec.get("preset", {})
    cli.DEMO_VIEW_OVERRIDES = dict(cli.DEMO_VIEW_OVERRIDES) | spec.get("views", {})
    if hasattr(cli, "DEMO_TIME_BUDGET_S"):
        cli.DEMO_TIME_BUDGET_S = None  # fixed work: the candidate's epochs, whatever the load
    argv = ["train", "--out", out, f"epochs={epochs}"] + (["--linear-probe"] if linear else [])
    return cli.main(argv)


def _versions() -> str:
    import torch

    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return (f"CPU ({platform.machine()}, {os.cpu_count()} cores) · torch {torch.__version__} · "
            f"git {git.stdout.strip() or '?'} · {time.strftime('%Y-%m-%d', time.gmtime())}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help=f"candidates (default: all): {', '.join(CANDIDATES)}")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of every candidate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--linear-probe", action="store_true")
    parser.add_argument("--out", default="runs/demo_search")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, args.out, args.epochs, args.linear_probe)
    names = args.only or list(CANDIDATES)
    unknown = [n for n in names if n not in CANDIDATES]
    if unknown:
        parser.error(f"--only: expected names among {sorted(CANDIDATES)}, got {unknown}")
    print(f"{_versions()} · {args.threads} torch thread(s) · {args.epochs} epochs each\n")
    print("| candidate | change | steps | kNN top-1 | random init | linear probe | img/s | wall s "
          "| load avg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(ROOT))
    failed = 0
    for name in names:
        out = Path(args.out, f"{name}_e{args.epochs}")
        cmd = [sys.executable, __file__, "--child", name, "--out", str(out), "--epochs", str(args.epochs)]
        t0 = time.perf_counter()
        rc = subprocess.run(cmd + (["--linear-probe"] if args.linear_probe else []), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        wall = time.perf_counter() - t0
        load = os.getloadavg()[1]  # the 5-minute average at the end: how shared the machine was
        if rc != 0 or not (out / "summary.json").is_file():
            print(f"| {name} | {CANDIDATES[name][0]} | failed (exit {rc}) | | | | | {wall:.0f} "
                  f"| {load:.1f} |")
            failed += 1
            continue
        s = json.loads((out / "summary.json").read_text())
        rand = s.get("knn_top1_random_init", float("nan"))
        lin = f"{s['linear_top1']:.2%}" if "linear_top1" in s else "–"
        print(f"| {name} | {CANDIDATES[name][0]} | {s['steps']} | {s['knn_top1']:.2%} | {rand:.2%} | {lin} | "
              f"{s['images_per_second']:.0f} | {wall:.0f} | {load:.1f} |", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
