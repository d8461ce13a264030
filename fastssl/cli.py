"""`fastssl train | eval | viz | bench | shards | vocab`.

    fastssl train [--method M] [--data fashion-mnist|PATH] [--backbone NAME] [--epochs E]
                  [--batch-size B] [--out DIR] [--config YAML] [--resume auto|PATH] [--overwrite]
                  [--extend] [--allow-change KEY] [--print-config] [key=value ...]
    fastssl eval --checkpoint RUN/last.pt [--data fashion-mnist|PATH] [--finetune [--size S]]
    fastssl finetune RUN [--data SPEC] [--size S] [--out DIR] [--config YAML] [--resume auto|PATH]
                     [--overwrite] [key=value ...]
    fastssl bench [--quick] [NAME ...]
    fastssl viz RUN [--out DIR] [--data SPEC]
    fastssl bench --model [--json FILE]
    fastssl shards SRC OUT [--shard-size N] [--split train|test] [--labels FILE] [--captions FILE]
    fastssl vocab SHARDS [--top K] [--out vocab.json] [--wordnet [--unmatched drop|keep]]
                  [--match LABELS [--map-to-target]] [--hierarchy wordnet [--depth D] [--root SYNSET]]

`fastssl train` with no --method and no --data runs the demo: DEMO_METHOD's Fashion-MNIST preset
with DEMO_SETTINGS. Multi-GPU / multi-node: launch the same command with torchrun, e.g.
`torchrun --nproc-per-node 8 -m fastssl.cli train --method mocov3 --data /imagenet/train`."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastssl.cli_errors import report, reportable
from fastssl.cli_parser import (
    all_methods,
    build_parser,
    method_in,
    split_key_values,
    subcommands,
)
from fastssl.data.spec import FASHION_MNIST
from fastssl.methods import DEMO_METHOD, demo_preset

_T0 = time.perf_counter()

FIXED_SIZE_SETS = (FASHION_MNIST, "colour-shapes")  # evaluated at the run's size, not resized and cropped
# kNN while training (eval_every): a fixed subsample of train (memory bank) and test images,
# a twelfth of the 70,000 images the final Fashion-MNIST evaluation reads.
MONITOR_TRAIN_IMAGES, MONITOR_TEST_IMAGES = 5_000, 1_000
# the same weighted kNN (cosine, k = 20, T = 0.07) on raw pixels of the test split, a property of the
# data set (it needs no model); printed beside the demo's figures for scale
RAW_PIXEL_KNN_FASHION_MNIST = 0.8459


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _data_options(cfg, device: torch.device) -> dict[str, Any]:
    from fastssl.data import resolve_loader

    loader, data_device = resolve_loader(cfg.data.loader, cfg.data.data_device, train_device=device)
    return {"loader": loader, "device": data_device, "num_threads": cfg.data.num_threads,
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

    methods = all_methods()
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
    if args.allow_change and not args.resume:
        raise ValueError("--allow-change: lets a resumed run differ from its checkpoint; use it with "
                         "--resume")
    name, cfg, data, demo = _train_config(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="", flush=True)
        return 0
    if demo:
        _log(f"demo: {name} {cfg.model.backbone} on Fashion-MNIST at {cfg.data.image_size}px, "
             f"{cfg.optim.epochs} epochs")
    elif data in all_methods()[name].presets:
        _log(f"{name}: the {data} preset ({cfg.model.backbone} at {cfg.data.image_size}px), "
             f"then the overrides")
    torch.manual_seed(cfg.run.seed)
    run = init_run(cfg)
    rank, world, device = run.rank, run.world, run.device
    method = all_methods()[name](cfg)
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
    _log(f"data: {data}, {options['loader']} loader on {options['device']}, {len(loader)} steps/epoch")
    # the demo shows the linear probe as well: a few seconds on features already extracted
    linear = args.linear_probe or demo
    evaluator = None
    if cfg.eval.eval_knn:  # kNN / linear probe, and what the method adds (zero-shot, retrieval)
        evaluator = method.evaluator(_evaluator(cfg, data, device, splits, linear=linear), splits, device,
                                     resize=cfg.eval_side if data in FIXED_SIZE_SETS else None)
    monitor = None
    if evaluator is not None and cfg.eval.eval_every:
        monitor = _evaluator(cfg, data, device, splits, max_train=MONITOR_TRAIN_IMAGES,
                             max_test=MONITOR_TEST_IMAGES, progress=False)
    budget = args.time_budget
    if budget is not None:
        budget -= time.perf_counter() - _T0  # the budget counts from the command's start
    trainer = Trainer(method, loader, evaluator=evaluator, resume=args.resume, tensorboard=args.tensorboard,
                      time_budget_s=budget, monitor=monitor, overwrite=args.overwrite, extend=args.extend,
                      run=run, on_summary=draw_run_curves, allow_change=args.allow_change)
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
    if "zero_shot_top1" in summary:
        lines.append(f"zero-shot top-1 (class-name prompts): pretrained {summary['zero_shot_top1']:.2%}, "
                     f"random init {summary.get('zero_shot_top1_random_init', float('nan')):.2%}")
    if "image_to_text_r1" in summary:
        recalls = {d: "/".join(f"{summary[f'{d}_r{k}']:.1%}" for k in (1, 5, 10))
                   for d in ("image_to_text", "text_to_image")}
        lines.append(f"retrieval over {summary['retrieval_images']} test images, recall@1/5/10: image->text "
                     f"{recalls['image_to_text']}, text->image {recalls['text_to_image']}")
    print("\n".join(lines), flush=True)


def cmd_eval(args: argparse.Namespace) -> int:
    from fastssl.data import check_data_spec, data_splits
    from fastssl.runs import load_trained_method

    if args.overrides and not args.finetune:
        raise ValueError(f"{args.overrides[0]}: key=value items set fine-tuning keys; add --finetune")
    method, state = load_trained_method(args.checkpoint)  # last.pt, a sharded last.dcp or the run directory
    name, cfg = state["method"], method.cfg
    data = check_data_spec(args.data or cfg.data.source)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    method.to(device).eval()
    splits = data_splits(data)
    evaluator = _evaluator(cfg, data, device, splits, linear=True)
    if evaluator is None:
        raise ValueError(f"--data: {data!r} has no labelled train/ and val/ splits to evaluate on")
    evaluator = method.evaluator(evaluator, splits, device,
                                 resize=cfg.eval_side if data in FIXED_SIZE_SETS else None)
    with torch.no_grad():
        result = evaluator(method if getattr(evaluator, "takes_method", False) else method.encoder())
    print(f"{name} {cfg.model.backbone} step {state['step']}: kNN top-1 {result['knn_top1']:.2%}, "
          f"linear probe top-1 {result['linear_top1']:.2%}"
          + (f", zero-shot top-1 {result['zero_shot_top1']:.2%}" if "zero_shot_top1" in result else ""),
          flush=True)
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
                             labels=args.labels, captions=args.captions, overwrite=args.overwrite)
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
    if "text_tower" in info:
        print(f"text tower, image projection and logit scale -> {info['text_tower']}; the text tower loads "
              f"with: {info['text_load']}.load_state_dict({{k[5:]: v for k, v in torch.load("
              f"{info['text_tower']!r}, weights_only=True).items() if k.startswith('text.')}})", flush=True)
    return 0


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


def main(argv: list[str] | None = None) -> int:
    """Run a command; returns the exit status: 0, 1 (training stopped on NaN/inf, or a bug), 2 (a
    mistake, or a fault the user can fix: one line, fastssl.cli_errors), 130 (a second Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(method_in(argv))
    rest, items = split_key_values(parser, argv)
    args, unknown = parser.parse_known_args(rest)
    if unknown:  # reported by the subcommand's parser, whose help lists what it takes
        subcommands(parser)[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command in ("train", "finetune", "eval"):
        args.overrides = args.overrides + items
    args.argv = argv
    debug = getattr(args, "debug", False)
    command = {"train": cmd_train, "eval": cmd_eval, "viz": cmd_viz, "bench": cmd_bench, "shards": cmd_shards,
               "vocab": cmd_vocab, "export": cmd_export, "finetune": cmd_finetune}[args.command]
    prog = f"fastssl {args.command}"
    try:
        return command(args)
    except KeyboardInterrupt as e:  # Ctrl-C outside the training steps, or a second one inside them
        print(f"{prog}: interrupted{f' ({e})' if str(e) else ''}", file=sys.stderr)
        return 130
    except BaseException as e:  # DCP's CheckpointException is no Exception
        if debug or not reportable(e):
            raise
        status, line = report(e)
        print(f"{prog}: {line}", file=sys.stderr, flush=True)
        return status

if __name__ == "__main__":
    sys.exit(main())
