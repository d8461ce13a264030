"""Context prediction (Doersch, Gupta, Efros 2015, "Unsupervised Visual Representation Learning
by Context Prediction"): the crop is divided into a 3x3 grid of cells; the patch of the centre cell
and the patch of one of its 8 neighbours go through one backbone (siamese, shared weights), and
an MLP on their concatenated features predicts where the neighbour lies (8 classes).

Guards against trivial solutions (sec. 3.1): a gap between patches (a patch is the cell less
`gap` pixels) and a jitter of each patch by up to `jitter` pixels per axis, so that edges and
textures continuing across the border cannot give the position away; chromatic aberration
(lenses shift green and magenta in opposite directions, which points toward the image centre)
is removed by `aberration` = "drop" (per patch, two random colour channels replaced by Gaussian
noise of std 0.01, the data being normalised) or "project" (colours projected off the
green-magenta axis (-1, 2, -1)).

Labels (the paper's Fig. 2 order): 0 top-left, 1 top, 2 top-right, 3 left, 4 right,
5 bottom-left, 6 bottom, 7 bottom-right.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from fastssl.config import MethodConfig, setting
from fastssl.method import Method, StepContext, TrainConfig
from fastssl.methods import register
from fastssl.methods._common import SGD, check_views, step_generator

# (row, col) offsets from the centre cell, label k = NEIGHBOURS[k]
NEIGHBOURS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
ABERRATION_GUARDS = ("drop", "project", "none")
GREEN_MAGENTA = (-1.0, 2.0, -1.0)


@dataclass
class ContextConfig(MethodConfig):
    name: ClassVar[str] = "context"
    # The paper: 96 px patches with gaps of 48 and jitter of up to 7 px, cut from ImageNet images
    # (here: cells of 144 px of a 432 px crop), an AlexNet-style network, SGD with batch normalisation.
    defaults: ClassVar[dict] = dict(SGD, backbone="resnet18", image_size=432, epochs=100, batch_size=256,
                                    base_lr=0.1, lr_batch_divisor=256, weight_decay=5e-4)
    gap: int = setting(48, "pixels of a cell left out of its patch (half on each side before jitter)", low=0,
                       high=4096)
    jitter: int = setting(7, "a patch moves by up to this many pixels per axis (<= gap / 2)", low=0,
                          high=4096)
    aberration: str = setting("drop", "guard against chromatic aberration", choices=ABERRATION_GUARDS)
    head_hidden_dim: int = setting(4096, "width of the MLP on the concatenated pair", low=1, high=65536)


@register
class ContextPrediction(Method, config=ContextConfig):
    # Fashion-MNIST upsampled to 48 px: 16 px cells, 12 px patches (gap 4, jitter up to 2). Grayscale has
    # no chromatic aberration to hide, and dropped channels would only make the patches unlike the whole
    # images kNN sees: no guard. kNN sees the images at the 48 px the patches were cut from: at 28 px
    # every object is half the size the network learned its parts at.
    presets = {"fashion-mnist": dict(backbone="resnet8", image_size=48, batch_size=128, epochs=3, gap=4,
                                     jitter=2, head_hidden_dim=256, aberration="none", channels_last=True)}

    def __init__(self, cfg: TrainConfig):
        super().__init__(cfg)
        m = cfg.method
        self.cell = cfg.data.image_size // 3
        self.patch = self.cell - m.gap
        if self.patch < 1 or 2 * m.jitter > m.gap:
            raise ValueError(f"gap/jitter: a cell of image_size / 3 = {self.cell} px needs "
                             f"gap < {self.cell} and "
                             f"jitter <= gap / 2, got gap={m.gap}, jitter={m.jitter}")
        from fastssl.models import build_backbone

        self.backbone, width = build_backbone(cfg.model.backbone, self.patch)
        self.head = nn.Sequential(nn.Linear(2 * width, m.head_hidden_dim), nn.BatchNorm1d(m.head_hidden_dim),
                                  nn.ReLU(inplace=True), nn.Linear(m.head_hidden_dim, len(NEIGHBOURS)))

    def encoder(self) -> nn.Module:
        return self.backbone

    def forward(self, batch: dict, ctx: StepContext) -> dict[str, torch.Tensor]:
        (images,) = check_views(batch, 1, self.name)[:1]
        g = step_generator(self.cfg, ctx, images.device)
        centre, other, label = sample_pairs(images, gap=self.cfg.method.gap, jitter=self.cfg.method.jitter,
                                            generator=g)
        pair = self.remove_aberration(torch.cat([centre, other]), g)
        features = self.backbone(pair).chunk(2)
        logits = self.head(torch.cat(features, 1))
        loss = F.cross_entropy(logits.float(), label)
        return {"loss": loss, "position_accuracy": (logits.argmax(1) == label).float().mean().detach()}

    def remove_aberration(self, patches: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        mode = self.cfg.method.aberration
        if mode == "project":
            axis = F.normalize(patches.new_tensor(GREEN_MAGENTA), dim=0).view(1, 3, 1, 1)
            return patches - (patches * axis).sum(1, keepdim=True) * axis
        if mode == "drop":
            n = patches.shape[0]
            keep = torch.randint(3, (n,), device=patches.device, generator=generator)
            noise = 0.01 * torch.randn(patches.shape, device=patches.device, generator=generator,
                                       dtype=patches.dtype)
            kept = F.one_hot(keep, 3).to(patches.dtype).view(n, 3, 1, 1)
            return patches * kept + noise * (1 - kept)
        return patches


def sample_pairs(images: torch.Tensor, *, gap: int, jitter: int,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centre patches, neighbour patches, labels) of images [B, C, S, S]: cells of S // 3 px, a
    patch = cell - gap px placed at its cell's offset gap // 2, then moved by an independent uniform
    shift in [-jitter, jitter] per axis; the neighbour is one of the 8 cells, uniformly (its label)."""
    b, _, size, _ = images.shape
    cell = size // 3
    patch = cell - gap
    dev = images.device
    label = torch.randint(len(NEIGHBOURS), (b,), device=dev, generator=generator)
    offsets = torch.tensor(NEIGHBOURS, device=dev)[label]                  # [B, 2] (row, col)
    shift = torch.randint(-jitter, jitter + 1, (2, b, 2), device=dev, generator=generator)
    base = cell + gap // 2
    corners = [base + shift[0], base + offsets * cell + shift[1]]           # top-left (y, x) of each patch
    step = torch.arange(patch, device=dev)
    rows = torch.arange(b, device=dev).view(b, 1, 1)
    out = []
    for corner in corners:
        ys = (corner[:, 0:1] + step).view(b, patch, 1)
        xs = (corner[:, 1:2] + step).view(b, 1, patch)
        out.append(images.permute(0, 2, 3, 1)[rows, ys, xs].permute(0, 3, 1, 2).contiguous())
    return out[0], out[1], label
