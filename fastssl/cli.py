"""`fastssl train | eval | bench`.

    fastssl train [--method M] [--data fashion-mnist|PATH] [--backbone NAME] [--epochs E]
                  [--batch-size B] [--out DIR] [--config YAML] [--resume auto|PATH] [key=value ...]
    fastssl eval --checkpoint RUN/last.pt [--data fashion-mnist|PATH]
    fastssl bench [--quick] [NAME ...]

`fastssl train` with no --method and no --data runs the demo: DEMO_METHOD with DEMO_PRESET on
Fashion-MNIST. Multi-GPU / multi-node: launch the same command with torchrun, e.g.
`torchrun --nproc-per-node 8 -m fastssl.cli train --method mocov3 --data /imagenet/train`."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

_T0 = time.perf_counter()

# The demo (`make demo`): beats raw-pixel kNN (84.6%) and its random init on Fashion-MNIST
# in <= 15 minutes on a 2-core CPU. Chosen by timed runs; see README.
DEMO_METHOD = "mocov3"
# resnet8_pool3: the features (what kNN sees) are the last 7x7 stage pooled to 3x3, not to 1x1;
# 6 epochs = 2808 steps, about 9.5-9.8 idle minutes for the whole command (benchmarks/RESULTS.md).
DEMO_PRESET: dict[str, Any] = {
    "backbone": "resnet8_pool3", "image_size": 28, "epochs": 6, "batch_size": 128, "optimizer": "lars",
    "base_lr": 1.0, "weight_decay": 1e-5, "warmup_epochs": 0.5, "mlp_hidden_dim": 512, "moco_dim": 128,
    "sync_bn": False, "channels_last": True, "out": "runs/demo",
}
# The demo trains for the epochs that fit this budget (at most DEMO_PRESET's); the rest of the
# 15 minutes is start-up and loading.
DEMO_TIME_BUDGET_S = 14 * 60
# ImageNet's views are too harsh for 28x28 grayscale clothes: milder crops, no blur.
DEMO_VIEW_OVERRIDES: dict[str, Any] = {"scale": (0.25, 1.0), "blur_p": 0.0, "grayscale_p": 0.0}
FASHION_MNIST = "fashion-mnist"
RAW_PIXEL_KNN_FASHION_MNIST = 0.8459  # NOTES.md: weighted kNN on raw pixels, test split


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _methods() -> dict:
    from fastssl.methods import METHODS

    return METHODS


def _resolve_data(data: str) -> str:
    if data == FASHION_MNIST or Path(data).is_dir():
        return data
    raise ValueError(f"--data: expected {FASHION_MNIST!r} or an existing image folder, got {data!r} "
                     f"(no such directory)")


def _sources(data: str, split: str):
    """The source of a split: Fashion-MNIST train/test, or an image folder (pretraining on
    PATH/train when present, else PATH; evaluation on PATH/train and PATH/val, None if absent)."""
    from fastssl.data import ImageFolderSource, fashion_mnist

    if data == FASHION_MNIST:
        return fashion_mnist("test" if split == "test" else "train")
    root = Path(data)
    if split == "pretrain":
        return ImageFolderSource(root / "train" if (root / "train").is_dir() else root)
    sub = root / ("train" if split == "train" else "val")
    return ImageFolderSource(sub) if sub.is_dir() else None


def _data_options(cfg, device: torch.device) -> dict[str, Any]:
    backend = cfg.data_backend
    if backend == "auto":
        backend = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torchvision"
    data_device = cfg.data_device
    if data_device == "auto":
        data_device = "gpu" if device.type == "cuda" else "cpu"
    return {"backend": backend, "device": data_device, "num_threads": cfg.num_threads}


def build_evaluator(cfg, data: str, device: torch.device, linear: bool = False):
    """Callable(encoder) -> {"knn_top1": ..., ["linear_top1": ...]} on the data's labelled
    train (memory bank) and test splits, or None when the data has no such splits."""
    from fastssl.data import build_loader, recipes
    from fastssl.eval import extract_features, knn_top1, linear_probe

    train_src, test_src = _sources(data, "train"), _sources(data, "test")
    if train_src is None or test_src is None:
        _log(f"eval: {data} has no train/ and val/ folders: no kNN evaluation")
        return None
    # Fashion-MNIST is 28x28: resize to the model's size and keep the whole image (no crop margin).
    resize = cfg.image_size if data == FASHION_MNIST else None
    recipe = recipes.eval(size=cfg.image_size, resize=resize)
    options = _data_options(cfg, device)

    def evaluate(encoder) -> dict[str, float]:
        feats = {}
        for name, src in (("train", train_src), ("test", test_src)):
            loader = build_loader(src, recipe, batch_size=512, seed=cfg.seed, drop_last=False, shuffle=False,
                                  **options)
            feats[name] = extract_features(encoder, loader, device, cfg.channels_last)
        k = min(20, len(feats["train"][1]))  # DINO's k = 20; fewer only for a memory bank that small
        result = {"knn_top1": knn_top1(*feats["train"], *feats["test"], k=k, temperature=0.07)}
        if linear:
            result |= linear_probe(*feats["train"], *feats["test"])
        return result

    return evaluate


def _build_method(name: str, cfg):
    method = _methods()[name](cfg)
    return method


def cmd_train(args: argparse.Namespace) -> int:
    from fastssl.data import build_loader
    from fastssl.engine import Trainer, init_distributed, parse_overrides, resolve_config

    methods = _methods()
    demo = args.method is None and args.data is None
    name = args.method or DEMO_METHOD
    if name not in methods:
        raise ValueError(f"--method: expected one of {sorted(methods)}, got {name!r}")
    data = _resolve_data(args.data or FASHION_MNIST)
    overrides = parse_overrides(args.overrides)
    for key in ("backbone", "epochs", "batch_size", "out", "fused", "loss", "sampling"):
        if getattr(args, key) is not None:
            overrides[key] = getattr(args, key)
    overrides["data"] = data
    cfg = resolve_config(methods[name].config_class, args.config, overrides,
                         preset=DEMO_PRESET if demo else methods[name].presets.get(data))
    if demo:
        _log(f"demo: {name} {cfg.backbone} on Fashion-MNIST at {cfg.image_size}px, {cfg.epochs} epochs")
    elif data in methods[name].presets:
        _log(f"{name}: the {data} preset ({cfg.backbone} at {cfg.image_size}px), then the overrides")
    torch.manual_seed(cfg.seed)
    rank, world, device = init_distributed()
    if cfg.batch_size % world:
        raise ValueError(f"batch_size: expected a multiple of the world size {world}, got {cfg.batch_size}")
    method = _build_method(name, cfg)
    recipe = method.recipe()
    if demo:
        recipe = dataclasses.replace(recipe, views=[dataclasses.replace(v, **DEMO_VIEW_OVERRIDES)
                                                    for v in recipe.views])
    options = _data_options(cfg, device)
    source = _sources(data, "pretrain")
    loader = build_loader(source, recipe, batch_size=cfg.batch_size // world, shard_id=rank, num_shards=world,
                          seed=cfg.seed, drop_last=True,
                          sampler=method.build_sampler(source, rank=rank, world_size=world), **options)
    _log(f"data: {data}, {options['backend']} on {options['device']}, {len(loader)} steps/epoch")
    evaluator = build_evaluator(cfg, data, device, linear=args.linear_probe) if cfg.eval_knn else None
    t0 = time.perf_counter()
    budget = args.time_budget if args.time_budget is not None else (DEMO_TIME_BUDGET_S if demo else None)
    if budget is not None:
        budget -= time.perf_counter() - _T0  # the budget counts from the command's start
    trainer = Trainer(method, loader, evaluator=evaluator, resume=args.resume, tensorboard=args.tensorboard,
                      time_budget_s=budget)
    summary = trainer.fit()
    if rank == 0:
        summary["total_seconds"] = time.perf_counter() - t0
        Path(cfg.out, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary, data)
    return 0


def _print_summary(summary: dict, data: str) -> None:
    speed = summary["images_per_second"]  # None when no step ran (max_steps=0, a finished run resumed)
    lines = [f"{summary['method']} {summary['backbone']}: {summary['steps']} steps, "
             f"{'no step timed' if speed is None else f'{speed:.0f} img/s'} on {summary['device']}"]
    if "knn_top1" in summary:
        lines.append(f"kNN top-1 (k=20, T=0.07): pretrained {summary['knn_top1']:.2%}, "
                     f"random init {summary.get('knn_top1_random_init', float('nan')):.2%}"
                     + (f", raw pixels {RAW_PIXEL_KNN_FASHION_MNIST:.2%}" if data == FASHION_MNIST else ""))
    if "linear_top1" in summary:
        lines.append(f"linear probe top-1: {summary['linear_top1']:.2%}")
    print("\n".join(lines), flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from fastssl.engine import load_checkpoint, resolve_config

    state = load_checkpoint(args.checkpoint)
    name = state["method"]
    if name not in _methods():
        raise ValueError(f"--checkpoint: written by method {name!r}, which is not one of "
                         f"{sorted(_methods())}")
    cfg = resolve_config(_methods()[name].config_class, None, state["config"])
    data = _resolve_data(args.data or cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = _build_method(name, cfg)
    method.load_state_dict(state["model"])
    method.to(device).eval()
    evaluator = build_evaluator(cfg, data, device, linear=True)
    if evaluator is None:
        raise ValueError(f"--data: {data!r} has no labelled train/ and val/ splits to evaluate on")
    with torch.no_grad():
        result = evaluator(method.encoder())
    print(f"{name} {cfg.backbone} step {state['step']}: kNN top-1 {result['knn_top1']:.2%}, "
          f"linear probe top-1 {result['linear_top1']:.2%}", flush=True)
    return 0


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    root = benchmarks_dir()
    scripts = sorted(root.glob("bench_*.py"))
    if not scripts:
        raise ValueError(f"bench: no benchmarks/bench_*.py next to the package (looked in {root})")
    if args.names:
        known = {s.stem.removeprefix("bench_"): s for s in scripts}
        unknown = [n for n in args.names if n not in known]
        if unknown:
            raise ValueError(f"bench: expected names among {sorted(known)}, got {unknown}")
        scripts = [known[n] for n in args.names]
    failed = []
    for script in scripts:
        _log(f"== {script.name}")
        cmd = [sys.executable, str(script)] + (["--quick"] if args.quick else [])
        if subprocess.run(cmd, cwd=root.parent).returncode != 0:
            failed.append(script.name)
    if failed:
        _log(f"bench: failed: {', '.join(failed)}")
        return 1
    return 0


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes", "on"):
        return True
    if text.lower() in ("false", "0", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastssl", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="pretrain (no --method/--data: the Fashion-MNIST demo)")
    train.add_argument("--method", help="mocov2, mocov3, rotnet, dino, mae (default: the demo's)")
    train.add_argument("--data", help=f"{FASHION_MNIST!r} or an image folder (default: {FASHION_MNIST})")
    train.add_argument("--backbone")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int, help="global batch size")
    train.add_argument("--out", help="run directory")
    train.add_argument("--fused", type=_bool, help="false: every fused op runs its *_ref")
    train.add_argument("--loss", help="method weak: softmax (1/k targets) or sigmoid (per-label BCE)")
    train.add_argument("--sampling", help="method weak: natural, uniform, sqrt or inverse_sqrt")
    train.add_argument("--config", help="YAML file of key: value (below key=value overrides)")
    train.add_argument("--resume", help="'auto' (continue OUT/last.pt when present) or a checkpoint path")
    train.add_argument("--time-budget", dest="time_budget", type=float, metavar="SECONDS",
                       help="shorten the run to what fits (evaluations included); demo: 840")
    train.add_argument("--tensorboard", action="store_true")
    train.add_argument("--linear-probe", dest="linear_probe", action="store_true",
                       help="also fit a linear probe on frozen features at the end")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    ev = sub.add_parser("eval", help="kNN and linear probe of a checkpoint's frozen backbone")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", help="default: the data the checkpoint was trained on")
    bench = sub.add_parser("bench", help="run benchmarks/bench_*.py")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("names", nargs="*", help="e.g. info_nce train (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "bench": cmd_bench}[args.command]
    try:
        return command(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"fastssl {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from fastssl.engine import NonFiniteLossError

        if isinstance(e, NonFiniteLossError):
            print(f"fastssl {args.command}: stopped: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
