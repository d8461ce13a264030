"""An evaluator of a run: kNN (and optionally a linear probe) of an encoder's frozen features
on labelled train (memory bank) and test sources, over the whole splits or a fixed subsample
(the cheap kNN that tracks a run while it trains)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from fastssl.distributed import all_gather_rows, all_reduce_sum_, comm_device, get_rank, get_world_size
from fastssl.eval.features import extract_features
from fastssl.eval.knn import knn_top1
from fastssl.eval.linear import linear_probe

Evaluator = Callable[[nn.Module], dict[str, float]]

KNN_K, KNN_TEMPERATURE = 20, 0.07  # DINO's weighted kNN
KNN_WIDE = (200, 0.1)  # InstDisc's and lightly's benchmark kNN: (k, temperature)


class FixedIndices:
    """A loader sampler that yields the same dataset indices every epoch (a fixed subsample)."""

    def __init__(self, indices: np.ndarray):
        self.indices = indices

    def set_epoch(self, epoch: int) -> None:
        pass

    def __iter__(self):
        return iter(self.indices.tolist())


def subsample_indices(n: int, size: int | None, seed: int) -> np.ndarray | None:
    """`size` distinct indices of range(n), sorted, drawn with `seed` (the same on every call);
    None when the whole split is asked for (size None or >= n)."""
    if size is None or size >= n:
        return None
    if size < 1:
        raise ValueError(f"subsample size: expected >= 1, got {size}")
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False))


def check_knn_labels(source, split: str) -> None:
    """kNN needs at least two classes: with one, every prediction is right and the 100% means
    nothing. Raises ValueError naming the split and the way to train without evaluation."""
    classes = np.unique(np.asarray(source.labels))
    if len(classes) < 2:
        raise ValueError(f"kNN evaluation: the {split} split has {len(classes)} class(es) "
                         f"({len(source)} images), so every prediction would be right; it needs labelled "
                         f"class folders (at least 2), or pass eval_knn=false to pretrain without evaluation")


def build_evaluator(cfg, train_source, test_source, device: torch.device, *, resize: int | None = None,
                    linear: bool = False, max_train: int | None = None, max_test: int | None = None,
                    progress: bool = True, wide_knn: bool = False) -> Evaluator:
    """Callable(encoder) -> {"knn_top1": ..., ["knn_top1_k200"], ["linear_top1", "linear_train_top1"]}.

    Features of `train_source` (the kNN memory bank) and `test_source` through the eval recipe
    (cfg.eval_side; `resize` first resizes the whole image to it, no crop margin), with the run's
    data loader and threads. max_train / max_test: a fixed subsample of each split, drawn with
    cfg.run.seed (the same images at every call, so successive calls are comparable). kNN top-1 with
    k = 20 (fewer for a smaller memory bank), T = 0.07; wide_knn adds "knn_top1_k200" (KNN_WIDE: k = 200,
    T = 0.1) from the same features. progress: bars on stderr for each pass.
    Raises ValueError for a split with fewer than two classes.

    Called on every rank of a distributed run: each rank extracts the features of its share of
    both splits (every world-th image), the train shares are gathered into the whole memory
    bank, each rank scores its test share and the counts are summed, so no rank idles in a
    collective while another runs the whole extraction. The linear probe (on all features) runs
    on rank 0 only; the other ranks' results hold the kNN alone."""
    from fastssl.data import build_loader, recipes, resolve_loader

    check_knn_labels(train_source, "train")
    check_knn_labels(test_source, "test")
    recipe = recipes.eval(size=cfg.eval_side, resize=resize)
    kind, data_device = resolve_loader(cfg.data.loader, cfg.data.data_device, train_device=device)
    rank, world = get_rank(), get_world_size()
    progress = progress and rank == 0
    splits = []
    for name, source, size in (("train", train_source, max_train), ("test", test_source, max_test)):
        indices = subsample_indices(len(source), size, cfg.run.seed)
        if world > 1:
            indices = (np.arange(len(source)) if indices is None else indices)[rank::world]
        splits.append((name, source, None if indices is None else FixedIndices(indices)))

    def evaluate(encoder: nn.Module) -> dict[str, float]:
        feats = {}
        for name, source, sampler in splits:
            loader = build_loader(source, recipe, batch_size=512, seed=cfg.run.seed, drop_last=False,
                                  shuffle=False, sampler=sampler, loader=kind,
                                  device=data_device, num_threads=cfg.data.num_threads)
            feats[name] = extract_features(encoder, loader, device, cfg.model.channels_last,
                                           progress=f"{name} features" if progress else None)
        bank = tuple(all_gather_rows(t) for t in feats["train"])
        n_test = len(feats["test"][1])
        settings = {"knn_top1": (KNN_K, KNN_TEMPERATURE)} | ({"knn_top1_k200": KNN_WIDE} if wide_knn else {})
        result = {}
        for key, (k, temperature) in settings.items():
            top1 = knn_top1(*bank, *feats["test"], k=min(k, len(bank[1])), temperature=temperature,
                            progress="kNN" if progress else None)
            if world > 1:
                counts = all_reduce_sum_(torch.tensor([round(top1 * n_test), n_test], dtype=torch.int64,
                                                      device=comm_device()))
                top1 = int(counts[0]) / int(counts[1])
            result[key] = top1
        if linear:
            test = tuple(all_gather_rows(t) for t in feats["test"])
            if rank == 0:
                result |= linear_probe(*bank, *test)
        return result

    return evaluate
