"""Context prediction (Doersch et al. 2015): the 3x3 grid, gap, jitter, the 8 labels and the
chromatic-aberration guards, checked on images whose pixels hold their own coordinates."""

import pytest
import torch
from method_helpers import context, one_thread  # noqa: F401 (autouse fixture)

from fastssl.engine import resolve_config
from fastssl.methods import METHODS
from fastssl.methods.context import NEIGHBOURS, sample_pairs

TINY = dict(backbone="resnet8", image_size=36, gap=4, jitter=2, head_hidden_dim=16)


def build(seed=0, **overrides):
    cls = METHODS["context"]
    torch.manual_seed(seed)
    return cls(resolve_config(cls.config_class, overrides={**TINY, **overrides}))


def coordinate_images(b, size):
    """Channel 0 = row, channel 1 = column, channel 2 = sample number."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    grid = torch.stack([ys, xs]).float().expand(b, 2, size, size)
    return torch.cat([grid, torch.arange(b).float().view(b, 1, 1, 1).expand(b, 1, size, size)], 1)


def test_labels_follow_the_papers_figure_order():
    # reading order of the 8 neighbours around the centre: top-left, top, top-right, left, right, ...
    assert NEIGHBOURS == tuple((r, c) for r in (-1, 0, 1) for c in (-1, 0, 1) if (r, c) != (0, 0))


@pytest.mark.parametrize("jitter", [0, 3])
def test_patches_sit_in_their_cells_with_gap_and_jitter(jitter):
    size, gap, b = 60, 8, 512     # cells of 20 px, patches of 12 px
    images = coordinate_images(b, size)
    g = torch.Generator().manual_seed(0)
    centre, other, label = sample_pairs(images, gap=gap, jitter=jitter, generator=g)
    assert centre.shape == other.shape == (b, 3, 12, 12)
    assert torch.equal(centre[:, 2, 0, 0], torch.arange(b).float())          # each pair from its own image
    assert sorted(label.unique().tolist()) == list(range(8))
    assert label.bincount().min() > b / 8 / 2                   # every position drawn, about evenly
    for patches, offset in ((centre, torch.zeros(b, 2)), (other, torch.tensor(NEIGHBOURS).float()[label])):
        top, left = patches[:, 0, 0, 0], patches[:, 1, 0, 0]
        # contiguous pixels: a patch is a 12 x 12 window
        assert torch.equal(patches[:, 0, -1, 0] - top, torch.full((b,), 11.0))
        assert torch.equal(patches[:, 1, 0, -1] - left, torch.full((b,), 11.0))
        # nominal place: the cell (1 + offset) * 20 plus half the gap; moved by at most the jitter
        dy, dx = top - ((1 + offset[:, 0]) * 20 + 4), left - ((1 + offset[:, 1]) * 20 + 4)
        assert dy.abs().max() <= jitter and dx.abs().max() <= jitter
        if jitter:
            assert dy.abs().max() == jitter and dx.abs().max() == jitter
        # inside its cell: the gap is never crossed
        assert (top >= (1 + offset[:, 0]) * 20).all() and (top + 12 <= (2 + offset[:, 0]) * 20).all()
    # horizontal neighbours are at least gap - 2 * jitter apart
    right = label == 4
    assert (other[right, 1, 0, 0] - (centre[right, 1, 0, -1] + 1)).min() >= gap - 2 * jitter


def test_aberration_guards():
    g = torch.Generator().manual_seed(0)
    patches = torch.randn(16, 3, 6, 6, generator=g)
    projected = build(aberration="project").remove_aberration(patches, g)
    axis = torch.tensor([-1.0, 2.0, -1.0]).view(1, 3, 1, 1)
    assert (projected * axis).sum(1).abs().max() < 1e-5                    # no green-magenta component left
    torch.testing.assert_close(projected.mean(1), patches.mean(1))          # gray level kept
    dropped = build(aberration="drop").remove_aberration(patches, g)
    kept = (dropped == patches).flatten(2).all(2)                           # [16, 3]: channel kept exactly
    assert torch.equal(kept.sum(1), torch.ones(16, dtype=torch.long))
    assert (dropped[~kept].std() - 0.01).abs() < 0.003                       # the rest: noise of std 0.01


def test_loss_is_the_8_way_cross_entropy_and_falls():
    method = build()
    g = torch.Generator().manual_seed(1)
    b = {"views": [torch.randn(16, 3, 36, 36, generator=g).cumsum(3) / 6], "label": torch.zeros(16),
         "index": torch.arange(16)}
    opt = torch.optim.AdamW(method.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        opt.zero_grad()
        out = method(b, context(step=step % 2))   # two fixed draws of pairs
        out["loss"].backward()
        opt.step()
        losses.append(float(out["loss"].detach()))
    assert losses[0] == pytest.approx(2.08, abs=0.4)                         # about log 8 at the start
    assert sum(losses[-4:]) < 0.5 * sum(losses[:4])


def test_gap_and_jitter_must_fit_the_cell():
    with pytest.raises(ValueError, match="gap/jitter"):
        build(gap=4, jitter=3)
    with pytest.raises(ValueError, match="gap/jitter"):
        build(gap=12, jitter=2)
