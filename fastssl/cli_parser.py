"""The command line of `fastssl`: its parser, the help of `train` (every config key of the
method, from its config dataclasses), and the split of key=value items from the flags."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

DESCRIPTION = "`fastssl train | eval | finetune | viz | bench | shards | vocab | export`."


def all_methods() -> dict:
    """fastssl.methods.METHODS, imported when a command needs it (the import loads torch)."""
    from fastssl.methods import METHODS

    return METHODS


def benchmarks_dir() -> Path:
    """Where `fastssl bench --out` defaults to write rows: benchmarks/results of the current directory."""
    return Path("benchmarks") / "results"


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
    from fastssl.methods import DEMO_METHOD

    methods = all_methods()
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
    from fastssl.data.spec import FASHION_MNIST
    from fastssl.methods import DEMO_METHOD

    methods = sorted(all_methods())
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show the Python traceback of an error")
    parser = _Parser(prog="fastssl", description=DESCRIPTION, parents=[common])
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
    train.add_argument("--allow-change", dest="allow_change", action="append", default=[], metavar="KEY",
                       help="with --resume: continue although KEY (a config key, or 'data') differs from the "
                            "checkpoint's run (repeatable)")
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
    shards.add_argument("--captions", help="captions file (.csv/.jsonl) or 'synthetic' (class-name "
                                           "templates), written as KEY.txt; default: an image folder's "
                                           "captions.csv/.jsonl")
    shards.add_argument("--overwrite", action="store_true",
                        help="write OUT again even if it holds a complete shard set")
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


def split_key_values(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[list[str], list[str]]:
    """(argv without the key=value items, the key=value items in order): argparse takes a
    positional list only once, so key=value items between flags are pulled out first. A
    token that is the value of the flag before it (--out a=b) stays with the flag."""
    command = next((i for i, t in enumerate(argv) if not t.startswith("-")), None)
    if command is None or argv[command] not in ("train", "finetune", "eval"):
        return argv, []
    takes_value = {opt for action in subcommands(parser)[argv[command]]._actions if action.nargs != 0
                   for opt in action.option_strings}
    rest, items = argv[:command + 1], []
    tokens = argv[command + 1:]
    for i, token in enumerate(tokens):
        if _KEY_VALUE.match(token) and not (i and tokens[i - 1] in takes_value):
            items.append(token)
        else:
            rest.append(token)
    return rest, items


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def method_in(argv: list[str]) -> str | None:
    for i, token in enumerate(argv):
        if token == "--method" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--method="):
            return token.split("=", 1)[1]
    return None
