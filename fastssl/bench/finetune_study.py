"""Label spaces and fine-tuning at small scale: the evaluations of the weakly supervised papers.

Two parts, both on Fashion-MNIST, each evaluated by a linear probe on frozen features and by
full fine-tuning (fastssl.finetune) at 32 px, a resolution other than pre-training's:

* vocab: the weak-supervision data of fastssl.bench.weak_study (two tiles per image, long-
  tailed classes, label noise) with hashtags instead of class ids: each label is written as
  one of its class's synonyms (#sneaker, #sneakers; #handbag, #purse) and images carry
  off-target tags (#love, #fashion, #ootd). The weak method (softmax, natural sampling)
  pre-trains on each label space: raw hashtags, WordNet-merged synsets, the synsets matched to
  the ten target classes (fastssl.data.vocab.wordnet_vocabulary), flat or with WordNet
  hypernyms added to every image's targets (JFT-style).
* presets: the MAE, DINO and MoCo v3 Fashion-MNIST presets pre-train on the 60,000 training
  images without labels, then are probed and fine-tuned on the labelled subset, from their weights
  and from random init of the same network (trained at the full LR in every layer).

    python -m fastssl.bench.finetune_study                  # idle CPU: minutes per run
    python -m fastssl.bench.finetune_study --tiny           # smoke run (the test's size)

Rows go to RESULTS/finetune_study.jsonl (--results, default benchmarks/results; --append adds to it),
one per (part, setting, init) with machine, date, versions and git SHA."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastssl.bench.harness import environment, write_rows
from fastssl.bench.weak_study import TensorViews, long_tailed_pairs
from fastssl.data import build_loader, data_splits, fashion_mnist, recipes
from fastssl.data import wordnet as wn_
from fastssl.data.labels import LabelTable, expand_hierarchy, inject_label_noise
from fastssl.data.vocab import wordnet_vocabulary
from fastssl.engine import Trainer, resolve_config
from fastssl.eval import build_evaluator
from fastssl.finetune import finetune
from fastssl.methods import METHODS
from fastssl.methods.weak import WeakConfig, WeakSupervised

# Fashion-MNIST's classes as hashtags: synonyms WordNet merges (sandal/sandals, handbag/purse)
# and words it keeps apart; OFF_TARGET tags are under no class (two are not in WordNet).
CLASS_TAGS = [["tee", "top"], ["trousers", "slacks"], ["pullover", "sweater", "jumper"], ["dress", "frock"],
              ["coat", "jacket"], ["sandal", "sandals"], ["shirt", "shirts"], ["sneaker", "sneakers"],
              ["handbag", "purse"], ["boot", "boots"]]
OFF_TARGET = ["love", "fashion", "style", "instagood", "ootd"]
TARGETS = "tee,top,trousers,pullover,dress,coat,sandal,shirt,sneaker,purse,boot"
VOCABS = [("raw", "flat"), ("wordnet", "flat"), ("wordnet", "hierarchy"), ("matched", "flat"),
          ("matched", "hierarchy")]
PRESETS = ("mae", "dino", "mocov3")
NUM_CLASSES = 10


def hashtag_rows(labels: list[list[int]], rng: np.random.Generator, off_target: float) -> list[list[str]]:
    """Each label as one of its class's synonyms, plus an off-target tag with probability `off_target`."""
    rows = []
    for row in labels:
        tags = {CLASS_TAGS[c][rng.integers(len(CLASS_TAGS[c]))] for c in row}
        if rng.random() < off_target:
            tags.add(OFF_TARGET[rng.integers(len(OFF_TARGET))])
        rows.append(sorted(tags))
    return rows


def label_space(rows: list[list[str]], vocab: str, targets: str,
                wordnet) -> tuple[list[list[int]], list[str]]:
    """(label ids per image, label names) of one vocabulary mode; an image may end with none."""
    if vocab == "raw":
        names = sorted({t for row in rows for t in row})
        ids = {t: i for i, t in enumerate(names)}
        return [sorted(ids[t] for t in row) for row in rows], names
    options = dict(match=TARGETS, map_to_target=True) if vocab == "matched" else {}
    if targets == "hierarchy":
        options |= dict(hierarchy="wordnet", depth=2)
    v = wordnet_vocabulary(rows, wordnet=wordnet, **options)
    names = v.tags
    of_tag = {h: i for i, e in enumerate(v.entries) for h in e["hashtags"]}
    id_rows = [sorted({of_tag[wn_.normalise_tag(t)] for t in row if wn_.normalise_tag(t) in of_tag})
               for row in rows]
    if targets == "hierarchy":
        id_rows = expand_hierarchy(id_rows, wn_.wordnet_parent_map(names, wordnet=wordnet))
    return id_rows, names


def write_folder(root: Path, train, test, n_train: int, n_test: int, seed: int) -> str:
    """A labelled image folder (train/ and val/, one folder per class) of Fashion-MNIST images."""
    rng = np.random.default_rng(seed)
    for split, source, n in (("train", train, n_train), ("val", test, n_test)):
        for i in rng.permutation(len(source))[:n]:
            d = root / split / f"{int(source.labels[i]):02d}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(source.images[i]).save(d / f"{i}.png")
    return str(root)


def linear_top1(cfg, folder: str, encoder: torch.nn.Module) -> dict:
    """kNN and linear-probe top-1 of the frozen encoder at its pre-training size."""
    splits = data_splits(folder)
    evaluate = build_evaluator(cfg, splits.train, splits.test, torch.device("cpu"), resize=cfg.eval_side,
                               linear=True, progress=False)
    with torch.no_grad():
        result = evaluate(encoder.eval())
    return {"knn_top1": result["knn_top1"], "linear_top1": result["linear_top1"]}


def finetuned(run: Path, folder: str, args, init: str) -> dict:
    out = run.parent / f"{run.name}-ft-{init}"
    keys = dict(init=init, epochs=args.ft_epochs, batch_size=args.batch_size, loader="torchvision",
                warmup_epochs=min(1.0, args.ft_epochs / 4), num_threads=args.threads, seed=args.seed,
                out=str(out))
    if args.ft_lr is not None:
        keys["base_lr"] = args.ft_lr
    if init == "random":  # layer decay keeps what pre-training put in the early layers; here there is none
        keys["layer_decay"] = 1.0
    s = finetune(run, folder, args.size, keys, preset={}, progress=False, log=lambda m: None)
    return {"finetune_top1": s["top1"], "finetune_top5": s["top5"], "finetune_steps": s["steps"],
            "finetune_seconds": s["train_seconds"]}


def vocab_part(args, train, folder: str, tmp: Path, wordnet) -> list[dict]:
    rng = np.random.default_rng(args.seed)
    pairs, clean, _ = long_tailed_pairs(train.images, train.labels, args.train_images, args.alpha, rng)
    noisy = inject_label_noise(clean, args.noise, NUM_CLASSES, seed=args.seed)
    rows = hashtag_rows(noisy, rng, args.off_target)
    mean, std = float(train.images.mean() / 255), float(train.images.std() / 255)
    out = []
    for vocab, targets in VOCABS:
        id_rows, names = label_space(rows, vocab, targets, wordnet)
        keep = np.array([i for i, r in enumerate(id_rows) if r])
        table = LabelTable([id_rows[i] for i in keep], len(names))
        cfg = resolve_config(WeakConfig, overrides=dict(
            loss="softmax", sampling="natural", num_classes=len(names), backbone=args.backbone, image_size=28,
            epochs=args.epochs, batch_size=args.batch_size, base_lr=0.2, warmup_epochs=0.0, weight_decay=5e-4,
            seed=args.seed, out=str(tmp / f"weak-{vocab}-{targets}"), eval_knn=False))
        torch.manual_seed(args.seed)
        method = WeakSupervised(cfg, labels=table)
        loader = TensorViews(torch.from_numpy(pairs[keep]), method.build_sampler(), args.batch_size, mean,
                             std, args.seed)
        Trainer(method, loader, progress=False, log=lambda m: None).fit()
        row = {"part": "vocab", "vocab": vocab, "targets": targets, "labels": len(names),
               "images": int(len(keep))} | linear_top1(cfg, folder, method.encoder())
        row |= finetuned(Path(cfg.run.out), folder, args, "pretrained")
        print(f"vocab {vocab:8s} {targets:9s} {len(names):3d} labels: linear {row['linear_top1']:.2%}, "
              f"fine-tuned {row['finetune_top1']:.2%}", file=sys.stderr, flush=True)
        out.append(row)
    return out


def preset_part(args, train, folder: str, tmp: Path) -> list[dict]:
    """Each preset pre-trains on all of `train` without its labels (the semi-supervised protocol),
    then is probed and fine-tuned on the labelled subset in `folder`."""
    out = []
    for name in args.methods:
        cls = METHODS[name]
        overrides = dict(out=str(tmp / name), seed=args.seed, eval_knn=False, loader="torchvision",
                         num_threads=args.threads)
        if args.pretrain_steps:
            overrides["max_steps"] = args.pretrain_steps
        if args.pretrain_batch:
            overrides["batch_size"] = args.pretrain_batch
        cfg = resolve_config(cls.config_class, None, overrides, preset=cls.presets["fashion-mnist"])
        torch.manual_seed(args.seed)
        method = cls(cfg)
        method.bind_data(train)
        recipe = recipes.with_view_overrides(method.recipe(), cfg.data.views)
        loader = build_loader(train, recipe, batch_size=cfg.data.batch_size, seed=args.seed,
                              drop_last=True, loader="torchvision", device="cpu", num_threads=args.threads)
        summary = Trainer(method, loader, progress=False, log=lambda m: None).fit()
        probe = linear_top1(cfg, folder, method.encoder())
        for init in ("pretrained", "random"):
            row = {"part": "presets", "method": name, "backbone": cfg.model.backbone,
                   "pretrain_size": cfg.data.image_size, "size": args.size, "init": init,
                   "pretrain_steps": summary["steps"]} | (probe if init == "pretrained" else {})
            row |= finetuned(Path(cfg.run.out), folder, args, init)
            print(f"preset {name:7s} {init:10s} fine-tuned {row['finetune_top1']:.2%}"
                  + (f", linear {probe['linear_top1']:.2%}" if init == "pretrained" else ""),
                  file=sys.stderr, flush=True)
            out.append(row)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the smoke settings of the test")
    p.add_argument("--parts", default="vocab,presets", help="comma list: vocab, presets")
    p.add_argument("--methods", default=",".join(PRESETS), help="presets part: comma list of methods")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=20000, help="vocab part: composite training images")
    p.add_argument("--epochs", type=int, default=3, help="vocab part: weak pre-training epochs")
    p.add_argument("--alpha", type=float, default=1.5)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--off-target", dest="off_target", type=float, default=0.5,
                   help="fraction of images carrying an off-target hashtag")
    p.add_argument("--backbone", default="resnet8", help="vocab part: the weak method's backbone")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=128)
    p.add_argument("--clean-train", dest="clean_train", type=int, default=10000,
                   help="labelled training images the probes and fine-tuning use")
    p.add_argument("--clean-test", dest="clean_test", type=int, default=5000)
    p.add_argument("--size", type=int, default=32, help="fine-tuning size (pre-training: 24-28)")
    p.add_argument("--ft-epochs", dest="ft_epochs", type=int, default=5)
    p.add_argument("--ft-lr", dest="ft_lr", type=float, help="fine-tuning base_lr (else its default)")
    p.add_argument("--pretrain-steps", dest="pretrain_steps", type=int, help="presets: step cap")
    p.add_argument("--pretrain-batch", dest="pretrain_batch", type=int, help="presets: batch (else preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder (default: Debian's dataset path)")
    p.add_argument("--results", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--append", action="store_true",
                   help="add the rows to the data file instead of replacing it")
    args = p.parse_args(argv)
    if args.tiny:
        args.train_images, args.epochs, args.clean_train, args.clean_test = 64, 1, 40, 20
        args.batch_size, args.ft_epochs, args.pretrain_steps, args.pretrain_batch = 16, 1, 2, 16
    args.methods = [m for m in args.methods.split(",") if m]
    parts = set(args.parts.split(","))
    torch.set_num_threads(args.threads)
    env, t0 = environment(), time.perf_counter()
    train, test = fashion_mnist("train", root=args.root), fashion_mnist("test", root=args.root)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "fashion", train, test, args.clean_train, args.clean_test,
                              args.seed)
        if "vocab" in parts:
            rows += vocab_part(args, train, folder, Path(tmp), wn_.load_wordnet())
        if "presets" in parts:
            rows += preset_part(args, train, folder, Path(tmp))
    setting = {k: v for k, v in vars(args).items() if k not in ("results", "root", "append")} | {
        "total_wall_s": time.perf_counter() - t0}
    write_rows(args.results / "finetune_study.jsonl", [setting | r for r in rows], env, append=args.append)
    return rows


if __name__ == "__main__":
    main()
