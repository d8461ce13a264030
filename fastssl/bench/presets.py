"""Every method's small-data preset, run as a user runs it, one after another:

    fastssl train --method M --data DATA --out OUT/M

with DATA the method's default data (Fashion-MNIST; colorization: the generated colour-shapes set),
and one table row per method: steps, kNN top-1 (k=20, T=0.07, test split) of the trained and of
the randomly initialised encoder, the margin, the wall time of the whole command (start-up, both
kNN evaluations and the training), and the machine's load. Fixed work: the numbers do not depend
on the load, the times do; run it on an otherwise idle machine to read them as times.

    python -m fastssl.bench.presets [--only mocov2 dino ...] [--out runs/presets] [--results DIR]

--results DIR writes the rows (with machine, date, versions, git SHA) to DIR/presets.jsonl, in place of
the rows of the methods run; the other methods' rows stay.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fastssl.bench.harness import environment
from fastssl.bench.report import read_rows
from fastssl.methods import METHODS as REGISTERED

METHODS = tuple(REGISTERED)  # every registered method


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", choices=METHODS, help="methods (default: all)")
    parser.add_argument("--out", default="runs/presets")
    parser.add_argument("--results", type=Path, help="folder for presets.jsonl (the rows as data)")
    args = parser.parse_args(argv)
    env = environment()
    print(f"{env['device']} · torch {env['torch']} · git {env['git_sha']} · {env['date']}\n")
    print("| method | backbone | steps | kNN top-1 | random init | margin | img/s | command wall s "
          "| load avg |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    failed, rows = 0, []
    for method in args.only or METHODS:
        out = Path(args.out, method)
        data = REGISTERED[method].default_data
        cmd = [sys.executable, "-m", "fastssl.cli", "train", "--method", method, "--data", data,
               "--out", str(out), "--overwrite"]
        t0 = time.perf_counter()
        Path(args.out).mkdir(parents=True, exist_ok=True)
        with open(Path(args.out, f"{method}.log"), "w") as log:  # the command's own output
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        wall = time.perf_counter() - t0
        load = os.getloadavg()[1]
        summary = out / "summary.json"
        if rc != 0 or not summary.is_file():
            print(f"| {method} | failed (exit {rc}) | | | | | | {wall:.0f} | {load:.1f} |", flush=True)
            failed += 1
            continue
        s = json.loads(summary.read_text())
        trained, rand = s["knn_top1"], s["knn_top1_random_init"]
        print(f"| {method} | {s['backbone']} | {s['steps']} | {trained:.2%} | {rand:.2%} | "
              f"{100 * (trained - rand):+.2f} | {s['images_per_second']:.0f} | {wall:.0f} | {load:.1f} |",
              flush=True)
        # percentages, as the table (fastssl.bench.report) and the earlier rows hold them
        rows.append({"method": method, "data": data, "backbone": s["backbone"], "steps": s["steps"],
                     "knn_top1": round(100 * trained, 2), "knn_top1_random_init": round(100 * rand, 2),
                     "images_per_second": s["images_per_second"],
                     "command_wall_s": wall, "load_avg": load})
    if args.results:
        # the rows of the methods not run this time stay as they were
        path = args.results / "presets.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        ran = {r["method"] for r in rows}
        kept = [r for r in read_rows(path) if r["method"] not in ran] if path.is_file() else []
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
            f.writelines(json.dumps({**env, **r}) + "\n" for r in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
