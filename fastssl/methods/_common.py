"""Helpers shared by the method modules."""

from __future__ import annotations

from torch import nn

from fastssl.models import build_backbone
from fastssl.models.backbones import is_vit_name


def backbone_from_config(cfg) -> tuple[nn.Module, int]:
    """build_backbone(cfg.backbone, cfg.image_size) with the config's ViT overrides
    (`vit_depth`, `drop_path_rate`) where the config has them and the backbone is a ViT."""
    options = {}
    if is_vit_name(cfg.backbone):
        if getattr(cfg, "vit_depth", None):
            options["depth"] = cfg.vit_depth
        if getattr(cfg, "drop_path_rate", 0.0):
            options["drop_path_rate"] = cfg.drop_path_rate
    return build_backbone(cfg.backbone, cfg.image_size, **options)


def check_views(batch: dict, count: int, method: str) -> list:
    """The batch's views list, or a ValueError saying how many the method needs."""
    views = batch.get("views") if isinstance(batch, dict) else None
    if not isinstance(views, (list, tuple)) or len(views) < count:
        got = "no 'views' list" if not isinstance(views, (list, tuple)) else f"{len(views)} views"
        raise ValueError(f"{method} needs batch['views'] with at least {count} views, got {got}")
    return list(views)
