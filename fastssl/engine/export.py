"""A trained method's backbone alone, as one plain state dict that the backbone's own library
loads with strict=True (`fastssl export RUN --out backbone.pt`, through fastssl.runs).

The backbone is the network the method evaluates (`Method.encoder()`: DINO's teacher backbone,
MoCo's query encoder without projector, MAE's encoder without decoder, the weak method's trunk
without classifier). ViTs load into `timm.create_model(...)` (the printed call; MAE's encoder
included), torchvision ResNets into
`torchvision.models.resnetXX()` with `fc = Identity` (and the small stem when the run used one).
Both checkpoint formats are read: OUT/last.pt and the sharded OUT/last.dcp (any world size).
"""

from __future__ import annotations

import torch
from torch import nn

from fastssl.models import MAEEncoder
from fastssl.models.backbones import RESNETS, SMALL_IMAGE_MAX, VIT_SIZES, is_vit_name, parse_vit_name

# the ViT encoder inside an MAE model: everything but the decoder and the mask token
MAE_ENCODER_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# timm architectures of each ViT size (patch size, depth and image size are passed explicitly)
TIMM_NAMES = {size: f"vit_{size}_patch16_224" for size in ("tiny", "small", "base", "large")} | {
    "huge": "vit_huge_patch14_224", "giant": "vit_giant_patch14_dinov2"}


def backbone_state_dict(method: nn.Module) -> dict[str, torch.Tensor]:
    """The evaluated backbone's parameters and buffers under the backbone library's own names."""
    encoder = method.encoder()
    if isinstance(encoder, MAEEncoder):
        state = {k: v for k, v in encoder.mae.state_dict().items() if k.startswith(MAE_ENCODER_KEYS)}
    else:
        state = encoder.state_dict()
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def loader_code(cfg, reg_tokens: int = 0) -> str:
    """Python that builds the module the exported state dict loads into (strict=True); a ViT with
    `reg_tokens` registers has no position embedding for its class and register tokens."""
    if is_vit_name(cfg.model.backbone):
        size, patch = parse_vit_name(cfg.model.backbone)
        patch = patch or 16
        depth = cfg.model.vit_depth or VIT_SIZES[size][1]
        registers = f", reg_tokens={reg_tokens}, no_embed_class=True" if reg_tokens else ""
        return (f"timm.create_model('{TIMM_NAMES[size]}', pretrained=False, num_classes=0, "
                f"img_size={cfg.data.image_size}, patch_size={patch}, depth={depth}{registers})")
    if cfg.model.backbone in RESNETS:
        code = f"m = torchvision.models.{cfg.model.backbone}(); m.fc = torch.nn.Identity()"
        if cfg.data.image_size <= SMALL_IMAGE_MAX:
            code += ("; m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); "
                     "m.maxpool = torch.nn.Identity()")
        return code
    return f"fastssl.models.build_backbone({cfg.model.backbone!r}, {cfg.data.image_size})[0]"
