"""A training step on a busy CPU: ms per step of MoCo v3's Fashion-MNIST preset (batch 128,
channels_last; forward, backward, SGD step on fixed random views) alone and beside a
competing 2-thread torch process, with torch's default OpenMP waiting, with
OMP_WAIT_POLICY=PASSIVE, and with one thread. Each setting runs in a fresh process (the OpenMP
policy is read at start-up). CPU figures: ratios only.

    python -m fastssl.bench.under_load [--steps N] [--results DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastssl.bench.harness import environment, write_rows

CHILD = [sys.executable, "-m", "fastssl.bench.under_load", "--child"]
SETTINGS = [  # name, competing load, extra environment
    ("idle, default", False, {}),
    ("idle, OMP_WAIT_POLICY=PASSIVE", False, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("loaded, default", True, {}),
    ("loaded, OMP_WAIT_POLICY=PASSIVE", True, {"OMP_WAIT_POLICY": "PASSIVE"}),
    ("loaded, 1 thread", True, {"OMP_NUM_THREADS": "1"}),
]


def _load(seconds: float) -> None:
    """The competitor: 2-thread matmuls until killed (or `seconds` pass)."""
    torch.set_num_threads(2)
    a = torch.randn(512, 512)
    end = time.time() + seconds
    while time.time() < end:
        a = torch.tanh(a @ a.T / 512)


def _step_ms(steps: int) -> float:
    from fastssl.data.spec import FASHION_MNIST
    from fastssl.engine import resolve_config
    from fastssl.method import StepContext
    from fastssl.methods import METHODS

    cls = METHODS["mocov3"]
    cfg = resolve_config(cls.config_class, None, {"out": "unused"}, preset=cls.presets[FASHION_MNIST])
    torch.manual_seed(0)
    method = cls(cfg).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.01)
    shape = (cfg.data.batch_size, 3, cfg.data.image_size, cfg.data.image_size)
    views = [torch.randn(shape).to(memory_format=torch.channels_last) for _ in range(2)]
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=1, total_steps=1, lr=0.01, weight_decay=0.0)

    def step() -> None:
        loss = method({"views": views}, ctx)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--child", choices=["step", "load"], help=argparse.SUPPRESS)
    parser.add_argument("--results", type=Path, help="folder for under_load.jsonl (the rows as data)")
    args = parser.parse_args(argv)
    if args.child == "load":
        return _load(3600)
    if args.child == "step":
        print(f"{_step_ms(args.steps):.1f}")
        return
    env = environment()
    rows = []
    for name, loaded, extra in SETTINGS:
        load = subprocess.Popen(CHILD + ["load"]) if loaded else None
        try:
            if load is not None:
                time.sleep(2)  # the competitor is running before the step is timed
            done = subprocess.run(CHILD + ["step", "--steps", str(args.steps)],
                                  env={**os.environ, **extra}, capture_output=True, text=True, check=True)
        finally:
            if load is not None:
                load.kill()
                load.wait()
        rows.append((name, float(done.stdout.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"{env['device']} · torch {env['torch']} · git {env['git_sha']} · {env['date']} · "
          f"{args.steps} timed steps\nCPU run: times are only comparable as ratios within this table.\n")
    print("| setting | ms/step (CPU, ratios only) | × idle default |\n|---|---|---|")
    for name, ms in rows:
        print(f"| {name} | {ms:.0f} | {ms / base:.2f} |")
    if args.results:
        write_rows(args.results / "under_load.jsonl",
                   [{"setting": name, "steps": args.steps, "ms_per_step": ms,
                     "ratio_to_idle_default": ms / base} for name, ms in rows], env)


if __name__ == "__main__":
    main()
