"""`fastssl finetune RUN --data SPEC --size S [key=value ...]`: full fine-tuning of a pre-trained
run's backbone at a resolution of its own, run by the Trainer as the `finetune` method
(fastssl.methods.finetune).

The backbone is the network the run evaluates (fastssl.engine.export.backbone_state_dict: DINO's
teacher, MAE's encoder, ...). At a new resolution a ViT's position embedding is resampled to
the new patch grid (timm's resample_abs_pos_embed, bicubic) and stored that way; a CNN takes
the larger images as they are (FixRes: train and test at the larger size). The head is new,
sized by the data's classes, so another dataset (a folder with other classes) is a transfer.
The configuration is a TrainConfig whose method part is FinetuneConfig, merged like
`train`'s (defaults < FinetuneConfig.defaults < preset < YAML < key=value); the keys that the
run and the data decide (RUN_KEYS) are refused as overrides."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fastssl.config import MAX_SIDE, TrainConfig
from fastssl.data.spec import FASHION_MNIST
from fastssl.engine.config import resolve_config
from fastssl.engine.export import backbone_state_dict
from fastssl.engine.run import init_run
from fastssl.engine.run_folder import SUMMARY
from fastssl.engine.trainer import Trainer
from fastssl.methods.finetune import Finetune, FinetuneConfig
from fastssl.models.backbones import build_backbone, is_vit_name, parse_vit_name
from fastssl.runs import load_trained_method
from fastssl.validation import check_int

# Decided by the pre-trained run and the data, not by the user.
RUN_KEYS = ("backbone", "vit_depth", "source", "image_size", "pretrained", "pretrain_size", "num_classes")
# Named fine-tuning layers between FinetuneConfig.defaults and YAML, by data spec: Fashion-MNIST
# on a CPU (a few epochs of 60,000 small images), the learning rate of MAE's recipe per 256 images.
PRESETS = {FASHION_MNIST: dict(batch_size=128, epochs=4, warmup_epochs=0.5, num_threads=2)}
TRAIN_SCALE = (0.25, 1.0)  # RandomResizedCrop area range of the fine-tuning view (views={scale: ...})


def resample_position_embedding(pos_embed: torch.Tensor, size: int, patch: int, *,
                                num_prefix_tokens: int = 1) -> torch.Tensor:
    """[1, p + g0^2, D] -> [1, p + g^2, D] with g = size // patch: the patch grid's embedding
    resampled bicubically (timm's resample_abs_pos_embed), the p prefix rows (the class token's;
    none for a ViT with registers) kept."""
    from timm.layers import resample_abs_pos_embed

    grid = size // patch
    if pos_embed.shape[1] - num_prefix_tokens == grid * grid:
        return pos_embed
    return resample_abs_pos_embed(pos_embed, new_size=[grid, grid], num_prefix_tokens=num_prefix_tokens)


def check_size(size: Any, backbone: str) -> int:
    """The fine-tuning side: an int in [1, MAX_SIDE], a multiple of a ViT's patch."""
    size = check_int("--size", size, low=1, high=MAX_SIDE)
    if is_vit_name(backbone):
        patch = parse_vit_name(backbone)[1] or 16
        if size % patch:
            raise ValueError(f"--size: the {backbone} backbone has {patch}-pixel patches; expected a "
                             f"multiple of {patch}, got {size}")
    return size


def build_network(pre_cfg: TrainConfig, size: int, *, state: dict[str, torch.Tensor] | None,
                  drop_path_rate: float = 0.0) -> tuple[nn.Module, int, bool]:
    """(backbone, feature dim, is a ViT) of the pre-trained run's architecture for `size`-pixel
    inputs, loaded with `state` (the run's backbone_state_dict; None: random init). A ViT is
    built at `size` with its position embedding resampled; a CNN keeps the stem of its
    pre-training size."""
    name, pre_size = pre_cfg.model.backbone, pre_cfg.data.image_size
    vit = is_vit_name(name)
    if vit:
        backbone, dim = build_backbone(name, size, depth=pre_cfg.model.vit_depth,
                                       drop_path_rate=drop_path_rate, reg_tokens=pre_cfg.model.vit_reg_tokens)
    else:
        backbone, dim = build_backbone(name, pre_size)  # the stem the run was built with
    if state is not None:
        state = dict(state)
        if vit:
            patch = parse_vit_name(name)[1] or 16
            prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
            state["pos_embed"] = resample_position_embedding(state["pos_embed"], size, patch,
                                                             num_prefix_tokens=prefix)
        backbone.load_state_dict(state, strict=True)
    return backbone, dim, vit


def _labels(source) -> np.ndarray:
    return np.asarray(source.labels)


def finetune_config(pre_cfg: TrainConfig, run: str, data: str, size: int, num_classes: int,
                    overrides: dict[str, Any] | None = None, yaml_path: str | None = None,
                    preset: dict[str, Any] | None = None) -> TrainConfig:
    """The fine-tuning TrainConfig: the user's layers, then what the run and data decide."""
    overrides = dict(overrides or {})
    for key in overrides:
        if key.rpartition(".")[2] in RUN_KEYS:
            raise ValueError(f"{key}={overrides[key]}: set by the pre-trained run, --data and --size; "
                             f"not an override of finetune")
    overrides |= {"backbone": pre_cfg.model.backbone, "vit_depth": pre_cfg.model.vit_depth, "source": data,
                  "image_size": size, "pretrained": str(run), "pretrain_size": pre_cfg.data.image_size,
                  "num_classes": num_classes}
    return resolve_config(FinetuneConfig, yaml_path, overrides, preset=preset)


def finetune(run: str | Path, data: str | None, size: int | None, overrides: dict[str, Any] | None = None, *,
             yaml_path: str | None = None, preset: dict[str, Any] | None = None, resume: str | None = None,
             overwrite: bool = False, progress: bool = True,
             log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fine-tune RUN's backbone on `data` (a fastssl.data spec with labelled train and test
    splits; None: the run's own) at `size` pixels (None: the pre-training size). Returns the
    summary (also OUT/summary.json): top1, top5 and confused_pairs of the test split, the
    run's pre-training size and method, the Trainer's fields. init=random in the overrides
    trains the same network from random init. preset: a layer below the YAML file and the
    overrides (None: PRESETS of the data, if any)."""
    from fastssl.data import build_loader, check_data_spec, data_splits, recipes, resolve_loader

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    pre_method, meta = load_trained_method(run)
    pre_cfg = pre_method.cfg
    size = check_size(pre_cfg.data.image_size if size is None else size, pre_cfg.model.backbone)
    data = check_data_spec(data or pre_cfg.data.source)
    preset = PRESETS.get(data) if preset is None else preset
    splits = data_splits(data)
    train_src, test_src = splits.train, splits.test
    if train_src is None or test_src is None:
        raise ValueError(f"--data: {data!r} has no labelled train and test splits to fine-tune and score on "
                         f"({'; '.join(splits.notes) or 'no labels'})")
    num_classes = int(max(_labels(train_src).max(), _labels(test_src).max())) + 1
    cfg = finetune_config(pre_cfg, run, data, size, num_classes, overrides, yaml_path, preset)
    m = cfg.method
    state = backbone_state_dict(pre_method) if m.init == "pretrained" else None
    torch.manual_seed(cfg.run.seed)
    backbone, dim, vit = build_network(pre_cfg, size, state=state, drop_path_rate=cfg.model.drop_path_rate)
    context = init_run(cfg)
    if m.mixing and cfg.data.rank_batch_size % 2:
        raise ValueError(f"batch_size: mixup / cutmix pair each image with another; expected an even batch "
                         f"per process, got {cfg.data.rank_batch_size}")
    method = Finetune(cfg, backbone, dim, vit=vit)
    loader, device = resolve_loader(cfg.data.loader, cfg.data.data_device, train_device=context.device)
    options = dict(loader=loader, device=device, num_threads=cfg.data.num_threads)
    view = recipes.ViewSpec(size=size, scale=TRAIN_SCALE, flip_p=0.5)
    recipe = recipes.with_view_overrides(recipes.Recipe("finetune", [view]), cfg.data.views)
    loader = build_loader(train_src, recipe, batch_size=cfg.data.rank_batch_size, shard_id=context.rank,
                          num_shards=context.world, seed=cfg.run.seed, drop_last=True,
                          max_skipped_fraction=cfg.data.max_skipped_fraction, **options)
    # Built-in Fashion-MNIST is 28 px: the whole image resized to `size`, no crop margin.
    eval_recipe = recipes.eval(size=size, resize=size if data == FASHION_MNIST else None)

    def test_batches():
        return build_loader(test_src, eval_recipe, batch_size=256, seed=cfg.run.seed, drop_last=False,
                            shuffle=False, **options)

    from fastssl.eval.classify import build_classifier_evaluator

    evaluator = build_classifier_evaluator(test_batches, context.device,
                                           names=getattr(test_src, "classes", None),
                                           channels_last=cfg.model.channels_last)
    record = {"pretrained": str(run), "pretrain_method": meta["method"], "pretrain_step": meta["step"],
              "init": m.init, "pretrain_size": pre_cfg.data.image_size, "size": size,
              "num_classes": num_classes, "data": data}

    def on_summary(out: Path, summary: dict[str, Any]) -> None:
        summary.update(record)
        (out / SUMMARY).write_text(json.dumps(summary, indent=2) + "\n")

    log(f"finetune: {meta['method']} {pre_cfg.model.backbone} ({m.init} init) from "
        f"{pre_cfg.data.image_size} px to {size} px, {num_classes} classes, {len(loader)} steps/epoch")
    trainer = Trainer(method, loader, evaluator=evaluator, resume=resume, progress=progress, log=log,
                      overwrite=overwrite, run=context, on_summary=on_summary)
    # The new head starts as a uniform guess: no "before training" pass over the test split.
    trainer.extra.setdefault("knn_random_init", {})
    summary = trainer.fit()
    summary.update(record)
    return summary


def summary_lines(summary: dict[str, Any]) -> list[str]:
    """The printed result: top-1 / top-5 and the most-confused pairs."""
    if "top1" not in summary:
        return [f"finetune: stopped after {summary['steps']} steps ({summary.get('interrupted', '')})"]
    lines = [f"finetune {summary['pretrain_method']} {summary['backbone']} ({summary['init']} init, "
             f"{summary['pretrain_size']} -> {summary['size']} px, {summary['steps']} steps): "
             f"top-1 {summary['top1']:.2%}, top-5 {summary['top5']:.2%} on {summary['test_images']} images"]
    pairs = summary.get("confused_pairs") or []
    if pairs:
        lines.append("most confused: " + "; ".join(
            f"{p['true']} -> {p['predicted']} {p['count']} ({p['fraction']:.1%})" for p in pairs))
    return lines


def finetune_command(run: str, data: str | None, size: int | None, items: list[str], *,
                     yaml_path: str | None = None, resume: str | None = None, overwrite: bool = False) -> int:
    """`fastssl finetune`: the key=value `items` as overrides (train's mechanism), the data's
    preset (PRESETS) below them. Prints the summary lines on rank 0; returns 0."""
    from fastssl.engine.config import parse_overrides

    if overwrite and resume:
        raise ValueError(f"--overwrite and --resume {resume}: give one (replace the run or continue it)")
    summary = finetune(run, data, size, parse_overrides(items), yaml_path=yaml_path, resume=resume,
                       overwrite=overwrite)
    if summary.get("world_size", 1) == 1 or torch.distributed.get_rank() == 0:
        print("\n".join(summary_lines(summary)), flush=True)
    return 0
