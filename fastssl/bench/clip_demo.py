"""The image-text demo: CLIP on Fashion-MNIST with synthetic captions, beside the hashtag (weak) method.

Captions are synthetic (fastssl.data.captions.synthetic_captions): each training image's class
written by one of 10 templates with one of its synonyms ("selling my old sweatshirt, barely
worn"), and a stated fraction (--noise, 20%) naming a random other class. CLIP trains its preset
(`fastssl train --method clip` on fashion-mnist: CIFAR ResNet-8 at 28 px, a 2-layer text
transformer, fixed epochs) and is scored zero-shot from class-name prompts it never saw as
captions ("a photo of a pullover."), by retrieval on the test split's captions, and by kNN and
a linear probe of its image tower. The weak (hashtag) method trains the same backbone for the
same epochs on the same captions read as tags — each caption's named class, the noise included —
and is scored by its classifier's top-1 (its own class read-out, zero-shot's counterpart), kNN
and linear probe (their memory bank / training set: a fixed 10,000 of the training images).
Both on the 10,000 test images; fixed work, so a busy machine is only slower (with two threads the
order of floating-point reductions varies, and the scores move by about a point between runs).

    nice -n 10 python -m fastssl.bench.clip_demo --results benchmarks/results   # ~2.5 min idle, 2 cores
    python -m fastssl.bench.clip_demo --quick                                    # smoke run

--results DIR writes the rows (machine, date, versions, git SHA) to DIR/clip_demo.jsonl.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from fastssl.bench.harness import environment, write_rows
from fastssl.data import build_loader, data_splits, resolve_loader
from fastssl.data.captions import synthetic_captions
from fastssl.data.labels import LabelTable
from fastssl.data.sources import FASHION_MNIST_CLASSES
from fastssl.engine import Trainer, resolve_config
from fastssl.engine.run import evaluate
from fastssl.eval import build_evaluator
from fastssl.eval.classify import build_classifier_evaluator
from fastssl.methods import METHODS

SIDE = 28
BANK = 10_000  # train images in the kNN memory bank and the linear probe's training set (a fixed subsample)


def _train(method, splits, cfg, *, evaluator) -> tuple[dict, float]:
    """Train `method` on the pretraining split, then score it with `evaluator` (once, at the end)."""
    loader_kind, device = resolve_loader(cfg.data.loader, cfg.data.data_device,
                                         train_device=torch.device("cpu"))
    source = splits.pretrain
    method.bind_data(source)
    loader = build_loader(source, method.recipe(), batch_size=cfg.data.rank_batch_size, seed=cfg.run.seed,
                          drop_last=True, sampler=method.build_sampler(source), loader=loader_kind,
                          device=device, num_threads=cfg.data.num_threads)
    t0 = time.perf_counter()
    summary = Trainer(method, loader, progress=False, overwrite=True).fit()
    seconds = time.perf_counter() - t0
    cpu = torch.device("cpu")
    return summary | evaluate(method, evaluator, cpu, dict(device_type="cpu", enabled=False)), seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a few steps (smoke run; numbers mean nothing)")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of captions naming another class")
    p.add_argument("--threads", type=int, default=2, help="1 on a busy machine (idle threads spin)")
    p.add_argument("--out", type=Path, default=Path("runs/clip_demo"))
    p.add_argument("--results", type=Path, help="folder for clip_demo.jsonl (the rows as data)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = environment()  # at the start: the git SHA of the code that runs
    cpu = torch.device("cpu")
    splits = data_splits("fashion-mnist")
    base = dict(seed=0, deterministic=True, eval_every=0.0, **({"max_steps": 5} if args.quick else {}))

    clip_cls = METHODS["clip"]
    cfg = resolve_config(clip_cls.config_class, overrides=base | {"out": str(args.out / "clip"),
                                                                  "caption_noise": args.noise},
                         preset=clip_cls.presets["fashion-mnist"]).for_world(1)
    clip = clip_cls(cfg)
    knn = build_evaluator(cfg, splits.train, splits.test, cpu, resize=SIDE, linear=True, max_train=BANK)
    clip_summary, clip_s = _train(clip, splits, cfg, evaluator=clip.evaluator(knn, splits, cpu, resize=SIDE))

    # the weak method on the same captions: each one's named class is its tag (same seed, same noise)
    named = synthetic_captions(splits.pretrain.labels, FASHION_MNIST_CLASSES, noise=args.noise, seed=0)[1]
    weak_cls = METHODS["weak"]
    weak_cfg = resolve_config(weak_cls.config_class, overrides=base | {"out": str(args.out / "weak"),
                                                                       "epochs": cfg.optim.epochs},
                              preset=weak_cls.presets["fashion-mnist"]).for_world(1)
    weak = weak_cls(weak_cfg, labels=LabelTable.from_single_labels(named.tolist(), 10))
    test_batches = build_loader(splits.test, _eval_recipe(), batch_size=512, seed=0, drop_last=False,
                                shuffle=False, loader="torchvision", device="cpu", num_threads=args.threads)
    read_out = build_classifier_evaluator(lambda: test_batches, cpu, names=list(FASHION_MNIST_CLASSES))
    weak_knn = build_evaluator(weak_cfg, splits.train, splits.test, cpu, resize=SIDE, linear=True,
                               max_train=BANK)

    def weak_evaluator(encoder: nn.Module) -> dict:
        scores = read_out(nn.Sequential(encoder, weak.classifier))
        return weak_knn(encoder) | {"classifier_top1": scores["top1"]}

    weak_summary, weak_s = _train(weak, splits, weak_cfg, evaluator=weak_evaluator)

    keys = ("zero_shot_top1", "zero_shot_top5", "classifier_top1", "knn_top1", "linear_top1",
            *(f"{d}_r{k}" for d in ("image_to_text", "text_to_image") for k in (1, 5, 10)))
    setting = {"data": "fashion-mnist, synthetic captions", "caption_noise": args.noise,
               "threads": args.threads, "epochs": cfg.optim.epochs, "backbone": cfg.model.backbone,
               "knn_bank": BANK, "quick": args.quick}
    rows = []
    for name, summary, seconds in (("clip", clip_summary, clip_s), ("weak", weak_summary, weak_s)):
        row = {"method": name, "steps": summary["steps"], "train_seconds": round(seconds, 1),
               **{k: round(100 * summary[k], 2) for k in keys if k in summary}}
        rows.append(setting | row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    if args.results:
        write_rows(args.results / "clip_demo.jsonl", rows, env)
    return 0


def _eval_recipe():
    from fastssl.data import recipes

    return recipes.eval(size=SIDE, resize=SIDE)


if __name__ == "__main__":
    raise SystemExit(main())
