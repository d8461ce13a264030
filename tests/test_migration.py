"""The documentation's code, executed: every Python block of README.md and docs/*.md runs, in order,
per file (so a guide cannot drift from the code); the migration guide covers every codebase it
names, each block stating its equivalence as an assert; and random_masking's default noise against
the official MAE draw: the same seed gives the official mask."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fastssl.ops import random_masking
from fastssl.ops.backend import triton_interpreting

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MIGRATION = ROOT / "docs" / "migration.md"
CODEBASES = ("DINO", "MAE", "MoCo v2", "MoCo v3", "lightly", "solo-learn", "open_clip", "DINOv2 / DINOv3")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: p.name)
def test_every_python_block_runs(path):
    namespace: dict = {}
    for i, block in enumerate(python_blocks(path)):
        exec(compile(block, f"{path.name} block {i}", "exec"), namespace)


def test_the_migration_guide_states_each_equivalence():
    text = MIGRATION.read_text()
    for name in CODEBASES:
        assert f"**{name}**" in text, f"the migration guide does not cover {name}"
    blocks = python_blocks(MIGRATION)
    assert len(blocks) == 1 + len(CODEBASES)
    # Every block after the set-up states its equivalence as an assert against the original formula.
    assert all("assert " in block for block in blocks[1:])


def test_readme_shows_an_op_in_runnable_code():
    assert len(python_blocks(ROOT / "README.md")) >= 1


def official_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor):
    """MAE's random_masking as the paper and repository describe it: sort the noise, keep the
    first int(L * (1 - mask_ratio)), restore by the inverse permutation, mask 1 = removed."""
    N, L, D = x.shape
    len_keep = int(L * (1 - mask_ratio))
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    x_masked = torch.gather(x, 1, ids_shuffle[:, :len_keep, None].expand(-1, -1, D))
    mask = torch.ones(N, L)
    mask[:, :len_keep] = 0
    return x_masked, torch.gather(mask, 1, ids_restore), ids_restore


BACKENDS = ["torch"] + (["triton"] if triton_interpreting() else [])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("N,L,ratio,seed", [(4, 196, 0.75, 0), (3, 49, 0.5, 7), (2, 17, 0.9, 123)])
def test_default_noise_is_the_official_draw(N, L, ratio, seed, backend):
    x = torch.randn(N, L, 12, dtype=torch.float64)
    torch.manual_seed(seed)
    noise = torch.rand(N, L, device=x.device)  # the official draw
    # Ties would leave the official (unstable) sort's order unspecified; these seeds have none.
    assert all(row.unique().numel() == L for row in noise)
    want = official_masking(x, ratio, noise)
    torch.manual_seed(seed)
    got = random_masking(x, ratio, backend=backend)
    assert torch.equal(got[2], want[2])
    assert torch.equal(got[1], want[1].to(x.dtype))
    assert torch.equal(got[0], want[0])
    # The default generator advanced exactly as the official draw does: the next draws agree.
    after_ours = torch.rand(3)
    torch.manual_seed(seed)
    torch.rand(N, L)
    assert torch.equal(after_ours, torch.rand(3))


def test_generator_and_noise_arguments_still_accepted():
    x = torch.randn(2, 30, 4)
    g = torch.Generator().manual_seed(5)
    noise = torch.rand(2, 30, generator=torch.Generator().manual_seed(5))
    by_generator = random_masking(x, 0.6, generator=g)
    by_noise = random_masking(x, 0.6, noise=noise)
    want = official_masking(x, 0.6, noise)
    for a, b, c in zip(by_generator, by_noise, want):
        assert torch.equal(a, b) and torch.equal(b, c.to(b.dtype))
