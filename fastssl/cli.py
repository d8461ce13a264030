"""`fastssl train | eval | viz | bench | shards | vocab`.

    fastssl train [--method M] [--data fashion-mnist|PATH] [--backbone NAME] [--epochs E]
                  [--batch-size B] [--out DIR] [--config YAML] [--resume auto|PATH] [key=value ...]
    fastssl eval --checkpoint RUN/last.pt [--data fashion-mnist|PATH]
    fastssl bench [--quick] [NAME ...]
    fastssl viz RUN [--out DIR] [--data SPEC]
    fastssl bench --model [--json FILE]
    fastssl shards SRC OUT [--shard-size N] [--split train|test] [--labels FILE]
    fastssl vocab SHARDS --top K [--out vocab.json]

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
# on a 2-core CPU. Fixed work (epochs / max_steps, no time budget), so a busy machine takes
# longer but prints the same numbers. Chosen by timed runs; see README.
DEMO_METHOD = "mocov3"
DEMO_PRESET: dict[str, Any] = {
    "backbone": "resnet8", "image_size": 28, "epochs": 10, "batch_size": 128, "optimizer": "lars",
    "base_lr": 1.0, "weight_decay": 1e-5, "warmup_epochs": 0.5, "mlp_hidden_dim": 512, "moco_dim": 128,
    "sync_bn": False, "channels_last": True, "out": "runs/demo",
}
# Same seed, same machine -> the same losses and kNN (README: what can differ across machines).
DEMO_PRESET["deterministic"] = True
# ImageNet's views are too harsh for 28x28 grayscale clothes: milder crops, no blur.
DEMO_VIEW_OVERRIDES: dict[str, Any] = {"scale": (0.25, 1.0), "blur_p": 0.0, "grayscale_p": 0.0}
FASHION_MNIST = "fashion-mnist"  # the spec fastssl.data.spec reads as Fashion-MNIST
# kNN while training (eval_every): a fixed subsample of train (memory bank) and test images,
# a twelfth of the 70,000 images the final Fashion-MNIST evaluation reads.
MONITOR_TRAIN_IMAGES, MONITOR_TEST_IMAGES = 5_000, 1_000
RAW_PIXEL_KNN_FASHION_MNIST = 0.8459  # NOTES.md: weighted kNN on raw pixels, test split


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _methods() -> dict:
    from fastssl.methods import METHODS

    return METHODS


def _data_options(cfg, device: torch.device) -> dict[str, Any]:
    backend = cfg.data_backend
    if backend == "auto":
        backend = "dali" if importlib.util.find_spec("nvidia.dali") is not None else "torchvision"
    data_device = cfg.data_device
    if data_device == "auto":
        data_device = "gpu" if device.type == "cuda" else "cpu"
    return {"backend": backend, "device": data_device, "num_threads": cfg.num_threads,
            "max_skipped_fraction": cfg.max_skipped_fraction}


def _evaluator(cfg, data: str, device: torch.device, splits=None, **options):
    """fastssl.eval.build_evaluator on the labelled train and test splits of the data spec `data`
    (`splits`: its fastssl.data.DataSplits when already read), or None (logged) when it has none."""
    from fastssl.data import data_splits
    from fastssl.eval import build_evaluator

    splits = splits or data_splits(data)
    train_src, test_src = splits.train, splits.test
    if train_src is None or test_src is None:
        _log(f"eval: {'; '.join(splits.notes) or 'no labelled splits'}")
        return None
    # Fashion-MNIST is 28x28: resize to the model's size and keep the whole image (no crop margin).
    resize = cfg.image_size if data == FASHION_MNIST else None
    return build_evaluator(cfg, train_src, test_src, device, resize=resize, **options)


def _build_method(name: str, cfg):
    method = _methods()[name](cfg)
    return method


def cmd_train(args: argparse.Namespace) -> int:
    from fastssl.data import build_loader, check_data_spec, data_splits
    from fastssl.engine import Trainer, init_distributed, parse_overrides, resolve_config

    methods = _methods()
    demo = args.method is None and args.data is None
    name = args.method or DEMO_METHOD
    if name not in methods:
        raise ValueError(f"--method: expected one of {sorted(methods)}, got {name!r}")
    data = check_data_spec(args.data or FASHION_MNIST)
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
    splits = data_splits(data)
    for note in splits.notes:
        _log(f"data: {note}")
    small = splits.is_small() if data not in methods[name].presets else None
    if small is not None and rank == 0:
        _log(_small_data_hint(name, methods[name], cfg, data, small))
    source = splits.pretrain
    loader = build_loader(source, recipe, batch_size=cfg.batch_size // world, shard_id=rank, num_shards=world,
                          seed=cfg.seed, drop_last=True,
                          sampler=method.build_sampler(source, rank=rank, world_size=world), **options)
    _log(f"data: {data}, {options['backend']} on {options['device']}, {len(loader)} steps/epoch")
    evaluator = _evaluator(cfg, data, device, splits, linear=args.linear_probe) if cfg.eval_knn else None
    monitor = None
    if evaluator is not None and cfg.eval_every:
        monitor = _evaluator(cfg, data, device, splits, max_train=MONITOR_TRAIN_IMAGES,
                             max_test=MONITOR_TEST_IMAGES, progress=False)
    t0 = time.perf_counter()
    budget = args.time_budget
    if budget is not None:
        budget -= time.perf_counter() - _T0  # the budget counts from the command's start
    trainer = Trainer(method, loader, evaluator=evaluator, resume=args.resume, tensorboard=args.tensorboard,
                      time_budget_s=budget, monitor=monitor)
    summary = trainer.fit()
    if rank == 0:
        summary["total_seconds"] = time.perf_counter() - t0
        Path(cfg.out, "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        _print_summary(summary, data)
    return 0


def _small_data_hint(name: str, method, cfg, data: str, small: str) -> str:
    preset = method.presets.get(FASHION_MNIST, {})
    keys = " ".join(f"{k}={v}" for k, v in preset.items() if k in ("backbone", "image_size", "batch_size",
                                                                       "queue_size", "epochs"))
    return (f"warning: {data} is small ({small}; < 50,000 images or < 64 px): {name}'s defaults "
            f"({cfg.backbone} at {cfg.image_size} px, batch {cfg.batch_size}) are sized for ImageNet. "
            f"Start from the small-image preset, {name}'s {FASHION_MNIST!r} preset: {keys}")


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
    from fastssl.data import check_data_spec
    from fastssl.engine import load_checkpoint, resolve_config

    state = load_checkpoint(args.checkpoint)
    name = state["method"]
    if name not in _methods():
        raise ValueError(f"--checkpoint: written by method {name!r}, which is not one of "
                         f"{sorted(_methods())}")
    cfg = resolve_config(_methods()[name].config_class, None, state["config"])
    data = check_data_spec(args.data or cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = _build_method(name, cfg)
    method.load_state_dict(state["model"])
    method.to(device).eval()
    evaluator = _evaluator(cfg, data, device, linear=True)
    if evaluator is None:
        raise ValueError(f"--data: {data!r} has no labelled train/ and val/ splits to evaluate on")
    with torch.no_grad():
        result = evaluator(method.encoder())
    print(f"{name} {cfg.backbone} step {state['step']}: kNN top-1 {result['knn_top1']:.2%}, "
          f"linear probe top-1 {result['linear_top1']:.2%}", flush=True)
    return 0


def cmd_shards(args: argparse.Namespace) -> int:
    from fastssl.data.shards import shard_dataset

    manifest = shard_dataset(args.src, args.out, shard_size=args.shard_size, split=args.split,
                             labels=args.labels)
    print(f"{args.out}: {manifest['total']} samples in {len(manifest['shards'])} shard(s), "
          f"{len(manifest['class_names'])} classes, {len(manifest['tag_vocabulary'])} tags", flush=True)
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from fastssl.data.shards import ShardSource, vocabulary

    top = vocabulary(ShardSource(args.shards), args.top)
    if args.out:
        tags = [t for t, _ in top]
        text = (json.dumps({"tags": tags, "counts": [c for _, c in top]}, indent=1) + "\n"
                if args.out.endswith(".json") else "".join(t + "\n" for t in tags))
        Path(args.out).write_text(text)
    print("\n".join(f"{count}\t#{tag}" for tag, count in top[:20]), flush=True)
    _log(f"vocab: {len(top)} hashtags" + (f" written to {args.out}" if args.out else ""))
    return 0


def cmd_viz(args: argparse.Namespace) -> int:
    from fastssl.data import check_data_spec, data_splits
    from fastssl.engine import load_checkpoint, resolve_config

    run = Path(args.run)
    checkpoint = run / "last.pt" if run.is_dir() else run
    if not checkpoint.is_file():
        raise ValueError(f"RUN: expected a run directory holding last.pt, or a checkpoint file, "
                         f"got {args.run!r}")
    try:
        from fastssl.viz.figures import class_names, render_run
    except ImportError as e:
        raise ValueError(f"viz: needs {e.name}, which is not installed: pip install 'fastssl[viz]'") from e
    state = load_checkpoint(checkpoint)
    name = state["method"]
    if name not in _methods():
        raise ValueError(f"RUN: checkpoint written by method {name!r}, which is not one of "
                         f"{sorted(_methods())}")
    cfg = resolve_config(_methods()[name].config_class, None, state["config"])
    data = check_data_spec(args.data or cfg.data)
    splits = data_splits(data)
    train_src, test_src = splits.train, splits.test
    if train_src is None or test_src is None:
        raise ValueError(f"--data: {data!r} has no labelled train/ and val/ splits to draw features from")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method = _build_method(name, cfg)
    method.load_state_dict(state["model"])
    method.to(device).eval()
    out = Path(args.out) if args.out else checkpoint.parent / "viz"
    with torch.no_grad():
        render_run(method, cfg, train_src, test_src, device, out, class_names(test_src, data),
                   resize=cfg.image_size if data == FASHION_MNIST else None, log=_log)
    return 0


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    if args.json and not args.model:
        raise ValueError("bench: --json FILE writes the traffic model's records; it needs --model")
    if args.model:
        if args.names or args.quick:
            raise ValueError("bench: --model runs the traffic model alone; drop benchmark names and --quick")
        from fastssl.bench.traffic import main as traffic_model

        return traffic_model(args.json)
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
    train.add_argument("--data", help=f"{FASHION_MNIST!r}, an image folder, a shard folder or a brace "
                                      f"pattern of .tar shards (default: {FASHION_MNIST})")
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
                       help="shorten the run to what fits (evaluations included); off by default: "
                            "runs are fixed work (epochs, max_steps)")
    train.add_argument("--tensorboard", action="store_true")
    train.add_argument("--linear-probe", dest="linear_probe", action="store_true",
                       help="also fit a linear probe on frozen features at the end")
    train.add_argument("overrides", nargs="*", metavar="key=value")
    ev = sub.add_parser("eval", help="kNN and linear probe of a checkpoint's frozen backbone")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", help="default: the data the checkpoint was trained on")
    shards = sub.add_parser("shards", help="write a dataset as WebDataset tar shards (+ DALI index files)")
    shards.add_argument("src", help=f"{FASHION_MNIST!r}, an image folder or a labels file (.csv/.jsonl)")
    shards.add_argument("out", help="an empty or new folder")
    shards.add_argument("--shard-size", dest="shard_size", type=int, default=10_000, help="samples per shard")
    shards.add_argument("--split", default="train",
                        help="train or test (Fashion-MNIST's; ROOT/train or ROOT/val of a folder)")
    shards.add_argument("--labels", help="labels file whose labels become each sample's tags (method weak)")
    vocab = sub.add_parser("vocab", help="hashtag vocabulary of shards' captions (#tag tokens, lower-cased)")
    vocab.add_argument("shards", help="shard folder or brace pattern")
    vocab.add_argument("--top", type=int, required=True, help="keep the K most frequent hashtags")
    vocab.add_argument("--out", help="vocab.json ({tags, counts}) or a text file, one tag per line")
    viz = sub.add_parser("viz", help="figures of a run: feature map, nearest neighbours, "
                                     "MAE reconstructions, ViT attention")
    viz.add_argument("run", metavar="RUN", help="run directory (its last.pt) or a checkpoint file")
    viz.add_argument("--out", help="where the PNGs go (default: RUN/viz)")
    viz.add_argument("--data", help="default: the data the run was trained on")
    bench = sub.add_parser("bench", help="run benchmarks/bench_*.py")
    bench.add_argument("--quick", action="store_true")
    bench.add_argument("--model", action="store_true",
                       help="traffic model of every fused op (bytes, kernels, FLOPs, memory; runs on a CPU)")
    bench.add_argument("--json", metavar="FILE", help="with --model: write its records to FILE")
    bench.add_argument("names", nargs="*", help="e.g. info_nce train (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    command = {"train": cmd_train, "eval": cmd_eval, "viz": cmd_viz, "bench": cmd_bench, "shards": cmd_shards,
               "vocab": cmd_vocab}[args.command]
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
