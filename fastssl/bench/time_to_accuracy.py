"""Time to accuracy: train a recipe for a wall-time budget, as a user runs it, and record what the
minutes bought — optionally beside another tool run the same way on the same data and network.

    python -m fastssl.bench.time_to_accuracy [--method simclr] [--data fashion-mnist] [--budget-s 450]
        [--peer lightly-train --peer-python /path/to/its/venv/bin/python --peer-epochs 4] [key=value ...]

fastssl: `fastssl train --method M --data D --time-budget S --out OUT key=value…` in a child process
(this module's --child mode, which only adds timers to the command). Per run, one JSON line in
--results (default benchmarks/results/time_to_accuracy.jsonl): command wall seconds, steps, images/s,
kNN top-1 (k=20, T=0.07) at the end and on the fixed subsample every eval_every epochs (with the
seconds since the command started), the random-init baselines, and where the time went:
data (the engine's wait for each batch), forward (the method's forward: networks and loss),
optimizer (optimizer.step), backward (the rest of each step: backward and the step's bookkeeping),
evaluation (random-init, subsample and final kNN) and other (start-up, loader set-up, checkpoints).
On a GPU the timers synchronize the device at each boundary, which the split needs.

--peer lightly-train: lightly-train's documented Python API (`lightly_train.train(out, data, model,
method="simclr", epochs, batch_size)`; a custom model goes through its wrapper interface, which its
command line does not offer) run by that tool's own interpreter (`--peer-python`, an environment
where it is installed: never a dependency of fastssl) on the same images exported as PNG files and
the same backbone module (fastssl.models.build_backbone, read from this checkout), fastssl's crop
size and crop scale (its documented transform_args; --peer-args adds or replaces arguments) and the
same optimizer-step timers; its trained backbone is then evaluated by the same fastssl kNN. Its row
carries images_per_second_ratio_fastssl: fastssl's training images/s over the peer's, both measured
in this one command (the engine ratio on the same network, batch and crops). The peer runs
a number of epochs (`--peer-epochs`: choose the one that fits the budget; its wall time is recorded).
Its split is coarser: lightly-train (PyTorch Lightning) runs forward and backward inside the
optimizer step's closure, so they are reported together as `step`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks") / "results" / "time_to_accuracy.jsonl"
PEERS = ("lightly-train",)
PEER_RUNNER = "fastssl.bench.peer_lightly_train"  # run as a module: the folder holds queue.py, data.py


# ----------------------------------------------------------------------------- child: the timed command


class StepTimers:
    """Seconds in the method's forward and in optimizer.step, and when each step ended, through
    torch's global module and optimizer hooks (the engine is unchanged). `is_timed(module)` says
    which module's forward counts."""

    def __init__(self, is_timed):
        import torch
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.torch, self.is_timed = torch, is_timed
        self.t0 = time.perf_counter()
        self.forward_s = self.optimizer_s = 0.0
        self.step_ends: list[float] = []  # seconds since t0 at the end of each optimizer step
        self.first_step_start: float | None = None
        self._started: dict[int, float] = {}
        self._handles = [
            register_module_forward_pre_hook(self._forward_start),
            register_module_forward_hook(self._forward_end),
            register_optimizer_step_pre_hook(self._step_start),
            register_optimizer_step_post_hook(self._step_end),
        ]

    def _now(self) -> float:
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()
        return time.perf_counter()

    def _forward_start(self, module, args):
        if self.is_timed(module):
            self._started[id(module)] = self._now()

    def _forward_end(self, module, args, output):
        start = self._started.pop(id(module), None)
        if start is not None:
            self.forward_s += self._now() - start

    def _step_start(self, optimizer, args, kwargs):
        self._started[id(optimizer)] = now = self._now()
        if self.first_step_start is None:
            self.first_step_start = now - self.t0

    def _step_end(self, optimizer, args, kwargs):
        now = self._now()
        self.optimizer_s += now - self._started.pop(id(optimizer), now)
        self.step_ends.append(now - self.t0)

    def result(self) -> dict:
        for handle in self._handles:
            handle.remove()
        return {
            "forward_s": self.forward_s,
            "optimizer_s": self.optimizer_s,
            "step_ends_s": self.step_ends,
            "first_step_start_s": self.first_step_start,
        }


def child(timers_path: str, train_argv: list[str]) -> int:
    """`fastssl train …` in this process with StepTimers on the Method's forward."""
    from fastssl.bench.harness import run_cli
    from fastssl.method import Method

    def is_timed(module) -> bool:  # the training step's forward, not the engine's FLOP count on meta tensors
        first = next(module.parameters(), None) if isinstance(module, Method) else None
        return first is not None and not first.is_meta

    timers = StepTimers(is_timed)
    rc = run_cli(["train", *train_argv])
    Path(timers_path).write_text(json.dumps(timers.result()))
    return rc


# ----------------------------------------------------------------------------- fastssl run


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def run_fastssl(args: argparse.Namespace, out: Path) -> dict:
    timers_path = out / "timers.json"
    argv = [
        "--method",
        args.method,
        "--data",
        args.data,
        "--time-budget",
        str(args.budget_s),
        "--out",
        str(out),
        "--overwrite",
        *args.overrides,
    ]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.run(
            [
                sys.executable,
                "-m",
                "fastssl.bench.time_to_accuracy",
                "--child",
                str(timers_path),
                "--",
                *argv,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        ).returncode
    wall = time.perf_counter() - t0
    summary_path = out / "summary.json"
    if rc != 0 or not summary_path.is_file():
        raise RuntimeError(f"fastssl train exited with {rc}; its output is in {out.with_suffix('.log')}")
    summary = json.loads(summary_path.read_text())
    timers = json.loads(timers_path.read_text())
    records = [r for r in _rows(out / "metrics.jsonl") if "img_per_s" in r]
    batch = summary["batch_size"]
    step_s = [batch / r["img_per_s"] for r in records]
    data_s = sum(r["data_wait"] * s for r, s in zip(records, step_s))
    ends = timers["step_ends_s"]
    curve = [
        {
            "step": r["step"] + 1,
            "seconds": ends[r["step"]] if r["step"] < len(ends) else None,
            "knn_top1_subset": r["knn_top1_subset"],
        }
        for r in records
        if "knn_top1_subset" in r
    ]
    evaluation = summary["total_seconds"] - summary["train_seconds"] + summary.get("monitor_seconds", 0.0)
    split = {
        "data": data_s,
        "forward": timers["forward_s"],
        "optimizer": timers["optimizer_s"],
        "backward": sum(step_s) - data_s - timers["forward_s"] - timers["optimizer_s"],
        "evaluation": evaluation,
    }
    split["other"] = wall - sum(split.values())
    return {
        "tool": "fastssl",
        "method": args.method,
        "backbone": summary["backbone"],
        "budget_s": args.budget_s,
        "command_wall_s": wall,
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "batch_size": batch,
        "images_per_second": summary["images_per_second"],
        "knn_top1": summary.get("knn_top1"),
        "knn_top1_random_init": summary.get("knn_top1_random_init"),
        "knn_top1_subset_random_init": summary.get("knn_top1_subset_random_init"),
        "knn_curve": curve,
        "seconds": split,
        "overrides": args.overrides,
    }


# ----------------------------------------------------------------------------- peer run


def _resolved_config(args: argparse.Namespace):
    from fastssl.engine import parse_overrides, resolve_config
    from fastssl.methods import METHODS

    cls = METHODS[args.method]
    overrides = parse_overrides(args.overrides) | {"source": args.data}
    return resolve_config(cls.config_class, None, overrides, preset=cls.presets.get(args.data))


def export_png_folder(data: str, folder: Path) -> Path:
    """The pretraining images of `data` as PNG files (what an image-folder tool reads); reused when
    the folder already holds them all."""
    import numpy as np
    from PIL import Image

    from fastssl.data import data_splits

    source = data_splits(data).pretrain
    if not hasattr(source, "image"):
        raise ValueError(
            f"--peer: {data!r} is not an in-memory data set; pass the image folder itself as --data"
        )
    done = folder / "complete"
    if done.is_file() and int(done.read_text()) == len(source):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(len(source)):
        Image.fromarray(np.asarray(source.image(i))).save(folder / f"{i:06d}.png")
    done.write_text(str(len(source)))
    return folder


def peer_defaults(method: str, cfg) -> dict:
    """lightly_train.train arguments that give the peer fastssl's crop size and crop scale (its
    documented transform_args); its other augmentations keep their SimCLR defaults."""
    from fastssl.data import recipes
    from fastssl.methods import METHODS

    view = recipes.with_view_overrides(METHODS[method](cfg).recipe(), cfg.data.views).views[0]
    side = cfg.data.image_size
    return {"transform_args": {"image_size": [side, side], "random_resize": {"min_scale": view.scale[0]}}}


def run_peer(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from fastssl.data import data_splits
    from fastssl.eval import build_evaluator
    from fastssl.models import build_backbone

    cfg = _resolved_config(args)
    images = Path(args.data) if Path(args.data).is_dir() else export_png_folder(args.data, out.parent / "png")
    request = {
        "out": str(out),
        "data": str(images),
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "epochs": args.peer_epochs,
        "batch_size": cfg.data.batch_size,
        "train_args": {**peer_defaults(args.method, cfg), **json.loads(args.peer_args)},
    }
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",
    }
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.run(
            [args.peer_python, "-m", PEER_RUNNER, json.dumps(request)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        ).returncode
    wall = time.perf_counter() - t0
    result_path = out / "peer_result.json"
    if rc != 0 or not result_path.is_file():
        tail = out.with_suffix(".log").read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"--peer {args.peer} exited with {rc}: {tail[0]} (log: {out.with_suffix('.log')})")
    peer = json.loads(result_path.read_text())
    backbone, _ = build_backbone(cfg.model.backbone, cfg.data.image_size)
    backbone.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    splits = data_splits(args.data)
    t_eval = time.perf_counter()
    evaluator = build_evaluator(
        cfg,
        splits.train,
        splits.test,
        torch.device("cpu"),
        resize=cfg.eval_side if args.data == "fashion-mnist" else None,
        progress=False,
    )
    backbone.eval()
    with torch.no_grad():
        knn = evaluator(backbone)["knn_top1"]
    steps, train_s = len(peer["step_ends_s"]), peer["train_s"]
    split = {
        "data": train_s - peer["step_s"],
        "step": peer["step_s"],
        "evaluation": time.perf_counter() - t_eval,
    }
    split["other"] = wall - train_s
    return {
        "tool": args.peer,
        "version": peer["version"],
        "method": "simclr",
        "backbone": cfg.model.backbone,
        "command_wall_s": wall,
        "steps": steps,
        "epochs": args.peer_epochs,
        "batch_size": cfg.data.batch_size,
        "images_per_second": steps * cfg.data.batch_size / train_s if train_s else None,
        "knn_top1": knn,
        "seconds": split,
        "train_args": request["train_args"],
    }


# ----------------------------------------------------------------------------- main


def _print_row(row: dict) -> None:
    knn = f"{row['knn_top1']:.2%}" if row.get("knn_top1") is not None else "—"
    split = " ".join(f"{k} {v:.0f}" for k, v in row["seconds"].items())
    print(
        f"| {row['tool']} | {row['backbone']} | {row['command_wall_s']:.1f} | {row['steps']} | "
        f"{row['images_per_second']:.0f} | {knn} | {split} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="simclr")
    parser.add_argument("--data", default="fashion-mnist")
    parser.add_argument("--budget-s", type=float, default=450.0, help="fastssl's wall-time budget (seconds)")
    parser.add_argument("--out", type=Path, default=Path("runs/time_to_accuracy"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file for the rows")
    parser.add_argument("--peer", choices=PEERS, help="also run this tool the same way")
    parser.add_argument(
        "--peer-python", help="the interpreter of the environment where the peer is installed"
    )
    parser.add_argument("--peer-epochs", type=int, default=4)
    parser.add_argument(
        "--peer-args",
        default="{}",
        help="JSON: keyword arguments of lightly_train.train over the defaults (transform_args with "
        "fastssl's crop size and scale)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides of the fastssl run")
    args = parser.parse_args(argv)
    if args.budget_s <= 0:
        parser.error(f"--budget-s: expected seconds > 0, got {args.budget_s}")
    if args.peer and not (args.peer_python and Path(args.peer_python).is_file()):
        parser.error(
            f"--peer {args.peer}: expected --peer-python, the path of the python of the environment "
            f"where {args.peer} is installed, got {args.peer_python!r}"
        )
    from fastssl.bench.harness import environment, write_rows

    env = environment()
    print(
        f"{env['device']} · torch {env['torch']} · git {env['git_sha']} · {env['date']} · "
        f"load {os.getloadavg()[0]:.1f}\n"
    )
    print("| tool | backbone | command s | steps | img/s | kNN top-1 | seconds by phase |")
    print("|---|---|---:|---:|---:|---:|---|", flush=True)
    rows = [run_fastssl(args, args.out / "fastssl")]
    _print_row(rows[-1])
    if args.peer:
        rows.append(run_peer(args, args.out / args.peer))
        _print_row(rows[-1])
        rows[-1]["images_per_second_ratio_fastssl"] = (
            rows[0]["images_per_second"] / rows[-1]["images_per_second"]
        )
    for row in rows:
        row["load_avg"] = os.getloadavg()[1]
    write_rows(args.results, rows, env)
    print(f"\nrows: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
