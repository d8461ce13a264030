"""Helpers shared by the method modules."""

from __future__ import annotations

import torch
from torch import nn

from fastssl.config import TrainConfig
from fastssl.models import build_backbone
from fastssl.models.backbones import is_vit_name

# The papers' SGD (momentum 0.9): MoCo v2, InstDisc, RotNet, context prediction, the weak method.
SGD = dict(optimizer="sgd", momentum=0.9)


def backbone_from_config(cfg: TrainConfig, *, drop_path_rate: float | None = None) -> tuple[nn.Module, int]:
    """build_backbone(backbone, image_size) with the model's ViT options (vit_depth, vit_reg_tokens
    and drop_path_rate, or `drop_path_rate` given here, e.g. 0 for a teacher) when it is a ViT."""
    model = cfg.model
    options = {}
    if is_vit_name(model.backbone):
        rate = model.drop_path_rate if drop_path_rate is None else drop_path_rate
        if model.vit_depth:
            options["depth"] = model.vit_depth
        if model.vit_reg_tokens:
            options["reg_tokens"] = model.vit_reg_tokens
        if rate:
            options["drop_path_rate"] = rate
    return build_backbone(model.backbone, cfg.data.image_size, **options)


def check_views(batch: dict, count: int, method: str) -> list:
    """The batch's views list, or a ValueError saying how many the method needs."""
    views = batch.get("views") if isinstance(batch, dict) else None
    if not isinstance(views, (list, tuple)) or len(views) < count:
        got = "no 'views' list" if not isinstance(views, (list, tuple)) else f"{len(views)} views"
        raise ValueError(f"{method} needs batch['views'] with at least {count} views, got {got}")
    return list(views)


def step_generator(cfg: TrainConfig, ctx, device) -> torch.Generator:
    """A generator seeded by the run's seed, the step, the micro-step and the rank: a method's own
    draws (patch positions, sampled negatives) repeat exactly on a resumed run, and differ by rank.
    On the meta device (a model whose FLOPs are counted), a CPU generator: meta draws take any."""
    from fastssl.distributed import get_rank

    seed = cfg.run.seed * 1_000_003 + ctx.step * 1_009 + ctx.micro_step * 17 + get_rank()
    device = torch.device(device)
    return torch.Generator("cpu" if device.type == "meta" else device).manual_seed(seed % (2**63 - 1))
