"""Projection / prediction heads of MoCo v2, MoCo v3, SimCLR and DINO, DINO's multi-crop wrapper, and the
split BatchNorm that simulates MoCo's shuffling BN in one process."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def moco_v2_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128) -> nn.Sequential:
    """MoCo v2's MLP head (Chen et al. 2020, "Improved baselines"): Linear-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))


def moco_v3_mlp(
    num_layers: int, in_dim: int, hidden_dim: int, out_dim: int, last_bn: bool = True
) -> nn.Sequential:
    """MoCo v3's projector / predictor (Chen, Xie, He 2021): bias-free Linear layers, BN + ReLU
    between them, and a BN without affine after the last one when `last_bn`."""
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        last = i == num_layers - 1
        layers.append(nn.Linear(d_in, out_dim if last else hidden_dim, bias=False))
        if not last:
            layers += [nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            # MoCo v3 keeps the last BN free of affine parameters (its sec. 4 / official code)
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def simclr_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 128,
                num_layers: int = 2) -> nn.Sequential:
    """SimCLR's projection head g(h) = W2 σ(W1 h) (Chen et al. 2020; 3+ layers for SimCLR v2) with a
    BatchNorm after every Linear, the last one affine (as the official TF code and lightly's
    SimCLRProjectionHead do); the Linear layers carry no bias since a BatchNorm follows them."""
    dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers += [nn.Linear(d_in, d_out, bias=False), nn.BatchNorm1d(d_out)]
        if i < num_layers - 1:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class DINOHead(nn.Module):
    """DINO head (Caron et al. 2021): a 3-layer MLP (GELU) to an L2-normalized bottleneck, then
    a weight-normalized linear layer to `out_dim` prototypes.

    x [B, in_dim] -> logits [B, out_dim]. With norm_last_layer the weight-norm gain g is fixed at
    1 (so each prototype is a unit vector), which the paper finds stabilises training.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_bn: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(num_layers):
            d_in = in_dim if i == 0 else hidden_dim
            last = i == num_layers - 1
            layers.append(nn.Linear(d_in, bottleneck_dim if last else hidden_dim))
            if not last:
                layers += ([nn.BatchNorm1d(hidden_dim)] if use_bn else []) + [nn.GELU()]
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_trunc_normal_init)
        last = nn.Linear(bottleneck_dim, out_dim, bias=False)
        self.last_layer = nn.utils.parametrizations.weight_norm(last)
        gain = self.last_layer.parametrizations.weight.original0
        gain.data.fill_(1.0)
        gain.requires_grad = not norm_last_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)
        return self.last_layer(x)


def _trunc_normal_init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class MultiCropWrapper(nn.Module):
    """Runs the backbone once per run of same-resolution crops (the crops of a run are
    concatenated along the batch), then the head once on all features.

    crops: list of [B, 3, h_i, w_i] -> [len(crops)*B, out_dim], crop-major (crop 0's B rows
    first), the layout DINOLoss expects.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        features, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics come from `splits` sub-batches (samples i with
    i % splits == s), each normalized on its own, as `splits` GPUs would; eval mode is plain BN.

    This is how the official MoCo CIFAR demo simulates multi-GPU shuffling BN in one process:
    with the key batch shuffled, a query and its positive key see different statistics, which
    removes the batch-statistics shortcut (He et al. 2020, sec. 3.3)."""

    def __init__(self, num_features: int, splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        if not isinstance(splits, int) or splits < 1:
            raise ValueError(f"splits must be an int >= 1, got {splits!r}")
        self.splits = splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.splits == 1 or not self.track_running_stats:
            return super().forward(x)
        N, C, H, W = x.shape
        if N % self.splits:
            raise ValueError(f"batch size must be a multiple of splits={self.splits}, got {N}")
        s = self.splits
        # sample a*s + b lands in channel block b: one batch_norm call normalizes each split alone
        mean, var = self.running_mean.repeat(s), self.running_var.repeat(s)
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        # momentum None means a cumulative average in BatchNorm
        factor = self.momentum if self.momentum is not None else 1.0 / (int(self.num_batches_tracked) + 1)
        out = F.batch_norm(x.reshape(N // s, s * C, H, W), mean, var, weight, bias, True, factor, self.eps)
        with torch.no_grad():
            self.running_mean.copy_(mean.view(s, C).mean(0))
            self.running_var.copy_(var.view(s, C).mean(0))
            self.num_batches_tracked.add_(1)
        return out.view(N, C, H, W)


def split_batch_norm_(module: nn.Module, splits: int) -> nn.Module:
    """Replace every BatchNorm2d in `module` (in place) by a SplitBatchNorm2d with the same state."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d) and not isinstance(child, SplitBatchNorm2d):
            bn = SplitBatchNorm2d(child.num_features, splits, eps=child.eps, momentum=child.momentum,
                                  affine=child.affine, track_running_stats=child.track_running_stats)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            split_batch_norm_(child, splits)
    return module
