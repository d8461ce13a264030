"""Weak supervision at small scale: softmax vs sigmoid loss, natural vs sqrt sampling.

Reproduces the two findings of Mahajan et al. 2018 ("Exploring the Limits of Weakly
Supervised Pretraining") on a noisy, long-tailed, multi-label variant of Fashion-MNIST:

* each training image is two Fashion-MNIST train images tiled side by side (28x56) and
  carries both classes as labels (one label when both tiles share a class);
* tile classes follow a power law, P(class of rank r) ~ (r + 1)^-alpha, the rank order
  being a seeded permutation of the 10 classes;
* `--noise` (default 20%) of all label slots are replaced by labels drawn from the
  marginal label distribution (fastssl.data.labels.inject_label_noise).

Each (loss, sampling) pair trains the same backbone from the same initialisation with
fastssl's `weak` method, ResamplingSampler and Trainer; the frozen backbone is then scored
by weighted kNN (k=20, T=0.07, fastssl.eval) on the clean, balanced Fashion-MNIST test
split with clean train images as the memory bank. Prints a markdown table (and writes
it with a JSON copy under --out). Deterministic given --seeds and the thread count.

    python -m fastssl.bench.weak_study            # ~5 minutes on 2 idle CPU cores (one seed)
    python -m fastssl.bench.weak_study --quick    # smoke run (< 1 minute)

`--results DIR` writes the table's rows (with machine, date, versions, git SHA) to
DIR/weak_study.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastssl.bench.harness import environment, write_rows
from fastssl.data import fashion_mnist
from fastssl.data.labels import LabelTable, inject_label_noise
from fastssl.engine import Trainer, resolve_config
from fastssl.eval import extract_features, knn_top1
from fastssl.methods.weak import WeakConfig, WeakSupervised
from fastssl.models import build_backbone

NUM_CLASSES = 10
RUNS = [("softmax", "natural"), ("softmax", "sqrt"), ("sigmoid", "natural"), ("sigmoid", "sqrt")]


def long_tailed_pairs(images: np.ndarray, labels: np.ndarray, n: int, alpha: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, list[list[int]], np.ndarray]:
    """n images [n, 28, 56] of two tiles each, their label lists, and the class prior used."""
    rank = rng.permutation(NUM_CLASSES)  # rank[c]: class c's place in the power law
    prior = (rank + 1.0) ** -alpha
    prior /= prior.sum()
    tiles = rng.choice(NUM_CLASSES, size=(n, 2), p=prior)
    by_class = [np.flatnonzero(labels == c) for c in range(NUM_CLASSES)]
    pick = np.stack([np.array([rng.choice(by_class[c]) for c in tiles[:, t]]) for t in range(2)], axis=1)
    pairs = np.concatenate([images[pick[:, 0]], images[pick[:, 1]]], axis=2)
    return pairs, [sorted({int(a), int(b)}) for a, b in tiles], prior


class TensorViews:
    """A loader over in-memory uint8 images: the sampler's indices, a seeded flip and
    +-2 pixel shift per image, normalised, 3 channels (the Method batch contract)."""

    def __init__(self, images: torch.Tensor, sampler, batch_size: int, mean: float, std: float, seed: int):
        self.images, self.sampler, self.batch_size = images, sampler, batch_size
        self.mean, self.std, self.seed, self.epoch = mean, std, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.tensor(list(self.sampler), dtype=torch.int64)
        _, h, w = self.images.shape
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float().div_(255).sub_(self.mean).div_(self.std)
            flip = torch.rand(len(idx), generator=g) < 0.5
            x = torch.where(flip[:, None, None], x.flip(-1), x)
            dy, dx = torch.randint(0, 5, (2,), generator=g).tolist()  # one shift per batch: cheap
            x = nn.functional.pad(x, (2, 2, 2, 2))[:, dy:dy + h, dx:dx + w]
            yield {"views": [x[:, None].expand(-1, 3, -1, -1)], "label": torch.zeros_like(idx), "index": idx}
        self.epoch += 1
        self.sampler.set_epoch(self.epoch)


def small_convnet() -> tuple[nn.Module, int]:
    """A 4-conv-layer net (0.24M parameters; the stride-2 stem keeps CPU runs short) whose
    global-average-pooled output is the feature."""
    def block(cin, cout, stride):
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    layers = block(3, 32, 2) + block(32, 64, 1) + block(64, 128, 2) + block(128, 128, 1)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), 128


def batches(images: torch.Tensor, labels: torch.Tensor, mean: float, std: float, size: int = 500):
    for s in range(0, len(images), size):
        x = images[s:s + size].float().div(255).sub(mean).div(std)
        yield x[:, None].expand(-1, 3, -1, -1), labels[s:s + size]


def knn_score(encoder: nn.Module, bank, test, mean: float, std: float) -> float:
    fb, yb = extract_features(encoder, batches(*bank, mean, std))
    ft, yt = extract_features(encoder, batches(*test, mean, std))
    return knn_top1(fb, yb, ft, yt, k=20, temperature=0.07)


def run_seed(args: argparse.Namespace, seed: int, train, test) -> dict:
    """Build the data for `seed`, train the four (loss, sampling) runs, score them."""
    rng = np.random.default_rng(seed)
    pairs, clean_rows, prior = long_tailed_pairs(train.images, train.labels, args.train_images, args.alpha,
                                                 rng)
    table = LabelTable(inject_label_noise(clean_rows, args.noise, NUM_CLASSES, seed=seed), NUM_CLASSES)
    mean, std = float(train.images.mean() / 255), float(train.images.std() / 255)
    pair_images = torch.from_numpy(pairs)
    bank_idx = torch.from_numpy(rng.permutation(len(train))[: args.bank])
    bank = (torch.tensor(train.images)[bank_idx], torch.tensor(train.labels)[bank_idx])
    test_set = (torch.tensor(test.images[: args.test]), torch.tensor(test.labels[: args.test]))

    def make_backbone():
        torch.manual_seed(seed)  # every run of a seed starts from the same weights
        return small_convnet() if args.backbone == "small" else build_backbone(args.backbone, 28)

    out = {"seed": seed, "prior": sorted(prior.tolist(), reverse=True),
           "label_counts": table.counts().tolist(),
           "raw_pixels": knn_top1(bank[0].flatten(1).float(), bank[1], test_set[0].flatten(1).float(),
                                  test_set[1]),
           "random_init": knn_score(make_backbone()[0], bank, test_set, mean, std), "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for loss, sampling in RUNS:
            cfg = resolve_config(WeakConfig, overrides=dict(
                loss=loss, sampling=sampling, num_classes=NUM_CLASSES, backbone=args.backbone, image_size=28,
                epochs=args.epochs, batch_size=args.batch_size, base_lr=args.base_lr, warmup_epochs=0.0,
                weight_decay=5e-4, seed=seed, out=f"{tmp}/{loss}_{sampling}", eval_knn=False, fused=True))
            method = WeakSupervised(cfg, labels=table, backbone=make_backbone())
            loader = TensorViews(pair_images, method.build_sampler(), args.batch_size, mean, std, seed)
            t0 = time.perf_counter()
            summary = Trainer(method, loader, progress=False, log=lambda msg: None).fit()
            train_s = time.perf_counter() - t0
            top1 = knn_score(method.encoder(), bank, test_set, mean, std)
            out["runs"].append({"loss": loss, "sampling": sampling, "knn_top1": top1,
                                "final_loss": summary["final_loss"], "steps": summary["steps"],
                                "train_seconds": train_s})
            print(f"seed {seed} {loss:8s} {sampling:8s} kNN top-1 {100 * top1:.2f}% ({train_s:.0f} s)",
                  file=sys.stderr, flush=True)
    return out


def _stats(values: list[float]) -> dict:
    """kNN top-1 in percent, as the table prints it: mean, and the std over seeds when several."""
    std = 100 * float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"knn_top1": 100 * float(np.mean(values)), "knn_top1_std": std}


def mean_std(values: list[float]) -> str:
    m = 100 * float(np.mean(values))
    return f"{m:.2f}" if len(values) == 1 else f"{m:.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny smoke settings")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (data, noise, init); mean ± std")
    p.add_argument("--train-images", type=int, default=20000, help="composite training images")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--base-lr", type=float, default=0.2, help="per 256 images (linear scaling)")
    p.add_argument("--alpha", type=float, default=1.5, help="power-law exponent of class frequencies")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of label slots replaced")
    p.add_argument("--bank", type=int, default=10000, help="clean train images in the kNN memory bank")
    p.add_argument("--test", type=int, default=10000, help="clean test images scored")
    p.add_argument("--backbone", default="small", help="'small' (4-layer convnet) or a fastssl backbone")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--root", default=None, help="Fashion-MNIST folder (default: Debian's dataset path)")
    p.add_argument("--out", type=Path, default=Path("runs/weak_study"))
    p.add_argument("--results", type=Path, help="folder for weak_study.jsonl (the rows as data)")
    args = p.parse_args(argv)
    if args.quick:
        args.train_images, args.epochs, args.bank, args.test = 1024, 1, 2000, 1000
    seeds = [int(x) for x in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    env = environment()  # at the start: the git SHA of the code that runs
    train, test = fashion_mnist("train", root=args.root), fashion_mnist("test", root=args.root)
    per_seed = [run_seed(args, seed, train, test) for seed in seeds]

    prior = ", ".join(f"{x:.3f}" for x in per_seed[0]["prior"])
    lines = [
        "### Weak supervision study: long-tailed, multi-label, noisy Fashion-MNIST",
        "",
        f"{args.train_images} composite 28x56 training images (2 tiles, class prior ~ (rank+1)^-{args.alpha}"
        f" = {prior}, rank order seeded), {args.noise:.0%} label noise. Backbone {args.backbone}, "
        f"{args.epochs} epochs, batch {args.batch_size}, SGD base lr {args.base_lr} (per 256), cosine. "
        f"kNN (k=20, T=0.07) on {args.test} clean test images, bank of {args.bank} clean train images. "
        f"Seeds {args.seeds} (mean ± std over seeds), {args.threads} threads, {env['device']}, "
        f"torch {torch.__version__}, git {env.get('git_sha', '')}, {env['date']}.",
        "",
        "| loss | sampling | kNN top-1 (%) | final train loss | steps | train s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    rows = []
    for k, (loss, sampling) in enumerate(RUNS):
        runs = [s["runs"][k] for s in per_seed]
        rows.append({"loss": loss, "sampling": sampling, **_stats([r["knn_top1"] for r in runs]),
                     "final_train_loss": float(np.mean([r["final_loss"] for r in runs])),
                     "steps": runs[0]["steps"],
                     "train_s": float(np.mean([r["train_seconds"] for r in runs]))})
        lines.append(f"| {loss} | {sampling} | {mean_std([r['knn_top1'] for r in runs])} | "
                     f"{np.mean([r['final_loss'] for r in runs]):.4f} | {runs[0]['steps']} | "
                     f"{np.mean([r['train_seconds'] for r in runs]):.0f} |")
    lines += [f"| (random init) | - | {mean_std([s['random_init'] for s in per_seed])} | - | 0 | 0 |",
              f"| (raw pixels) | - | {mean_std([s['raw_pixels'] for s in per_seed])} | - | - | - |",
              "", f"Total wall time {time.perf_counter() - t_start:.0f} s."]
    for name, key, steps in (("(random init)", "random_init", 0), ("(raw pixels)", "raw_pixels", None)):
        rows.append({"loss": name, "sampling": "-", **_stats([s[key] for s in per_seed]),
                     "final_train_loss": None, "steps": steps, "train_s": None if steps is None else 0})
    table_md = "\n".join(lines) + "\n"
    if args.results:
        setting = {"train_images": args.train_images, "epochs": args.epochs, "seeds": args.seeds,
                   "threads": args.threads, "total_wall_s": time.perf_counter() - t_start}
        write_rows(args.results / "weak_study.jsonl", [setting | r for r in rows], env)
    print(table_md, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "weak_study.md").write_text(table_md)
    (args.out / "weak_study.json").write_text(json.dumps(
        {"args": {k: str(v) for k, v in vars(args).items()}, "env": env, "seeds": per_seed}, indent=2) + "\n")


if __name__ == "__main__":
    main()
