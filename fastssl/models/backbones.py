"""Backbones: torchvision ResNets and timm ViTs, randomly initialised (no weight downloads).

`build_backbone(name, image_size)` returns `(module, feature_dim)`; the module maps
images [B, 3, H, W] to features [B, feature_dim] (ResNet: global-average-pooled last
stage, or for a CIFAR ResNet named with `_pool<P>` its last stage average-pooled to a P x P
grid; ViT: the class token after the final norm).
"""

from __future__ import annotations

import re

import torch
import torchvision
from timm.layers import SwiGLUPacked
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.resnet import BasicBlock

from fastssl.validation import check_int

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
# He et al. 2016's CIFAR ResNets (sec. 4.2): 6n+2 layers, 3 stages of 16/32/64 channels.
# Far cheaper than a ResNet-18 with the small stem (ResNet-20: ~41 MFLOPs vs ~560 at 32x32),
# which is what a CPU run on 32x32 images can afford.
CIFAR_RESNETS = {"resnet8": 1, "resnet14": 2, "resnet20": 3, "resnet32": 5, "resnet56": 9}
# ViT sizes of the ViT / DeiT papers, and DINOv2's giant ("vit_giant2"): (embed_dim, depth, num_heads).
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
             "large": (1024, 24, 16), "huge": (1280, 32, 16), "giant": (1536, 40, 24)}
# DINOv2's giant blocks: its fused SwiGLU feed-forward (hidden (int(4 D * 2 / 3) + 7) // 8 * 8 = 4096
# per half, both halves in one packed linear, the first half gated) and layer scale 1e-5, as timm's
# vit_giant_patch14_dinov2 builds them, so an exported giant loads into that architecture.
VIT_BLOCK_OPTIONS = {"giant": dict(mlp_ratio=2.66667 * 2, mlp_layer=SwiGLUPacked, act_layer=nn.SiLU,
                                   init_values=1e-5)}
SMALL_IMAGE_MAX = 64  # at or below this size a ResNet gets the CIFAR stem by default


def resnet(name: str, *, small_stem: bool = False, zero_init_residual: bool = False) -> tuple[nn.Module, int]:
    """A torchvision ResNet without its classifier (fc = Identity).

    small_stem: replace the 7x7/2 conv + max-pool with a 3x3/1 conv (the CIFAR variant of
    He et al. 2016), so 32x32 inputs keep a 4x4 map at the last stage instead of 1x1.
    """
    if name not in RESNETS:
        raise ValueError(f"resnet name must be one of {RESNETS}, got {name!r}")
    model = getattr(torchvision.models, name)(weights=None, zero_init_residual=zero_init_residual)
    if small_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    feature_dim = model.fc.in_features
    model.fc = nn.Identity()
    return model, feature_dim


class CifarResNet(nn.Module):
    """3x3 conv stem (16 ch), three stages of `blocks` BasicBlocks (16, 32, 64 ch; stride 1, 2, 2),
    then the last stage's map average-pooled to a `pool` x `pool` grid and flattened (channel-major):
    [B, 3, H, W] -> [B, 64 * width * pool**2]; pool=1 is global average pooling.

    Why pool > 1: on 28-32 px images the last map is 7x7-8x8, and global pooling throws away
    where a part is (a sleeve, a heel), which kNN on small centred objects relies on."""

    def __init__(self, blocks: int, width: int = 1, pool: int = 1):
        super().__init__()
        for name, value in (("width", width), ("pool", pool)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        c = 16 * width
        self.stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True)
        )
        stages, in_ch = [], c
        for i, out_ch in enumerate((c, 2 * c, 4 * c)):
            layers = []
            for j in range(blocks):
                stride = 2 if i > 0 and j == 0 else 1
                down = None
                if stride != 1 or in_ch != out_ch:
                    down = nn.Sequential(
                        nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch)
                    )
                layers.append(BasicBlock(in_ch, out_ch, stride, down))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
        self.stages = nn.Sequential(*stages)
        self.pool = pool
        self.feature_dim = in_ch * pool * pool
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))
        if self.pool == 1:
            return h.mean(dim=(2, 3))
        if min(h.shape[-2:]) < self.pool:
            raise ValueError(f"pool={self.pool} needs a last-stage map of at least {self.pool}x{self.pool}, "
                             f"got {tuple(h.shape[-2:])} (input {tuple(x.shape[-2:])})")
        return nn.functional.adaptive_avg_pool2d(h, self.pool).flatten(1)


def vit(
    size: str,
    *,
    image_size: int,
    patch_size: int = 16,
    depth: int | None = None,
    drop_path_rate: float = 0.0,
    reg_tokens: int = 0,
) -> tuple[nn.Module, int]:
    """A timm VisionTransformer (Tiny/Small/Base/Large/Huge, or DINOv2's Giant with its SwiGLU
    feed-forward) returning the class token [B, D].

    `dynamic_img_size=True` interpolates the position embedding, so one model takes the
    global and the local crops of multi-crop training (DINO). reg_tokens: register tokens
    (Darcet et al. 2024), appended after the class token; with registers the position embedding
    covers the patches only (timm's no_embed_class, its DINOv2-with-registers layout), since
    registers have no position.
    """
    if size not in VIT_SIZES:
        raise ValueError(f"ViT size must be one of {tuple(VIT_SIZES)}, got {size!r}")
    if image_size % patch_size != 0:
        raise ValueError(f"image_size must be a multiple of patch_size={patch_size}, got {image_size}")
    reg_tokens = check_int("reg_tokens", reg_tokens, low=0)
    dim, default_depth, heads = VIT_SIZES[size]
    model = VisionTransformer(
        img_size=image_size, patch_size=patch_size, embed_dim=dim, depth=depth or default_depth,
        num_heads=heads, num_classes=0, global_pool="token", dynamic_img_size=True,
        drop_path_rate=drop_path_rate, reg_tokens=reg_tokens, no_embed_class=reg_tokens > 0,
        **VIT_BLOCK_OPTIONS.get(size, {}),
    )
    return model, dim


_CIFAR_NAME = re.compile(r"^(resnet(?:" + "|".join(n[6:] for n in CIFAR_RESNETS) + r"))(?:_pool(\d+))?$")
_VIT_NAME = re.compile(r"^vit_(" + "|".join(VIT_SIZES) + r")(?:_patch(\d+))?$")


def is_vit_name(name: str) -> bool:
    return isinstance(name, str) and _VIT_NAME.match(name) is not None


def parse_vit_name(name: str) -> tuple[str, int | None]:
    """"vit_small_patch16" -> ("small", 16); "vit_tiny" -> ("tiny", None); ValueError otherwise."""
    match = _VIT_NAME.match(name) if isinstance(name, str) else None
    if match is None:
        raise ValueError(
            f"a ViT backbone name must look like vit_{{tiny,small,base,large,huge,giant}}[_patch<P>], "
            f"got {name!r}"
        )
    size, patch = match.groups()
    return size, None if patch is None else int(patch)


def build_backbone(name: str, image_size: int, **options) -> tuple[nn.Module, int]:
    """Backbone by name: "resnet18".."resnet152" (torchvision), "resnet{8,14,20,32,56}[_pool{P}]"
    (CIFAR ResNets, option `width`; _poolP: features = the last stage pooled to P x P), or
    "vit_{tiny,small,base,large,huge,giant}[_patch{P}]".

    torchvision ResNets take `small_stem` (default: image_size <= 64) and `zero_init_residual`; ViTs
    take `patch_size` (default 16, or the name's), `depth`, `drop_path_rate` and `reg_tokens`.
    Returns (module: [B, 3, H, W] -> [B, feature_dim], feature_dim).
    """
    if not isinstance(name, str):
        raise TypeError(f"backbone name must be a str, got {type(name).__name__}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if name in RESNETS:
        options.setdefault("small_stem", image_size <= SMALL_IMAGE_MAX)
        return resnet(name, **options)
    cifar = _CIFAR_NAME.match(name)
    if cifar is not None:
        base, pool = cifar.groups()
        if pool is not None:
            options.setdefault("pool", int(pool))
        model = CifarResNet(CIFAR_RESNETS[base], **options)
        return model, model.feature_dim
    if _VIT_NAME.match(name):
        size, patch = parse_vit_name(name)
        if patch is not None:
            options.setdefault("patch_size", patch)
        return vit(size, image_size=image_size, **options)
    raise ValueError(
        f"backbone must be one of {RESNETS} or resnet{{8,14,20,32,56}}[_pool<P>] or "
        f"vit_{{tiny,small,base,large,huge,giant}}[_patch<P>], got {name!r}"
    )


def is_vit(module: nn.Module) -> bool:
    return isinstance(module, VisionTransformer)

