"""Colorization (Zhang, Isola, Efros 2016): CIELab, the in-gamut bins, soft encoding, class
rebalancing and annealed-mean decoding against the paper's definitions, written out here."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_helpers import context, one_thread  # noqa: F401 (autouse fixture)

from fastssl.data import ArraySource
from fastssl.data.recipes import IMAGENET_MEAN, IMAGENET_STD
from fastssl.data.sources import colour_shapes
from fastssl.engine import resolve_config
from fastssl.losses.colorization import (
    ab_bins,
    ab_histogram,
    annealed_mean,
    colorization_loss,
    lab_to_rgb,
    rebalance_weights,
    rgb_to_lab,
    soft_encode,
)
from fastssl.methods import METHODS

# CIELab (D65) of sRGB reference colours, as colour-science tables list them (e.g. skimage's
# rgb2lab of the primaries: red (53.24, 80.09, 67.20)), and mid-gray 0.5: Y = (0.555 / 1.055)^2.4.
REFERENCE = {
    (1.0, 1.0, 1.0): (100.0, 0.0, 0.0), (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
    (1.0, 0.0, 0.0): (53.24, 80.09, 67.20), (0.0, 1.0, 0.0): (87.73, -86.18, 83.18),
    (0.0, 0.0, 1.0): (32.30, 79.19, -107.86), (1.0, 1.0, 0.0): (97.14, -21.55, 94.48),
    (0.5, 0.5, 0.5): (116 * ((0.555 / 1.055) ** 2.4) ** (1 / 3) - 16, 0.0, 0.0),
}
# The published inverse of the sRGB matrix (XYZ -> linear sRGB), D65 white.
XYZ_TO_RGB = torch.tensor([[3.240479, -1.537150, -0.498535], [-0.969256, 1.875992, 0.041556],
                           [0.055648, -0.204043, 1.057311]], dtype=torch.float64)
WHITE = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)


def as_image(colours):
    return torch.tensor(colours, dtype=torch.float32).T.reshape(1, 3, 1, len(colours))


def test_rgb_to_lab_matches_reference_values_and_inverts():
    lab = rgb_to_lab(as_image(list(REFERENCE))).reshape(3, -1).T
    torch.testing.assert_close(lab, torch.tensor(list(REFERENCE.values())), atol=0.01, rtol=0)
    x = torch.rand(2, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(x)), x, atol=1e-4, rtol=0)


def in_gamut(a, b, l_step=0.05):
    """Some L in [0, 100] makes (L, a, b) an sRGB colour: CIE's inverse f, then the published matrix."""
    L = torch.arange(0, 100 + l_step / 2, l_step, dtype=torch.float64)
    fy = (L + 16) / 116
    f = torch.stack([fy + a / 500, fy, fy - b / 200], -1)
    t = torch.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    rgb = (t * WHITE) @ XYZ_TO_RGB.T
    return bool(((rgb >= -1e-6) & (rgb <= 1 + 1e-6)).all(-1).any())


# CIELab (D65) ab of sRGB's primaries and secondaries as colour tables list them: the gamut's
# extremes (green's a, magenta's a, blue's b, yellow's b are its bounds).
CORNERS = {"red": (80.09, 67.20), "yellow": (-21.55, 94.48), "green": (-86.18, 83.18),
           "cyan": (-48.08, -14.14), "blue": (79.19, -107.86), "magenta": (98.23, -60.82)}


def test_bins_are_the_corners_of_the_grid_cells_the_gamut_hull_touches():
    bins = {tuple(map(int, p)) for p in ab_bins().tolist()}
    assert len(bins) == 313                                         # the paper's Q
    for a, b in CORNERS.values():                                   # the cell holding a colour: its 4 corners
        a0, b0 = 10 * math.floor(a / 10), 10 * math.floor(b / 10)
        assert {(a0, b0), (a0 + 10, b0), (a0, b0 + 10), (a0 + 10, b0 + 10)} <= bins
    # no cell beyond the extremes is touched: a in [-90, 100], b in [-110, 100]
    assert {a for a, _ in bins} == set(range(-90, 101, 10))
    assert {b for _, b in bins} == set(range(-110, 101, 10))
    # the hull holds the chord from magenta to red, at a = 91.03 for b = -10: it touches the cell
    # [90, 100] x [-10, 0], so (100, 0) is a bin, far as it is from any colour on the grid's scale
    (am, bm), (ar, br) = CORNERS["magenta"], CORNERS["red"]
    assert am + (ar - am) * (-10 - bm) / (br - bm) > 90 and (100, 0) in bins
    # every grid point an sRGB colour reaches at some L is a bin, and so is every sRGB colour's nearest one
    grid = [(a, b) for a in range(-110, 111, 10) for b in range(-110, 111, 10)]
    assert {p for p in grid if in_gamut(*p)} < bins
    v = torch.linspace(0, 1, 24)
    cube = torch.stack(torch.meshgrid(v, v, v, indexing="ij")).reshape(1, 3, 24, 24 * 24)
    nearest = (rgb_to_lab(cube)[:, 1:].reshape(2, -1).T / 10).round() * 10
    assert {tuple(map(int, p)) for p in nearest.tolist()} <= bins


def test_soft_encoding_spreads_over_the_5_nearest_with_a_gaussian():
    bins = ab_bins()
    z = soft_encode(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1), bins).view(-1)
    assert torch.isclose(z.sum(), torch.tensor(1.0)) and int((z > 0).sum()) == 5
    # nearest centres of (3, 4): (0,0) d2 25, (0,10) 45, (10,0) 65, (10,10) 85, (-10,0) 185
    d2 = {(0, 0): 25.0, (0, 10): 45.0, (10, 0): 65.0, (10, 10): 85.0, (-10, 0): 185.0}
    norm = sum(math.exp(-d / 50) for d in d2.values())
    for centre, d in d2.items():
        q = [tuple(map(int, p)) for p in bins.tolist()].index(centre)
        assert z[q].item() == pytest.approx(math.exp(-d / 50) / norm, rel=1e-5)
    many = soft_encode(torch.randn(2, 2, 3, 3) * 40, bins)
    torch.testing.assert_close(many.sum(1), torch.ones(2, 3, 3))
    assert torch.equal((many > 0).sum(1), torch.full((2, 3, 3), 5))


def test_histogram_counts_pixels_at_their_nearest_bin():
    bins = ab_bins()
    ab = torch.tensor([[3.0, 4.0], [-48.0, 12.0], [-46.0, 14.0], [60.0, -61.0]]).T.reshape(1, 2, 1, 4)
    counts = ab_histogram(ab, bins)
    where = {tuple(map(int, p)): q for q, p in enumerate(bins.tolist())}
    assert counts.sum() == 4 and counts[where[(0, 0)]] == 1 and counts[where[(-50, 10)]] == 2
    assert counts[where[(60, -60)]] == 1


def smoothed(prior, bins, sigma=5.0):
    """The prior spread by a Gaussian over the ab plane: bin r's mass shared by its neighbours."""
    p = prior / prior.sum()
    out = torch.zeros(len(p), dtype=torch.float64)
    for r in range(len(p)):
        k = torch.exp(-((bins - bins[r]) ** 2).sum(1).double() / (2 * sigma ** 2))
        out += p[r] * k / k.sum()
    return out / out.sum()


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0])
def test_rebalancing_weights_have_mean_one_under_the_smoothed_prior(lam):
    bins = ab_bins()
    prior = torch.rand(len(bins), generator=torch.Generator().manual_seed(0)) ** 4
    w = rebalance_weights(prior, bins, lam=lam).double()
    p = smoothed(prior.double(), bins)
    assert (p * w).sum().item() == pytest.approx(1.0, rel=1e-5)
    mix = (1 - lam) * p + lam / len(bins)
    ratio = w * mix                                                      # w ∝ 1 / mix
    torch.testing.assert_close(ratio, torch.full_like(ratio, ratio[0].item()), rtol=1e-5, atol=0)
    if lam == 1.0:
        torch.testing.assert_close(w, torch.ones_like(w), rtol=1e-5, atol=0)


def test_loss_weights_each_pixel_by_its_nearest_bin_and_decoding_is_the_annealed_mean():
    bins = ab_bins()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, len(bins), 3, 3, generator=g)
    target = soft_encode(torch.randn(2, 2, 3, 3, generator=g) * 30, bins)
    weights = torch.rand(len(bins), generator=g) + 0.5
    want = -(weights[target.argmax(1)] * (target * F.log_softmax(logits, 1)).sum(1)).mean()
    torch.testing.assert_close(colorization_loss(logits, target, weights), want)
    p = torch.softmax(logits, 1)
    torch.testing.assert_close(annealed_mean(logits, bins, 1.0), torch.einsum("bqhw,qc->bchw", p, bins))
    mode = bins[logits.argmax(1)].permute(0, 3, 1, 2)
    torch.testing.assert_close(annealed_mean(logits, bins, 1e-3), mode, atol=1e-3, rtol=0)
    q = p.log() / 0.38
    torch.testing.assert_close(annealed_mean(logits, bins), torch.einsum("bqhw,qc->bchw", q.softmax(1), bins))


def build(**overrides):
    cls = METHODS["colorization"]
    torch.manual_seed(0)
    overrides = {"backbone": "resnet8", "image_size": 16, **overrides}
    return cls(resolve_config(cls.config_class, overrides=overrides))


def test_grayscale_data_is_refused_by_name():
    method = build()
    gray = ArraySource(np.random.default_rng(0).integers(0, 255, (20, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="grayscale.*Fashion-MNIST"):
        method.bind_data(gray)
    assert torch.equal(method.weights, torch.ones(len(method.bins)))           # nothing changed


def test_training_on_the_colour_set_lowers_the_loss_and_colourises():
    source = colour_shapes("test")
    method = build()
    method.bind_data(source)
    assert method.weights.std() > 0                                           # rebalanced, not uniform
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    rgb = torch.from_numpy(source.images[:32]).permute(0, 3, 1, 2).float() / 255
    images = (F.interpolate(rgb, size=16, mode="area") - mean) / std
    b = {"views": [images], "label": torch.zeros(32), "index": torch.arange(32)}
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = method(b, context())["loss"]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-3:]) < 0.7 * sum(losses[:3])
    out = method.colourise(images[:4])
    assert out.shape == (4, 3, 16, 16) and 0 <= out.min() and out.max() <= 1
    lightness = rgb_to_lab(out)[:, 0]
    torch.testing.assert_close(lightness, rgb_to_lab((images[:4] * std + mean).clamp(0, 1))[:, 0],
                               atol=2.0, rtol=0)                                  # the input's L kept
