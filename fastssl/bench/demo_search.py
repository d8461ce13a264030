"""MoCo v3's Fashion-MNIST recipe search: train each candidate as the demo's command would, for a fixed
number of epochs, and print one table row per candidate (kNN top-1 k=20 T=0.07 on the test
split, random-init kNN, optional linear probe, steps, speed, wall time, machine load).

    python -m fastssl.bench.demo_search                    # every candidate, its own epochs
    python -m fastssl.bench.demo_search --only base pool2 --epochs 2 --threads 1 --results DIR
    python -m fastssl.bench.demo_search --readouts RUN/last.pt   # kNN of poolings of a CIFAR ResNet

Each candidate is SEARCH_METHOD's Fashion-MNIST preset with the demo's settings (DEMO_SETTINGS) and
some of its keys replaced, run in a fresh process so nothing carries over. Fixed epochs and a fixed
seed make the losses and kNN independent of the machine's load; only the times depend on it, so
on a shared machine read them as a record of the run, not as speeds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from fastssl.bench.harness import environment, write_rows

SEARCH_METHOD = "mocov3"

# name -> (what changes against the row it is compared with, preset fields replaced). "preset" keys are
# config keys of the preset, "views" ViewSpec fields of its `views`, "method" the method.
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
    "pool3": ("base, features = last stage pooled to 3x3 (resnet8_pool3, 576-d)", {
        "method": "mocov3",
        "preset": {"backbone": "resnet8_pool3", "optimizer": "lars", "base_lr": 1.0, "weight_decay": 1e-5,
                   "warmup_epochs": 0.5, "mlp_hidden_dim": 512, "moco_dim": 128, "batch_size": 128},
        "views": {"scale": (0.25, 1.0), "blur_p": 0.0, "grayscale_p": 0.0}}),
    "pool3_s05": ("pool3, milder crops: scale (0.5, 1)", {"views": {"scale": (0.5, 1.0)}}),
    "pool3_b64": ("pool3, batch 64 (twice the steps for the same images; LR scales with the batch)",
                  {"preset": {"batch_size": 64}}),
    "pool3_s05_24px": ("pool3_s05, training crops of 24 px (26.5% fewer pixels than 28), kNN on "
                       "whole 28-px images (eval_size 28)",
                       {"preset": {"image_size": 24, "eval_size": 28}, "views": {"scale": (0.5, 1.0)}}),
    "pool3_s05_nosol": ("pool3_s05, no solarization (it inverts the bright garment, p 0.2 on view 2)",
                        {"views": {"scale": (0.5, 1.0), "solarize_p": 0.0}}),
    "24px_sol2": ("pool3_s05_24px, solarization p 0.2 on both views (view 1 had none)",
                  {"preset": {"image_size": 24, "eval_size": 28},
                   "views": {"scale": (0.5, 1.0), "solarize_p": 0.2}}),
    "24px_jit8": ("pool3_s05_24px, brightness and contrast jitter 0.8 (was 0.4)",
                  {"preset": {"image_size": 24, "eval_size": 28},
                   "views": {"scale": (0.5, 1.0), "jitter": (0.8, 0.8, 0.2, 0.1)}}),
}


def _child(name: str, out: str, epochs: int, linear: bool) -> int:
    """Run one candidate in this process: patch SEARCH_METHOD's preset, then `fastssl train`."""
    from fastssl.bench.harness import run_cli
    from fastssl.data.spec import FASHION_MNIST
    from fastssl.methods import DEMO_SETTINGS, METHODS

    spec = CANDIDATES[name][1]
    method = spec.get("method", SEARCH_METHOD)
    cls = METHODS[method]
    preset = dict(cls.presets.get(FASHION_MNIST, {})) | spec.get("preset", {})
    preset["views"] = dict(preset.get("views", {})) | spec.get("views", {})
    cls.presets = {**cls.presets, FASHION_MNIST: preset}
    settings = [f"{key}={value}" for key, value in DEMO_SETTINGS.items()]
    argv = ["train", "--method", method, "--data", FASHION_MNIST, "--out", out, f"epochs={epochs}", *settings]
    argv += ["--linear-probe"] if linear else []
    return run_cli(argv)


def _readouts(checkpoint: str) -> None:
    """kNN top-1 of several read-outs of a CIFAR-ResNet run's last stage (global average, max,
    average to 2x2 / 3x3 grids, with stage 2 appended), trained weights and the same seed's
    random init: what the pooling of `encoder()`'s output is worth, without retraining."""
    import torch
    import torch.nn.functional as F

    from fastssl.data import fashion_mnist
    from fastssl.data.recipes import IMAGENET_MEAN, IMAGENET_STD
    from fastssl.engine import load_checkpoint
    from fastssl.engine.config import load_config
    from fastssl.eval import knn_top1
    from fastssl.methods import METHODS

    state = load_checkpoint(checkpoint)
    cfg = load_config(METHODS[state["method"]].config_class, state["config"])
    torch.manual_seed(cfg.run.seed)  # as `fastssl train` does before building the method: its random init
    method = METHODS[state["method"]](cfg)
    random_init = {k: v.clone() for k, v in method.encoder().state_dict().items()}
    method.load_state_dict(state["model"])
    trained = method.encoder().eval()
    mean, std = (torch.tensor(c).view(1, 3, 1, 1) for c in (IMAGENET_MEAN, IMAGENET_STD))

    @torch.no_grad()
    def features(split: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        src = fashion_mnist(split)
        out: dict[str, list[torch.Tensor]] = {}
        for i in range(0, len(src), 1000):
            x = torch.from_numpy(src.images[i:i + 1000].copy()).float().div(255)
            x = x[:, None].expand(-1, 3, -1, -1)
            x = ((x - mean) / std).contiguous(memory_format=torch.channels_last)
            s2 = trained.stages[1](trained.stages[0](trained.stem(x)))
            s3 = trained.stages[2](s2)
            grid2 = F.adaptive_avg_pool2d(s3, 2).flatten(1)
            for name, f in (("avg", s3.mean((2, 3))), ("max", s3.amax((2, 3))), ("avg 2x2", grid2),
                            ("avg 3x3", F.adaptive_avg_pool2d(s3, 3).flatten(1)),
                            ("avg + stage-2 avg", torch.cat([s3.mean((2, 3)), s2.mean((2, 3))], 1)),
                            ("avg 2x2 + stage-2 avg 2x2",
                             torch.cat([grid2, F.adaptive_avg_pool2d(s2, 2).flatten(1)], 1))):
                out.setdefault(name, []).append(f)
        return {k: torch.cat(v) for k, v in out.items()}, torch.from_numpy(src.labels)

    print(f"{_versions()} · {checkpoint} ({cfg.model.backbone}, step {state['step']})\n")
    rows = {}
    for weights in ("trained", "random init"):
        if weights == "random init":
            trained.load_state_dict(random_init)
        (train, y_train), (test, y_test) = features("train"), features("test")
        rows[weights] = {k: knn_top1(train[k], y_train, test[k], y_test) for k in train}
    print("| read-out of the last stage | dim | kNN trained | kNN random init | margin |")
    print("|---|---:|---:|---:|---:|")
    for k in rows["trained"]:
        a, b = rows["trained"][k], rows["random init"][k]
        print(f"| {k} | {train[k].shape[1]} | {a:.2%} | {b:.2%} | {100 * (a - b):+.2f} |")


def _versions() -> str:
    env = environment()
    return f"{env['device']} · torch {env['torch']} · git {env['git_sha']} · {env['date']}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="*", help=f"candidates (default: all): {', '.join(CANDIDATES)}")
    parser.add_argument("--epochs", type=int, default=2, help="training epochs of every candidate")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    parser.add_argument("--linear-probe", action="store_true")
    parser.add_argument("--out", default="runs/demo_search")
    parser.add_argument("--readouts", metavar="CHECKPOINT", help="only print read-out kNNs of a run")
    parser.add_argument("--results", type=Path, help="folder for demo_search.jsonl (the rows as data)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.readouts:
        _readouts(args.readouts)
        return 0
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
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    failed, rows = 0, []
    for name in names:
        out = Path(args.out, f"{name}_e{args.epochs}")
        cmd = [sys.executable, "-m", "fastssl.bench.demo_search", "--child", name, "--out", str(out),
               "--epochs", str(args.epochs)]
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
        rows.append({"candidate": name, "change": CANDIDATES[name][0], "epochs": args.epochs,
                     "steps": s["steps"], "knn_top1": s["knn_top1"], "knn_top1_random_init": rand,
                     "linear_top1": s.get("linear_top1"), "images_per_second": s["images_per_second"],
                     "threads": args.threads, "command_wall_s": wall, "load_avg": load})
    if args.results:
        write_rows(args.results / "demo_search.jsonl", rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
