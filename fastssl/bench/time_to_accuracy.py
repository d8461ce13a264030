"""Time to accuracy: train a recipe as a user runs it, record what the minutes bought, and (with
--peer) run another tool the same way on the same data and network, in one command.

    python -m fastssl.bench.time_to_accuracy [--method M --data D] [--budget-s S]
        [--peer lightly-train --peer-python /path/to/its/venv/bin/python --peer-epochs 4] [key=value ...]

fastssl: with no --method, the demo itself (`fastssl train`: DEMO_METHOD's Fashion-MNIST preset,
fixed epochs, deterministic); with --method, `fastssl train --method M --data D`; with --budget-s,
for that wall-time budget (`--time-budget`). Run in a child process (this module's --child mode,
which only adds timers). Per tool, one JSON line in --results (default
benchmarks/results/time_to_accuracy.jsonl, `--append` adds to it): the command, its wall seconds,
steps, training seconds and images/s, kNN top-1 of the trained backbone at k=20 T=0.07 and at
k=200 T=0.1 (both tools scored by this module with the same evaluator and features), the kNN on
the fixed subsample every eval_every epochs (seconds since the command started), the random-init
baselines, and where the command's time went: data (waiting for each batch), forward (the
method's forward: networks and loss), backward (the rest of each step: backward and the step's
bookkeeping), optimizer (optimizer.step), evaluation (the tool's own kNN checks) and other
(start-up, loader set-up, checkpoints, export). On a GPU the timers synchronize the device at each
boundary, which the split needs.

--peer lightly-train: lightly-train's documented Python API (`lightly_train.train(out, data, model,
method, epochs, batch_size)`; a custom model goes through its wrapper interface, which its
command line does not offer) run by that tool's own interpreter (`--peer-python`, an environment
where it is installed: never a dependency of fastssl) on the same images exported as PNG files and
the same backbone module (fastssl.models.build_backbone, read from this checkout), with the
method nearest fastssl's and fastssl's views (fastssl.bench.peer_methods: `simclr` for SimCLR and
the demo, `dino` for DINO; --peer-args adds or replaces arguments), for --peer-epochs epochs (the
number whose training time matches fastssl's), with the same timers:
Lightning runs forward and backward inside optimizer.step's closure, so its optimizer time is
the step's end minus the moment the first layer's gradient is accumulated (the end of backward).
Its row carries images_per_second_ratio_fastssl: fastssl's training images/s over the peer's, both
measured in this one command; with --method simclr (or a SimCLR demo) that is the engine ratio on
the same algorithm, network, batch and views.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path("benchmarks") / "results" / "time_to_accuracy.jsonl"
PEER_RUNNER = "fastssl.bench.peer_lightly_train"  # run as a module: the folder holds queue.py, data.py


# ----------------------------------------------------------------------------- the timers (both tools)


class StepTimers:
    """Seconds in the timed modules' forwards and in optimizer.step, and when each step ended,
    through torch's global module and optimizer hooks (the engine is unchanged). `is_timed(module)`
    says which module's forward counts. `watch_backward_end(parameter)` (the network's first
    parameter, whose gradient backward accumulates last) also times the update alone: the step's
    end minus that moment, for a trainer that runs backward inside optimizer.step."""

    def __init__(self, is_timed):
        import torch
        from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
        from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

        self.torch, self.is_timed = torch, is_timed
        self.t0 = time.perf_counter()
        self.forward_s = self.optimizer_s = self.update_s = 0.0
        self.step_ends: list[float] = []  # seconds since t0 at the end of each optimizer step
        self.first_step_start: float | None = None
        self._started: dict[int, float] = {}
        self._backward_end: float | None = None
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

    def watch_backward_end(self, parameter) -> None:
        def ended(_):
            self._backward_end = self._now()

        self._handles.append(parameter.register_post_accumulate_grad_hook(ended))

    def _forward_start(self, module, args):
        if self.is_timed(module):
            self._started[id(module)] = self._now()

    def _forward_end(self, module, args, output):
        start = self._started.pop(id(module), None)
        if start is not None:
            self.forward_s += self._now() - start

    def _step_start(self, optimizer, args, kwargs):
        self._started[id(optimizer)] = now = self._now()
        self._backward_end = None
        if self.first_step_start is None:
            self.first_step_start = now - self.t0

    def _step_end(self, optimizer, args, kwargs):
        now = self._now()
        start = self._started.pop(id(optimizer), now)
        self.optimizer_s += now - start
        if self._backward_end is not None:
            self.update_s += now - max(self._backward_end, start)
        self.step_ends.append(now - self.t0)

    def result(self) -> dict:
        for handle in self._handles:
            handle.remove()
        return {
            "forward_s": self.forward_s,
            "optimizer_s": self.optimizer_s,
            "update_s": self.update_s,
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


# ----------------------------------------------------------------------------- scoring (both tools)


def _resolved_config(args: argparse.Namespace):
    """The fastssl run's configuration, as `fastssl train` resolves it (the demo's or the method's preset)."""
    from fastssl.engine import parse_overrides, resolve_config
    from fastssl.methods import DEMO_METHOD, METHODS, demo_preset

    cls = METHODS[args.method or DEMO_METHOD]
    overrides = parse_overrides(args.overrides) | {"source": args.data}
    preset = demo_preset() if args.method is None else cls.presets.get(args.data)
    return resolve_config(cls.config_class, None, overrides, preset=preset)


def score(cfg, data: str, encoder) -> dict:
    """kNN top-1 of a trained backbone on the test split (k=20 T=0.07 and k=200 T=0.1, one feature
    extraction; Fashion-MNIST's whole images at cfg.eval_side, as `fastssl train` evaluates) and
    the seconds it took."""
    import torch

    from fastssl.data import data_splits
    from fastssl.data.spec import FASHION_MNIST
    from fastssl.eval import build_evaluator

    t0 = time.perf_counter()
    splits = data_splits(data)
    resize = cfg.eval_side if data == FASHION_MNIST else None
    evaluate = build_evaluator(
        cfg, splits.train, splits.test, torch.device("cpu"), resize=resize, progress=False, wide_knn=True
    )
    encoder.eval()
    with torch.no_grad():
        result = evaluate(encoder)
    return {**result, "scoring_s": time.perf_counter() - t0}


# ----------------------------------------------------------------------------- fastssl run


def _rows(path: Path) -> list[dict]:
    return (
        [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    )


def run_fastssl(args: argparse.Namespace, out: Path) -> dict:
    from fastssl.runs import load_trained_method

    timers_path = out / "timers.json"
    argv = [] if args.method is None else ["--method", args.method, "--data", args.data]
    argv += [] if args.budget_s is None else ["--time-budget", str(args.budget_s)]
    argv += ["--out", str(out), "--overwrite", *args.overrides]
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
    monitor_s = summary.get("monitor_seconds", 0.0)
    split = {
        "data": data_s,
        "forward": timers["forward_s"],
        "backward": sum(step_s) - data_s - timers["forward_s"] - timers["optimizer_s"],
        "optimizer": timers["optimizer_s"],
        "evaluation": summary["total_seconds"] - summary["train_seconds"] + monitor_s,
    }
    split["other"] = wall - sum(split.values())
    method, _ = load_trained_method(out)
    scores = score(method.cfg, args.data, method.encoder())
    img_s = summary["images_per_second"]  # over the steps' own seconds (batch waits included)
    return {
        "tool": "fastssl",
        "command": shlex.join(["fastssl", "train", *argv]),
        "method": summary["method"],
        "backbone": summary["backbone"],
        "budget_s": args.budget_s,
        "command_wall_s": wall,
        "train_s": summary["steps"] * batch / img_s,
        "steps": summary["steps"],
        "epochs": summary["epochs"],
        "batch_size": batch,
        "images_per_second": img_s,
        "knn_top1": scores["knn_top1"],
        "knn_top1_k200": scores["knn_top1_k200"],
        "knn_top1_printed": summary.get("knn_top1"),
        "knn_top1_random_init": summary.get("knn_top1_random_init"),
        "knn_top1_subset_random_init": summary.get("knn_top1_subset_random_init"),
        "knn_curve": curve,
        "seconds": split,
        "scoring_s": scores["scoring_s"],
        "overrides": args.overrides,
    }


# ----------------------------------------------------------------------------- peer run


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


def peer_request(args: argparse.Namespace, cfg, images: Path, out: Path) -> dict:
    """What the peer runner trains: the peer's method nearest fastssl's (peer_methods), the timed
    modules of its step, the same backbone, image size and batch, and its arguments for fastssl's
    views with --peer-args over them."""
    from fastssl.bench.peer_methods import peer_method
    from fastssl.data import recipes
    from fastssl.methods import METHODS

    peer = peer_method(args.peer, cfg.method.name)
    views = recipes.with_view_overrides(METHODS[cfg.method.name](cfg).recipe(), cfg.data.views).views
    return {
        "out": str(out),
        "data": str(images),
        "method": peer.name,
        "forward_modules": list(peer.forward_modules),
        "backbone": cfg.model.backbone,
        "image_size": cfg.data.image_size,
        "epochs": args.peer_epochs,
        "batch_size": cfg.data.batch_size,
        "train_args": {**peer.defaults(cfg, views), **json.loads(args.peer_args)},
    }


def run_peer(args: argparse.Namespace, out: Path) -> dict:
    import torch

    from fastssl.models import build_backbone

    cfg = _resolved_config(args)
    images = Path(args.data) if Path(args.data).is_dir() else export_png_folder(args.data, out.parent / "png")
    request = peer_request(args, cfg, images, out)
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
        "LIGHTLY_TRAIN_EVENTS_DISABLED": "1",
    }
    command = [args.peer_python, "-m", PEER_RUNNER, json.dumps(request)]
    t0 = time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        rc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    result_path = out / "peer_result.json"
    if rc != 0 or not result_path.is_file():
        tail = out.with_suffix(".log").read_text().strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"--peer {args.peer} exited with {rc}: {tail[0]} (log: {out.with_suffix('.log')})")
    peer = json.loads(result_path.read_text())
    backbone, _ = build_backbone(cfg.model.backbone, cfg.data.image_size)
    backbone.load_state_dict(torch.load(out / "backbone.pt", weights_only=True), strict=True)
    scores = score(cfg, args.data, backbone)
    steps, train_s = len(peer["step_ends_s"]), peer["train_s"]
    split = {
        "data": train_s - peer["step_s"],
        "forward": peer["forward_s"],
        "backward": peer["step_s"] - peer["forward_s"] - peer["update_s"],
        "optimizer": peer["update_s"],
        "evaluation": 0.0,  # the tool evaluates nothing while it trains
    }
    split["other"] = wall - sum(split.values())
    return {
        "tool": args.peer,
        "version": peer["version"],
        "command": shlex.join(command),
        "method": request["method"],
        "backbone": cfg.model.backbone,
        "command_wall_s": wall,
        "train_s": train_s,
        "steps": steps,
        "epochs": args.peer_epochs,
        "batch_size": cfg.data.batch_size,
        "images_per_second": steps * cfg.data.batch_size / train_s if train_s else None,
        "knn_top1": scores["knn_top1"],
        "knn_top1_k200": scores["knn_top1_k200"],
        "seconds": split,
        "scoring_s": scores["scoring_s"],
        "train_args": request["train_args"],
    }


# ----------------------------------------------------------------------------- main

HEADER = (
    "| tool | method | backbone | command s | train s | steps | img/s | kNN k=20 T=0.07 | kNN k=200 T=0.1 | "
    "seconds: data / forward / backward / optimizer / evaluation / other |"
)


def _print_row(row: dict) -> None:
    split = " / ".join(
        f"{row['seconds'][k]:.0f}"
        for k in ("data", "forward", "backward", "optimizer", "evaluation", "other")
    )
    print(
        f"| {row['tool']} | {row['method']} | {row['backbone']} | {row['command_wall_s']:.1f} | "
        f"{row['train_s']:.1f} | {row['steps']} | {row['images_per_second']:.0f} | {row['knn_top1']:.2%} | "
        f"{row['knn_top1_k200']:.2%} | {split} |",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:] if argv[2:3] == ["--"] else argv[2:])
    from fastssl.bench.peer_methods import PEER_METHODS, peer_method
    from fastssl.data.spec import FASHION_MNIST  # here: the peer's interpreter imports this module too

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--method", help="fastssl's method (default: the demo, `fastssl train` with no --method)"
    )
    parser.add_argument(
        "--data", default=FASHION_MNIST, help="with --method: its data (the demo's is fashion-mnist)"
    )
    parser.add_argument(
        "--budget-s", type=float, help="fastssl's wall-time budget in seconds (default: fixed epochs)"
    )
    parser.add_argument("--out", type=Path, default=Path("runs/time_to_accuracy"))
    parser.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file for the rows")
    parser.add_argument(
        "--append", action="store_true", help="add the rows to --results instead of replacing it"
    )
    parser.add_argument("--trial", help="a name the rows carry (a recipe search's candidate)")
    parser.add_argument("--peer", choices=sorted(PEER_METHODS), help="also run this tool the same way")
    parser.add_argument(
        "--peer-python", help="the interpreter of the environment where the peer is installed"
    )
    parser.add_argument("--peer-epochs", type=int, default=4)
    parser.add_argument(
        "--peer-args",
        default="{}",
        help="JSON: keyword arguments of lightly_train.train over "
        "the defaults (transform_args with fastssl's crop sizes, scales and counts)",
    )
    parser.add_argument("overrides", nargs="*", help="key=value config overrides of the fastssl run")
    args = parser.parse_args(argv)
    if args.budget_s is not None and args.budget_s <= 0:
        parser.error(f"--budget-s: expected seconds > 0, got {args.budget_s}")
    if args.method is None and args.data != FASHION_MNIST:
        parser.error(
            f"--data {args.data}: the demo trains on {FASHION_MNIST}; name a --method for other data"
        )
    if args.peer and not (args.peer_python and Path(args.peer_python).is_file()):
        parser.error(
            f"--peer {args.peer}: expected --peer-python, the path of the python of the environment "
            f"where {args.peer} is installed, got {args.peer_python!r}"
        )
    if args.peer:
        from fastssl.methods import DEMO_METHOD

        try:
            peer_method(args.peer, args.method or DEMO_METHOD)
        except ValueError as exc:
            parser.error(str(exc))
    from fastssl.bench.harness import environment, write_rows

    env = environment()
    print(
        f"{env['device']} · torch {env['torch']} · git {env['git_sha']} · {env['date']} · "
        f"load {os.getloadavg()[0]:.1f}\n"
    )
    print(HEADER)
    print("|" + "---|" * HEADER.count(" | ") + "---|", flush=True)
    rows = [run_fastssl(args, args.out / "fastssl")]
    _print_row(rows[-1])
    if args.peer:
        rows.append(run_peer(args, args.out / args.peer))
        _print_row(rows[-1])
        ratio = rows[0]["images_per_second"] / rows[-1]["images_per_second"]
        rows[-1]["images_per_second_ratio_fastssl"] = ratio
        print(
            f"\nfastssl {rows[0]['method']} / {args.peer} {rows[-1]['method']} images/s: {ratio:.2f}x; "
            f"kNN k=20 T=0.07: "
            f"{100 * (rows[0]['knn_top1'] - rows[-1]['knn_top1']):+.2f} points"
        )
    for row in rows:
        row["load_avg"] = os.getloadavg()[1]
        if args.trial:
            row["trial"] = args.trial
    write_rows(args.results, rows, env, append=args.append)
    print(f"\nrows: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
