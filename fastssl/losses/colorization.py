"""Colorization's colour space, output bins, targets and loss (Zhang, Isola, Efros 2016,
"Colorful Image Colorization").

- CIELab from sRGB (D65 white, the sRGB primaries' XYZ matrix of IEC 61966-2-1 as skimage
  uses it): `rgb_to_lab`, and back, `lab_to_rgb`.
- The output space: the ab plane quantised on a grid of step 10 (centres at multiples of 10),
  keeping the cells that are in gamut (`ab_bins`): a centre (a, b) is kept when some lightness
  L in [0, 100] makes (L, a, b) an sRGB colour with every channel in [0, 1]. This exact
  criterion keeps 229 centres, not the paper's 313: the paper's file (pts_in_hull) is a looser
  set (its name says a hull) holding centres no sRGB colour reaches; a cell-occupancy criterion
  (a cell kept when some 8-bit sRGB colour lies nearest its centre) gives 261.
- Soft-encoded targets: each pixel's ab spread over its 5 nearest bins with a Gaussian kernel
  of sigma 5, weights summing to 1 (`soft_encode`).
- Class rebalancing: the training set's empirical bin distribution p, smoothed by a Gaussian
  of sigma 5 over the ab plane (p~), mixed with the uniform (lambda = 0.5):
  w ∝ ((1 - lambda) p~ + lambda / Q)^-1, normalised so that E_p~[w] = sum_q p~_q w_q = 1
  (`rebalance_weights`).
- The loss: L = -sum_{h,w} v(Z_hw) sum_q Z_hwq log softmax(logits)_hwq with v(Z_hw) = w at the
  pixel's nearest bin (`colorization_loss`, a mean over pixels).
- Annealed-mean decoding: the mean of the ab bins under softmax(log p / T), T = 0.38
  (`annealed_mean`).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from fastssl.validation import check_int, check_number, check_tensor

# sRGB (linear) -> XYZ and the D65 reference white, as skimage.color uses them.
RGB_TO_XYZ = ((0.412453, 0.357580, 0.180423), (0.212671, 0.715160, 0.072169), (0.019334, 0.119193, 0.950227))
D65_WHITE = (0.95047, 1.0, 1.08883)
GRID, AB_RANGE = 10, 110          # centres at -110, -100, ..., 110 cover the sRGB gamut's ab extent
_DELTA = 6 / 29                   # CIE's linear-segment threshold of the cube-root f(t)


def _matrix(dtype, device) -> Tensor:
    return torch.tensor(RGB_TO_XYZ, dtype=dtype, device=device)


def _white(dtype, device) -> Tensor:
    return torch.tensor(D65_WHITE, dtype=dtype, device=device)


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """sRGB in [0, 1], channels on dim -3 ([..., 3, H, W]) -> CIELab (L in [0, 100]), same layout."""
    check_tensor("rgb", rgb)
    if rgb.ndim < 3 or rgb.shape[-3] != 3:
        raise ValueError(f"rgb must be [..., 3, H, W], got shape {tuple(rgb.shape)}")
    x = rgb.movedim(-3, -1).to(torch.promote_types(rgb.dtype, torch.float32))
    linear = torch.where(x <= 0.04045, x / 12.92, ((x.clamp_min(0) + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _matrix(x.dtype, x.device).T / _white(x.dtype, x.device)
    f = torch.where(xyz > _DELTA ** 3, xyz.clamp_min(_DELTA ** 3) ** (1 / 3),
                    xyz / (3 * _DELTA ** 2) + 4 / 29)
    fx, fy, fz = f.unbind(-1)
    lab = torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)], -1)
    return lab.movedim(-1, -3)


def lab_to_linear_rgb(lab: Tensor) -> Tensor:
    """CIELab, channels last ([..., 3]) -> linear sRGB, unclipped (outside [0, 1] when out of gamut)."""
    L, a, b = lab.unbind(-1)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], -1)
    xyz = torch.where(f > _DELTA, f ** 3, 3 * _DELTA ** 2 * (f - 4 / 29)) * _white(lab.dtype, lab.device)
    return xyz @ torch.linalg.inv(_matrix(lab.dtype, lab.device)).T


def lab_to_rgb(lab: Tensor) -> Tensor:
    """CIELab [..., 3, H, W] -> sRGB in [0, 1] (out-of-gamut colours clipped), same layout."""
    linear = lab_to_linear_rgb(lab.movedim(-3, -1)).clamp(0, 1)
    gamma = 1.055 * linear.clamp_min(1e-12) ** (1 / 2.4) - 0.055
    rgb = torch.where(linear <= 0.0031308, 12.92 * linear, gamma)
    return rgb.clamp(0, 1).movedim(-1, -3)


@functools.cache
def _ab_bins(grid: int, l_steps: int) -> Tensor:
    centres = torch.arange(-AB_RANGE, AB_RANGE + 1, grid, dtype=torch.float64)
    a, b = torch.meshgrid(centres, centres, indexing="ij")
    ab = torch.stack([a.reshape(-1), b.reshape(-1)], -1)
    reached = torch.zeros(ab.shape[0], dtype=torch.bool)
    for L in torch.linspace(0, 100, l_steps, dtype=torch.float64):
        rgb = lab_to_linear_rgb(torch.cat([L.expand(ab.shape[0], 1), ab], -1))
        reached |= ((rgb >= 0) & (rgb <= 1)).all(-1)
    return ab[reached].float()


def ab_bins(grid: int = GRID, l_steps: int = 1001) -> Tensor:
    """The in-gamut ab bin centres [Q, 2] (float32): grid centres reached by an sRGB colour at
    some L of `l_steps` evenly spaced in [0, 100] (see the module docstring)."""
    return _ab_bins(check_int("grid", grid, low=1), check_int("l_steps", l_steps, low=2)).clone()


def nearest_bins(ab: Tensor, bins: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """ab [B, 2, H, W] -> (squared distances, indices) of the k nearest bins, each [B, H, W, k]."""
    points = ab.movedim(1, -1).float()
    d2 = (points.unsqueeze(-2) - bins.to(points.device)).pow(2).sum(-1)
    return torch.topk(d2, k, dim=-1, largest=False)


def soft_encode(ab: Tensor, bins: Tensor, *, k: int = 5, sigma: float = 5.0) -> Tensor:
    """The soft target Z [B, Q, H, W] of ab [B, 2, H, W]: Gaussian weights exp(-d^2 / 2 sigma^2)
    on the k nearest bins, normalised to sum 1 per pixel; 0 on the other bins."""
    check_tensor("ab", ab, ndim=4)
    k = check_int("k", k, low=1, high=bins.shape[0])
    sigma = check_number("sigma", sigma, low=0, low_open=True)
    d2, idx = nearest_bins(ab, bins, k)
    weights = torch.softmax(-d2 / (2 * sigma ** 2), dim=-1)  # exp(-d^2/2s^2) / sum over the k
    z = torch.zeros(*d2.shape[:-1], bins.shape[0], device=ab.device)
    return z.scatter_(-1, idx, weights).movedim(-1, 1)


def ab_histogram(ab: Tensor, bins: Tensor) -> Tensor:
    """Counts [Q] of ab pixels [B, 2, H, W] at their nearest bin. Pixels are first counted at their
    nearest grid centre (a rounding), and each centre's count goes to the bin nearest it: the same
    bin whenever the pixel's nearest grid centre is in gamut, as it is for every sRGB pixel but
    those at the gamut's rim. O(pixels), not O(pixels x Q)."""
    check_tensor("ab", ab, ndim=4)
    side = 2 * AB_RANGE // GRID + 1
    cell = ((ab.float() / GRID).round().clamp(-(side // 2), side // 2) + side // 2).long()
    counts = torch.bincount((cell[:, 0] * side + cell[:, 1]).reshape(-1), minlength=side * side)
    centres = torch.arange(-AB_RANGE, AB_RANGE + 1, GRID, dtype=torch.float32, device=ab.device)
    grid = torch.stack(torch.meshgrid(centres, centres, indexing="ij"), -1).reshape(-1, 2)
    nearest = torch.cdist(grid, bins.float().to(ab.device)).argmin(1)
    return torch.zeros(bins.shape[0], dtype=torch.float64, device=ab.device).index_add_(
        0, nearest, counts.double())


def rebalance_weights(prior: Tensor, bins: Tensor, *, sigma: float = 5.0, lam: float = 0.5) -> Tensor:
    """Class-rebalancing weights [Q] from an empirical bin distribution `prior` [Q] (counts or
    probabilities): p~ = the prior smoothed by a Gaussian of `sigma` over the bin centres (mass kept),
    w = ((1 - lam) p~ + lam / Q)^-1 scaled so that sum_q p~_q w_q = 1."""
    check_tensor("prior", prior, ndim=1)
    sigma = check_number("sigma", sigma, low=0, low_open=True)
    lam = check_number("lam", lam, low=0, high=1)
    p = prior.double() / prior.double().sum()
    c = bins.double().to(p.device)
    kernel = torch.exp(-torch.cdist(c, c).pow(2) / (2 * sigma ** 2))
    smoothed = kernel / kernel.sum(0, keepdim=True) @ p   # column r spreads bin r's mass
    smoothed = smoothed / smoothed.sum()
    w = 1.0 / ((1 - lam) * smoothed + lam / p.shape[0])
    return (w / (smoothed * w).sum()).float()


def colorization_loss(logits: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Mean over pixels of -v(Z) sum_q Z_q log softmax(logits)_q, logits and target [B, Q, H, W],
    v(Z) = weights[argmax_q Z] (the weight of the pixel's nearest bin)."""
    check_tensor("logits", logits, ndim=4)
    if target.shape != logits.shape:
        raise ValueError(f"target must have the logits' shape {tuple(logits.shape)}, "
                         f"got {tuple(target.shape)}")
    v = weights.to(logits.device)[target.argmax(1)]
    ce = -(target * F.log_softmax(logits.float(), dim=1)).sum(1)
    return (v * ce).mean()


def annealed_mean(logits: Tensor, bins: Tensor, temperature: float = 0.38) -> Tensor:
    """ab [B, 2, H, W]: the mean of the bins under softmax(log softmax(logits) / T)."""
    temperature = check_number("temperature", temperature, low=0, low_open=True)
    p = torch.softmax(F.log_softmax(logits.float(), dim=1) / temperature, dim=1)
    return torch.einsum("bqhw,qc->bchw", p, bins.to(p.device))


__all__ = ["ab_bins", "ab_histogram", "annealed_mean", "colorization_loss", "lab_to_rgb", "rebalance_weights",
           "rgb_to_lab", "soft_encode"]
