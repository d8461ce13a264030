"""Colorization (Zhang, Isola, Efros 2016, "Colorful Image Colorization"): from the L channel of
CIELab the network predicts, at each position of its last feature map, a distribution over the
in-gamut ab bins; the loss is the class-rebalanced cross-entropy against soft-encoded targets
(fastssl.losses.colorization holds the colour space, bins, targets, weights and decoding).

The backbone sees L only: `encoder()` is the backbone behind a LightnessInput that turns the
normalised RGB images every loader yields into (L - 50) / 50 on three channels, so kNN evaluates
what colorization trained. The rebalancing prior is the training set's ab histogram, read once in
bind_data and saved in the state dict. Grayscale data is refused: with a = b = 0 everywhere there
is nothing to predict. CNN backbones only (the head reads the last convolutional map).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.losses.colorization import (
    ab_bins,
    ab_histogram,
    annealed_mean,
    colorization_loss,
    rebalance_weights,
    rgb_to_lab,
    soft_encode,
)
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import backbone_from_config, check_views
from fastssl.models.backbones import CifarResNet, is_vit_name

PRIOR_IMAGES = 2_000  # images whose pixels estimate the ab prior (the paper uses ImageNet's training set)


@dataclass
class ColorizationConfig(MethodConfig):
    name: ClassVar[str] = "colorization"
    # The paper trains at 176 px crops with Adam (lr 3e-5, betas (0.9, 0.99), weight decay 1e-3).
    defaults: ClassVar[dict] = dict(backbone="resnet18", image_size=176, epochs=30, batch_size=40,
                                    base_lr=3e-5, lr_batch_divisor=40, weight_decay=1e-3, optimizer="adamw",
                                    betas=(0.9, 0.99))
    soft_neighbours: int = setting(5, "bins a target pixel is spread over", low=1, high=313)
    soft_sigma: float = setting(5.0, "sigma of the soft encoding's Gaussian (ab units)", low=0, low_open=True,
                                high=1e3)
    prior_sigma: float = setting(5.0, "sigma smoothing the empirical ab prior", low=0, low_open=True,
                                 high=1e3)
    rebalance: float = setting(0.5, "lambda: prior mixed with the uniform; 1 = no rebalancing", low=0, high=1)
    decode_temperature: float = setting(0.38, "T of the annealed-mean decoding (pictures)", low=0,
                                        low_open=True,
                                        high=100)


class LightnessInput(nn.Module):
    """backbone((L - 50) / 50 on 3 channels) of normalised RGB images [B, 3, H, W]."""

    def __init__(self, backbone: nn.Module, mean, std):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def lightness(self, images: torch.Tensor) -> torch.Tensor:
        rgb = (images.float() * self.std + self.mean).clamp(0, 1)
        return (rgb_to_lab(rgb)[:, :1] - 50) / 50

    def forward(self, images: torch.Tensor, *, dense: bool = False) -> torch.Tensor:
        x = self.lightness(images).expand(-1, 3, -1, -1).to(images.dtype)
        return last_map(self.backbone, x) if dense else self.backbone(x)


def last_map(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The last convolutional map [B, C, h, w] of a CIFAR or torchvision ResNet."""
    if isinstance(backbone, CifarResNet):
        return backbone.stages(backbone.stem(x))
    b = backbone
    x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
    return b.layer4(b.layer3(b.layer2(b.layer1(x))))


@register
class Colorization(Method, config=ColorizationConfig):
    default_data = "colour-shapes"
    # The generated colour set's 32 px images on a 2-core CPU: the CIFAR ResNet-8 (an 8x8 last map).
    presets = {"colour-shapes": dict(backbone="resnet8", image_size=32, batch_size=64, epochs=3,
                                     optimizer="adamw", base_lr=1e-3, lr_batch_divisor=64, weight_decay=1e-4,
                                     channels_last=True)}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        if is_vit_name(cfg.model.backbone):
            raise ValueError(f"backbone: colorization predicts colours on a convolutional map; "
                             f"expected a ResNet, "
                             f"got {cfg.model.backbone!r}")
        backbone, feature_dim = backbone_from_config(cfg)
        recipe = self.recipe()
        self.net = LightnessInput(backbone, recipe.mean, recipe.std)
        width = feature_dim // getattr(backbone, "pool", 1) ** 2  # channels of the last map
        self.register_buffer("bins", ab_bins())
        self.head = nn.Conv2d(width, self.bins.shape[0], 1)
        # Uniform until bind_data reads the training set's prior (weights all 1: no rebalancing).
        self.register_buffer("weights", torch.ones(self.bins.shape[0]))

    def bind_data(self, source) -> None:
        """Rebalancing weights from the ab histogram of up to PRIOR_IMAGES images of `source`."""
        images = sample_rgb(source, PRIOR_IMAGES)
        if _is_grayscale(images):
            raise ValueError("--data: colorization needs colour images; this data is grayscale (a = b = 0 "
                             "everywhere, e.g. Fashion-MNIST), so there is no colour to predict: use colour "
                             "images, e.g. --data colour-shapes (the default)")
        counts = sum(ab_histogram(rgb_to_lab(x)[:, 1:], self.bins.cpu()) for x in images.split(256))
        m = self.cfg.method
        self.weights.copy_(rebalance_weights(counts, self.bins.cpu(), sigma=m.prior_sigma, lam=m.rebalance))

    def encoder(self) -> nn.Module:
        return self.net

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        (images,) = check_views(batch, 1, self.name)[:1]
        logits = self.head(self.net(images, dense=True))
        target = self.targets(images, logits.shape[-2:])
        return {"loss": colorization_loss(logits, target, self.weights)}

    @torch.no_grad()
    def targets(self, images: torch.Tensor, size) -> torch.Tensor:
        """Soft-encoded ab of the images, averaged down to the logits' map size."""
        rgb = (images.float() * self.net.std + self.net.mean).clamp(0, 1)
        ab = F.adaptive_avg_pool2d(rgb_to_lab(rgb)[:, 1:], size)
        m = self.cfg.method
        return soft_encode(ab, self.bins, k=m.soft_neighbours, sigma=m.soft_sigma)

    @torch.no_grad()
    def colourise(self, images: torch.Tensor) -> torch.Tensor:
        """sRGB [B, 3, H, W] in [0, 1]: the images' own L with the annealed-mean ab, upsampled."""
        from fastssl.losses.colorization import lab_to_rgb

        logits = self.head(self.net(images, dense=True))
        ab = annealed_mean(logits, self.bins, self.cfg.method.decode_temperature)
        lightness = self.net.lightness(images) * 50 + 50
        ab = F.interpolate(ab, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return lab_to_rgb(torch.cat([lightness, ab], 1))


def sample_rgb(source, count: int) -> torch.Tensor:
    """Up to `count` images of `source` spread over it, as float RGB [n, 3, H, W] in [0, 1] (array
    sources) or each resized to 64 px (files)."""
    picks = np.linspace(0, len(source) - 1, num=min(count, len(source))).astype(int)
    if source.kind == "array":
        pixels = np.stack([source.image(int(i)) for i in picks])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255
    import io

    from PIL import Image

    out = []
    for i in picks:
        data = source.read_bytes(int(i)).tobytes()
        with Image.open(io.BytesIO(data)) as img:
            out.append(np.asarray(img.convert("RGB").resize((64, 64))))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).float() / 255


def _is_grayscale(images: torch.Tensor) -> bool:
    return bool((images.amax(1) - images.amin(1)).max() < 2 / 255)
