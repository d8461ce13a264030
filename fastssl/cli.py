"""`fastssl train | eval | viz | bench | shards | vocab`.

    fastssl train [--method M] [--data fashion-mnist|PATH] [--backbone NAME] [--epochs E]
                  [--batch-size B] [--out DIR] [--config YAML] [--resume auto|PATH] [--overwrite]
                  [--extend] [--print-config] [key=value ...]
    fastssl eval --checkpoint RUN/last.pt [--data fashion-mnist|PATH] [--finetune [--size S]]
    fastssl finetune RUN [--data SPEC] [--size S] [--out DIR] [--config YAML] [--resume auto|PATH]
                     [--overwrite] [key=value ...]
    fastssl bench [--quick] [NAME ...]
    fastssl viz RUN [--out DIR] [--data SPEC]
    fastssl bench --model [--json FILE]
    fastssl shards SRC OUT [--shard-size N] [--split train|test] [--labels FILE]
    fastssl vocab SHARDS [--top K] [--out vocab.json] [--wordnet [--unmatched drop|keep]]
                  [--match LABELS [--map-to-target]] [--hierarchy wordnet [--depth D] [--root SYNSET]]

`fastssl train` with no --method and no --data runs the demo: DEMO_METHOD's Fashion-MNIST preset
with DEMO_SETTINGS. Multi-GPU / multi-node: launch the same command with torchrun, e.g.
`torchrun --nproc-per-node 8 -m fastssl.cli train --method mocov3 --data /imagenet/train`."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

_T0 = time.perf_counter()

# The demo (`make demo`, `fastssl train` with no --method and no --data): DEMO_METHOD's Fashion-MNIST
# preset (its `presets["fashion-mnist"]`, chosen by the recipe search in benchmarks/RESULTS.md) with
# DEMO_SETTINGS on top. Fixed work (epochs, no time budget), so a busy machine takes longer but
# prints the same numbers.
DEMO_METHOD = "mocov3"
# Same seed, same machine -> the same losses and kNN (README: what can differ across machines).
DEMO_SETTINGS: dict[str, Any] = {"deterministic": True}
FASHION_MNIST = "fashion-mnist"  # the spec fastssl.data.spec reads as Fashion-MNIST
FIXED_SIZE_SETS = (FASHION_MNIST, "colour-shapes")  # evaluated at the run's size, not resized and cropped
# kNN while training (eval_every): a fixed subsample of train (memory bank) and test images,
# a twelfth of the 70,000 images the final Fashion-MNIST evaluation reads.
MONITOR_TRAIN_IMAGES, MONITOR_TEST_IMAGES = 5_000, 1_000
RAW_PIXEL_KNN_FASHION_MNIST = 0.8459  # NOTES.md: weighted kNN on raw pixels, test split


def demo_preset() -> dict[str, Any]:
    """The demo's configuration layer: DEMO_METHOD's Fashion-MNIST preset with DEMO_SETTINGS."""
    return {**_methods()[DEMO_METHOD].presets[FASHION_MNIST], **DEMO_SETTINGS}


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _methods() -> dict:
    from fastssl.methods import METHODS

    return METHODS


def _data_options(cfg, device: torch.device) -> dict[str, Any]:
    from fastssl.data import resolve_loader

    backend, data_device = resolve_loader(cfg.data.loader, cfg.data.data_device, train_device=device)
    return {"backend": backend, "device": data_device, "num_threads": cfg.data.num_threads,
            "max_skipped_fraction": cfg.data.max_skipped_fraction,
            "samples_per_epoch": cfg.data.samples_per_epoch}


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
    resize = cfg.eval_side if data in FIXED_SIZE_SETS else None
    return build_evaluator(cfg, train_src, test_src, device, resize=resize, **options)


# Flags that set a config key (the key is the flag's dest); the rest steer the command.
CONFIG_FLAGS = ("backbone", "epochs", "batch_size", "out", "fused", "loss", "sampling")


def _train_config(args: argparse.Namespace):
    """(method name, resolved config, data, demo?) of a train command line.

    Precedence: the dataclass defaults < the preset (demo, or the method's preset for the
    data) < the --config YAML < the flags and key=value items. A flag and a key=value for
    the same key is an error (neither silently wins), as is a key=value item given twice."""
    from fastssl.data import check_data_spec
    from fastssl.engine import parse_overrides, resolve_config

    methods = _methods()
    demo = args.method is None and args.data is None
    name = args.method or DEMO_METHOD
    if name not in methods:
        raise ValueError(f"--method: expected one of {sorted(methods)}, got {name!r}")
    data = check_data_spec(args.data or methods[name].default_data)
    overrides = parse_overrides(args.overrides)
    for key in CONFIG_FLAGS:
        if getattr(args, key) is not None:
            if key in overrides:
                flag = "--" + key.replace("_", "-")
                raise ValueError(f"{flag} {getattr(args, key)} and {key}={overrides[key]} both set {key}: "
                                 f"give one of them")
            overrides[key] = getattr(args, key)
    for key in ("data", "source", "data.source"):
        if key in overrides:
            raise ValueError(f"{key}={overrides[key]}: set the data with --data")
    overrides["source"] = data
    cfg = resolve_config(methods[name].config_class, args.config, overrides,
                         preset=demo_preset() if demo else methods[name].presets.get(data))
    return name, cfg, data, demo


def _resume_command(argv: list[str], out: str) -> str:
    """The command line that continues this run: the same arguments, --resume auto, --out OUT."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token in ("--resume", "--out"):
            skip = True
        elif token != "--overwrite" and not token.startswith(("--resume=", "--out=", "out=", "run.out=")):
            kept.append(token)
    return shlex.join(["fastssl", *kept, "--out", out, "--resume", "auto"])


def cmd_train(args: argparse.Namespace) -> int:
    from fastssl.data import build_loader, data_splits, recipes
    from fastssl.engine import Trainer, init_run
    from fastssl.engine.config import config_to_dict
    from fastssl.viz import draw_run_curves

    if args.overwrite and args.resume:
        raise ValueError(f"--overwrite and --resume {args.resume}: "
                         f"give one (replace the run or continue it)")
    if args.extend and not args.resume:
        raise ValueError("--extend: lengthens a resumed run; use it with --resume")
    name, cfg, data, demo = _train_config(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="", flush=True)
        return 0
    if demo:
        _log(f"demo: {name} {cfg.model.backbone} on Fashion-MNIST at {cfg.data.image_size}px, "
             f"{cfg.optim.epochs} epochs")
    elif data in _methods()[name].presets:
        _log(f"{name}: the {data} preset ({cfg.model.backbone} at {cfg.data.image_size}px), "
             f"then the overrides")
    torch.manual_seed(cfg.run.seed)
    run = init_run(cfg)
    rank, world, device = run.rank, run.world, run.device
    method = _methods()[name](cfg)
    recipe = recipes.with_view_overrides(method.recipe(), cfg.data.views)
    options = _data_options(cfg, device)
    splits = data_splits(data)
    for note in splits.notes:
        _log(f"data: {note}")
    small = splits.is_small() if data not in method.presets else None
    if small is not None and rank == 0:
        _log(_small_data_hint(name, method, cfg, data, small))
    source = splits.pretrain
    method.bind_data(source)
    loader = build_loader(source, recipe, batch_size=cfg.data.rank_batch_size, shard_id=rank,
                          num_shards=world, seed=cfg.run.seed, drop_last=True,
                          sampler=method.build_sampler(source, rank=rank, world_size=world),
                          masking=method.masking(), **options)
    _log(f"data: {data}, {options['backend']} loader on {options['device']}, {len(loader)} steps/epoch")
    # the demo shows the linear probe as well: a few seconds on features already extracted
    linear = args.linear_probe or demo
    evaluator = _evaluator(cfg, data, device, splits, linear=linear) if cfg.eval.eval_knn else None
    monitor = None
    if evaluator is not None and cfg.eval.eval_every:
        monitor = _evaluator(cfg, data, device, splits, max_train=MONITOR_TRAIN_IMAGES,
                             max_test=MONITOR_TEST_IMAGES, progress=False)
    budget = args.time_budget
    if budget is not None:
        budget -= time.perf_counter() - _T0  # the budget counts from the command's start
    trainer = Trainer(method, loader, evaluator=evaluator, resume=args.resume, tensorboard=args.tensorboard,
                      time_budget_s=budget, monitor=monitor, overwrite=args.overwrite, extend=args.extend,
                      run=run, on_summary=draw_run_curves)
    summary = trainer.fit()
    if "interrupted" in summary:
        if rank == 0:
            print(f"stopped by {summary['interrupted']} after {summary['steps']} steps; checkpoint "
                  f"{trainer.ckpt_path}; continue with: {_resume_command(args.argv, cfg.run.out)}",
                  flush=True)
        return 0
    if rank == 0:
        _print_summary(summary, data)
    return 0


def _small_data_hint(name: str, method, cfg, data: str, small: str) -> str:
    preset = method.presets.get(method.default_data, {})
    keys = " ".join(f"{k}={v}" for k, v in preset.items() if k in ("backbone", "image_size", "batch_size",
                                                                       "queue_size", "epochs"))
    return (f"warning: {data} is small ({small}; < 50,000 images or < 64 px): {name}'s defaults "
            f"({cfg.model.backbone} at {cfg.data.image_size} px, batch {cfg.data.batch_size}) are sized for "
            f"ImageNet. "
            f"Start from the small-image preset, {name}'s {method.default_data!r} preset: {keys}")


def _print_summary(summary: dict, data: str) -> None:
    speed = summary["images_per_second"]  # None when no step ran (max_steps=0, a finished run resumed)
    lines = [f"{summary['method']} {summary['backbone']}: {summary['steps']} steps, "
             f"{'no step timed' if speed is None else f'{speed:.0f} img/s'} on {summary['device']}"]
    if "knn_top1" in summary:
        lines.append(f"kNN top-1 (k=20, T=0.07): pretrained {summary['knn_top1']:.2%}, "
                     f"random init {summary.get('knn_top1_random_init', float('nan')):.2%}"
                     + (f", raw pixels {RAW_PIXEL_KNN_FASHION_MNIST:.2%}" if data == FASHION_MNIST else ""))
    if "linear_top1" in summary:
        lines.append(f"linear probe top-1: pretrained {summary['linear_top1']:.2%}"
                     + (f", random init {summary['linear_top1_random_init']:.2%}"
                        if "linear_top1_random_init" in summary else ""))
    print("\n".join(lines), flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from fastssl.data import check_data_spec
    from fastssl.runs import load_trained_method

    if args.overrides and not args.finetune:
        raise ValueError(f"{args.overrides[0]}: key=value items set fine-tuning keys; add --finetune")
    method, state = load_trained_method(args.checkpoint)  # last.pt, a sharded last.dcp or the run directory
    name, cfg = state["method"], method.cfg
    data = check_data_spec(args.data or cfg.data.source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device).eval()
    evaluator = _evaluator(cfg, data, device, linear=True)
    if evaluator is None:
        raise ValueError(f"--data: {data!r} has no labelled train/ and val/ splits to evaluate on")
    with torch.no_grad():
        result = evaluator(method.encoder())
    print(f"{name} {cfg.model.backbone} step {state['step']}: kNN top-1 {result['knn_top1']:.2%}, "
          f"linear probe top-1 {result['linear_top1']:.2%}", flush=True)
    if args.finetune:
        from fastssl.engine import parse_overrides
        from fastssl.finetune import finetune, summary_lines

        out = Path(args.checkpoint).parent if Path(args.checkpoint).is_file() else Path(args.checkpoint)
        keys = {"out": str(out / "finetune")} | parse_overrides(args.overrides)
        summary = finetune(args.checkpoint, data, args.size, keys, overwrite=True)
        print("\n".join(summary_lines(summary)), flush=True)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from fastssl.finetune import finetune_command

    items = args.overrides + ([f"out={args.out}"] if args.out else [])
    return finetune_command(args.run, args.data, args.size, items, yaml_path=args.config, resume=args.resume,
                            overwrite=args.overwrite)


def cmd_shards(args: argparse.Namespace) -> int:
    from fastssl.data.shards import shard_dataset

    manifest = shard_dataset(args.src, args.out, shard_size=args.shard_size, split=args.split,
                             labels=args.labels)
    print(f"{args.out}: {manifest['total']} samples in {len(manifest['shards'])} shard(s), "
          f"{len(manifest['class_names'])} classes, {len(manifest['tag_vocabulary'])} tags", flush=True)
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from fastssl.data.shards import ShardSource, vocabulary

    # Every WordNet option leads here, where those missing what they need are refused.
    options = dict(unmatched=args.unmatched, match=args.match, map_to_target=args.map_to_target,
                   hierarchy=args.hierarchy, depth=args.depth, root=args.root)
    if args.wordnet or any(v not in (None, False) for v in options.values()):
        from fastssl.data.vocab import wordnet_vocabulary, write_vocabulary

        source = ShardSource(args.shards)
        options["unmatched"] = args.unmatched or "drop"
        vocab = wordnet_vocabulary([source.raw_tags(i) for i in range(len(source))], top=args.top, **options)
        if args.out:
            write_vocabulary(args.out, vocab)
        print(vocab.table(20), flush=True)
        _log(f"vocab: {vocab.summary()}" + (f"; written to {args.out}" if args.out else ""))
        return 0
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
    from fastssl.runs import load_trained_method

    try:
        from fastssl.viz.figures import class_names, render_run
    except ImportError as e:
        raise ValueError(f"viz: needs {e.name}, which is not installed: pip install 'fastssl[viz]'") from e
    if not Path(args.run).exists():
        raise ValueError(f"RUN: expected a run directory holding last.pt (or a sharded last.dcp), or a "
                         f"checkpoint file, got {args.run!r}")
    method, state = load_trained_method(args.run)
    cfg = method.cfg
    data = check_data_spec(args.data or cfg.data.source)
    splits = data_splits(data)
    train_src, test_src = splits.train, splits.test
    if train_src is None or test_src is None:
        raise ValueError(f"--data: {data!r} has no labelled train/ and val/ splits to draw features from")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device).eval()
    run = Path(args.run)
    out = Path(args.out) if args.out else (run if run.is_dir() else run.parent) / "viz"
    with torch.no_grad():
        render_run(method, cfg, train_src, test_src, device, out, class_names(test_src, data),
                   resize=cfg.eval_side if data in FIXED_SIZE_SETS else None, log=_log)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from fastssl.runs import export_backbone

    info = export_backbone(args.run, args.out)
    print(f"{info['method']} {info['backbone']} step {info['step']}: {info['tensors']} tensors, "
          f"{info['parameters']:,} parameters -> {args.out}\n"
          f"load with: {info['load']}.load_state_dict(torch.load({args.out!r}, weights_only=True))",
          flush=True)
    return 0


def benchmarks_dir() -> Path:
    """Where `fastssl bench --out` defaults to write rows: benchmarks/results of the current directory."""
    return Path("benchmarks") / "results"


def cmd_bench(args: argparse.Namespace) -> int:
    from fastssl.bench import BENCHMARKS

    out = ["--out", str(args.out)] if args.out else []
    if args.memory:  # its own process: the plan joins a fake process group of 8 / 64 ranks
        cmd = [sys.executable, "-m", "fastssl.bench.memory"] + (["--quick"] if args.quick else []) + out
        return subprocess.run(cmd).returncode
    if args.json and not args.model:
        raise ValueError("bench: --json FILE writes the traffic model's records; it needs --model")
    if args.model:
        if args.names or args.quick:
            raise ValueError("bench: --model runs the traffic model alone; drop benchmark names and --quick")
        from fastssl.bench.traffic import main as traffic_model

        json_path = args.json or (str(args.out / "traffic_model.jsonl") if args.out else None)
        return traffic_model(json_path)
    unknown = [n for n in args.names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"bench: expected names among {sorted(BENCHMARKS)}, got {unknown}")
    failed = []
    for name in args.names or BENCHMARKS:
        _log(f"== fastssl bench {name}")
        cmd = [sys.executable, "-m", BENCHMARKS[name]] + (["--quick"] if args.quick else []) + out
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (what was wrong, where to look), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _keys_help(method: str | None) -> str:
    """The epilog of `fastssl train --help`: every config key of the method (the demo's
    without --method) by component, with its default, allowed values and meaning, read from
    the fields of the method's config dataclasses."""
    from fastssl.engine.config import describe_fields

    methods = _methods()
    name = method if method in methods else DEMO_METHOD
    lines = [f"keys of {name} (key=value or component.key=value, or a --config YAML file; --method M "
             f"--help lists M's), with their defaults and allowed values:"]
    component = None
    for comp, key, default, allowed, meaning in describe_fields(methods[name].config_class):
        if comp != component:
            component = comp
            lines.append(f" {comp}:")
        text = f"  {key}={'none' if default is None else default}"
        about = "; ".join(x for x in (meaning, allowed) if x)
        lines.append(f"{text:<34} {about}" if len(text) < 34 else f"{text}\n{'':<34} {about}")
    lines += ["", "precedence: defaults < the method's defaults < preset (--data fashion-mnist, the demo) "
              "< --config YAML < flags and key=value (a key given twice is an error)"]
    return "\n".join(lines)


def _add_command(sub, name: str, help: str, common: argparse.ArgumentParser,
                 **kwargs) -> argparse.ArgumentParser:
    """A subcommand's parser, with the options every command has (--debug)."""
    return sub.add_parser(name, help=help, parents=[common], **kwargs)


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The command line; `method` picks whose config keys `train --help` lists."""
    methods = sorted(_methods())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error")
    parser = _Parser(prog="fastssl", description=__doc__.split("\n\n")[0], parents=[common])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = _add_command(sub, "train", "pretrain (no --method/--data: the Fashion-MNIST demo)", common,
                         epilog=_keys_help(method), formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("--method", help=f"{', '.join(methods)} (default: the demo's, {DEMO_METHOD})")
    train.add_argument("--data", help=f"{FASHION_MNIST!r}, an image folder, a shard folder or a brace "
                                      f"pattern of .tar shards (default: {FASHION_MNIST}; colorization: "
                                      "colour-shapes, a generated colour set)")
    train.add_argument("--backbone")
    train.add_argument("--epochs", type=int)
    train.add_argument("--batch-size", dest="batch_size", type=int, help="global batch size")
    train.add_argument("--out", help="run directory (default: a new runs/<method>-<UTC time>, printed)")
    train.add_argument("--fused", type=_bool, help="false: every fused op runs its *_ref")
    train.add_argument("--loss", help="method weak: softmax (1/k targets) or sigmoid (per-label BCE)")
    train.add_argument("--sampling", help="method weak: natural, uniform, sqrt or inverse_sqrt")
    train.add_argument("--config", help="YAML file of key: value (below flags and key=value)")
    train.add_argument("--resume", help="'auto' (continue OUT/last.pt when present) or a checkpoint path")
    train.add_argument("--overwrite", action="store_true",
                       help="start afresh in an --out folder holding a run (deletes its checkpoint and logs)")
    train.add_argument("--extend", action="store_true",
                       help="with --resume: allow other epochs than the checkpoint's (schedules re-spread)")
    train.add_argument("--print-config", dest="print_config", action="store_true",
                       help="print the resolved config (YAML) and exit")
    train.add_argument("--time-budget", dest="time_budget", type=float, metavar="SECONDS",
                       help="shorten the run to what fits (evaluations included); off by default: "
                            "runs are fixed work (epochs, max_steps)")
    train.add_argument("--tensorboard", action="store_true")
    train.add_argument("--linear-probe", dest="linear_probe", action="store_true",
                       help="also fit a linear probe on frozen features at the end (the demo always does)")
    train.add_argument("overrides", nargs="*", metavar="key=value",
                       help="config keys (listed below), anywhere after 'train'")
    ev = _add_command(sub, "eval", "kNN and linear probe of a checkpoint's frozen backbone", common)
    ev.add_argument("--checkpoint", required=True, help="last.pt, a sharded last.dcp or the run directory")
    ev.add_argument("--data", help="default: the data the checkpoint was trained on")
    ev.add_argument("--finetune", action="store_true",
                    help="also fine-tune the backbone (the data's preset; into RUN/finetune) and report it")
    ev.add_argument("--size", type=int, help="with --finetune: its image size (default: pre-training's)")
    ev.add_argument("overrides", nargs="*", metavar="key=value", help="with --finetune: its keys")
    ft = _add_command(sub, "finetune", "fine-tune a run's backbone with a new head, any resolution", common)
    ft.add_argument("run", metavar="RUN", help="pre-trained run directory (last.pt / last.dcp) or checkpoint")
    ft.add_argument("--data", help="labelled data (default: the run's own); other classes: a transfer")
    ft.add_argument("--size", type=int, help="image size (default: the pre-training size)")
    for flag in ("--out", "--config", "--resume"):
        ft.add_argument(flag)
    ft.add_argument("--overwrite", action="store_true")
    ft.add_argument("overrides", nargs="*", metavar="key=value", help="config keys, as for train")
    export = _add_command(sub, "export", "a run's backbone alone, as a timm / torchvision state dict", common)
    export.add_argument("run", help="run directory (its last.dcp or last.pt) or a checkpoint")
    export.add_argument("--out", required=True, help="output .pt file")
    shards = _add_command(sub, "shards", "write a dataset as WebDataset tar shards (+ DALI index files)",
                          common)
    shards.add_argument("src", help=f"{FASHION_MNIST!r}, an image folder or a labels file (.csv/.jsonl)")
    shards.add_argument("out", help="an empty or new folder")
    shards.add_argument("--shard-size", dest="shard_size", type=int, default=10_000, help="samples per shard")
    shards.add_argument("--split", default="train",
                        help="train or test (Fashion-MNIST's; ROOT/train or ROOT/val of a folder)")
    shards.add_argument("--labels", help="labels file whose labels become each sample's tags (method weak)")
    vocab = _add_command(sub, "vocab", "hashtag vocabulary of shards' captions (#tags, or WordNet synsets)",
                         common)
    vocab.add_argument("shards", help="shard folder or brace pattern")
    vocab.add_argument("--top", type=int, help="keep the K most frequent hashtags (WordNet: labels); "
                                               "default all")
    vocab.add_argument("--out", help="vocab.json ({tags, counts}) or a text file, one tag per line")
    vocab.add_argument("--wordnet", action="store_true",
                       help="merge hashtags into WordNet noun synsets, each to its most frequent sense "
                            "(WordNet's first synset); writes synset ids, lemmas, hashtags (JSON)")
    vocab.add_argument("--unmatched", choices=("drop", "keep"),
                       help="hashtags WordNet lacks: drop (default) or keep as labels of their own")
    vocab.add_argument("--match", metavar="LABELS",
                       help="keep hashtags whose synset is, or is a hyponym of, a target label: a file of "
                            "WordNet ids (n02958343), synset names or words, one per line, or a comma list "
                            "(implies --wordnet); reports coverage")
    vocab.add_argument("--map-to-target", dest="map_to_target", action="store_true",
                       help="with --match: label each kept hashtag by its nearest target class")
    vocab.add_argument("--hierarchy", choices=("wordnet",),
                       help="add the labels' WordNet hypernyms to the vocabulary (implies --wordnet); "
                            "train with hierarchy=wordnet to expand each image's labels")
    vocab.add_argument("--depth", type=int, help="with --hierarchy: hypernym steps up (default all)")
    vocab.add_argument("--root", help="with --hierarchy: only this synset and those under it "
                                      "(e.g. fruit.n.01)")
    viz = _add_command(sub, "viz", "figures of a run: feature map, nearest neighbours, "
                                   "MAE reconstructions, ViT attention", common)
    viz.add_argument("run", metavar="RUN", help="run directory (its last.pt) or a checkpoint file")
    viz.add_argument("--out", help="where the PNGs go (default: RUN/viz)")
    viz.add_argument("--data", help="default: the data the run was trained on")
    bench = _add_command(sub, "bench", "benchmarks of the fused ops, training, data (fastssl.bench)", common)
    bench.add_argument("--quick", action="store_true", help="small shapes, few iterations: a smoke run")
    bench.add_argument("--out", type=Path, metavar="DIR",
                       help=f"write each benchmark's rows (JSON lines) under DIR, e.g. {benchmarks_dir()}")
    bench.add_argument("--model", action="store_true",
                       help="traffic model of every fused op (bytes, kernels, FLOPs, memory; runs on a CPU)")
    bench.add_argument("--json", metavar="FILE", help="with --model: write its records to FILE")
    bench.add_argument("--memory", action="store_true",
                       help="the memory plan: per-GPU bytes of DINO / MAE ViTs, DDP vs FSDP (fake tensors)")
    bench.add_argument("names", nargs="*", help="e.g. info_nce train (default: all)")
    return parser


_KEY_VALUE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _split_key_values(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the key=value items, the key=value items in order): argparse takes a
    positional list only once, so key=value items between flags are pulled out first. A
    token that is the value of the flag before it (--out a=b) stays with the flag."""
    command = next((i for i, t in enumerate(argv) if not t.startswith("-")), None)
    if command is None or argv[command] not in ("train", "finetune", "eval"):
        return argv, []
    takes_value = {opt for action in _subcommands(parser)[argv[command]]._actions if action.nargs != 0
                   for opt in action.option_strings}
    rest, items = argv[:command + 1], []
    tokens = argv[command + 1:]
    for i, token in enumerate(tokens):
        if _KEY_VALUE.match(token) and not (i and tokens[i - 1] in takes_value):
            items.append(token)
        else:
            rest.append(token)
    return rest, items


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _method_in(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--method="):
            return token.split("=", 1)[1]
    return None


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status: 0, 1 (training failed or an unexpected error),
    2 (a usage or input mistake, reported in one line), 130 (a second Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_method_in(argv))
    rest, items = _split_key_values(parser, argv)
    args, unknown = parser.parse_known_args(rest)
    if unknown:  # reported by the subcommand's parser, whose help lists what it takes
        _subcommands(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("train", "finetune", "eval"):
        args.overrides = args.overrides + items
    args.argv = argv
    debug = getattr(args, "debug", False)
    command = {"train": cmd_train, "eval": cmd_eval, "viz": cmd_viz, "bench": cmd_bench, "shards": cmd_shards,
               "vocab": cmd_vocab, "export": cmd_export, "finetune": cmd_finetune}[args.command]
    prog = f"fastssl {args.command}"
    from fastssl.engine import NonFiniteLossError

    try:
        return command(args)
    except KeyboardInterrupt as e:  # Ctrl-C outside the training steps, or a second one inside them
        print(f"{prog}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:
        if debug:
            raise
        print(f"{prog}: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, TypeError, OSError) as e:
        if debug:
            raise
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug, not a mistake of the user's: say how to see where
        if debug:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"{prog}: unexpected {type(e).__name__}: {first} (--debug shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
