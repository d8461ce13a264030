"""Colorization's colour space, output bins, targets and loss (Zhang, Isola, Efros 2016,
"Colorful Image Colorization").

- CIELab from sRGB (D65 white, the sRGB primaries' XYZ matrix of IEC 61966-2-1 as skimage
  uses it): `rgb_to_lab`, and back, `lab_to_rgb`.
- The output space: the ab plane quantised on a grid of step 10 (points at multiples of 10 in
  [-110, 110]), keeping the points in gamut (`ab_bins`) as the paper's file of 313 (pts_in_hull)
  keeps them: a grid point is a bin when it is a corner of a 10 x 10 grid cell that the convex hull
  of the sRGB gamut's ab values (every colour, at every L; `gamut_hull`) touches, i.e. when that
  hull comes within 10 of it in both a and b. This gives exactly the file's 313 points. Stricter
  readings keep fewer: a point reached itself by some sRGB colour, 229; a cell holding an 8-bit
  sRGB colour nearest its centre, 261. The looser set also keeps bins for the rim colours the
  rounding would push outside the grid, so every sRGB pixel's nearest grid point is a bin.
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


def _cube_colours(steps: int) -> Tensor:
    """sRGB colours [n, 3] (float64) on the cube's six faces, `steps` levels per side, and inside it
    at a quarter of that: every colour the convex hull of the gamut's ab values needs."""
    side = torch.linspace(0, 1, steps, dtype=torch.float64)
    u, v = (t.reshape(-1) for t in torch.meshgrid(side, side, indexing="ij"))
    faces = [torch.stack([u, v][:axis] + [torch.full_like(u, value)] + [u, v][axis:], -1)
             for axis in range(3) for value in (0.0, 1.0)]
    inner = torch.linspace(0, 1, steps // 4 + 1, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(inner, inner, inner, indexing="ij"), -1).reshape(-1, 3)
    return torch.cat([*faces, cube])


def gamut_hull(steps: int = 65) -> Tensor:
    """The convex hull [V, 2] (float64, counter-clockwise) of the ab values of every sRGB colour, at
    every L: the colours of `_cube_colours(steps)` cut down to the extreme points in 1,440 directions,
    then Andrew's monotone chain."""
    rgb = _cube_colours(steps)
    ab = rgb_to_lab(rgb.T.reshape(1, 3, 1, -1))[0, 1:].reshape(2, -1).T
    angle = torch.arange(1440, dtype=torch.float64) * (2 * torch.pi / 1440)
    direction = torch.stack([angle.cos(), angle.sin()], 1)
    # only a point extreme in some direction can be a vertex; chunks keep the [1440, n] products small
    extreme = torch.cat([part[(direction @ part.T).argmax(1).unique()] for part in ab.split(8192)])
    points = sorted(set(map(tuple, extreme.tolist())))

    def chain(seq):
        out: list = []
        for p in seq:
            while len(out) >= 2 and ((out[-1][0] - out[-2][0]) * (p[1] - out[-2][1])
                                     - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])) <= 0:
                out.pop()
            out.append(p)
        return out[:-1]

    return torch.tensor(chain(points) + chain(points[::-1]), dtype=torch.float64)


@functools.cache
def _ab_bins(grid: int) -> Tensor:
    centres = torch.arange(-AB_RANGE, AB_RANGE + 1, grid, dtype=torch.float64)
    a, b = torch.meshgrid(centres, centres, indexing="ij")
    ab = torch.stack([a.reshape(-1), b.reshape(-1)], -1)
    hull = gamut_hull()
    # Separating axes of the square [c - grid, c + grid]^2 and the convex hull: a, b and the hull's
    # outward edge normals; the square meets the hull unless one of them separates the two.
    apart = (ab + grid < hull.amin(0)).any(1) | (ab - grid > hull.amax(0)).any(1)
    edge = hull.roll(-1, 0) - hull
    normal = torch.stack([edge[:, 1], -edge[:, 0]], 1)
    corners = ab[:, None] + grid * torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]],
                                                dtype=torch.float64)
    reach = torch.einsum("qkc,ec->qek", corners, normal) - (hull * normal).sum(1)[None, :, None]
    apart |= (reach.amin(-1) > 0).any(1)
    return ab[~apart].float()


def ab_bins(grid: int = GRID) -> Tensor:
    """The in-gamut ab bin centres [Q, 2] (float32; Q = 313 at grid 10): the multiples of `grid` in
    [-110, 110]^2 that are corners of a grid cell the gamut's convex hull touches (see the module
    docstring)."""
    return _ab_bins(check_int("grid", grid, low=1)).clone()


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
    nearest grid centre (a rounding), and each centre's count goes to the bin nearest it: the
    centre itself for every sRGB pixel (every sRGB colour's nearest grid point is a bin). O(pixels),
    not O(pixels x Q)."""
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


__all__ = ["ab_bins", "ab_histogram", "annealed_mean", "colorization_loss", "gamut_hull", "lab_to_rgb",
           "rebalance_weights", "rgb_to_lab", "soft_encode"]
