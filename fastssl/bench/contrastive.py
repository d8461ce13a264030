"""CLIP and SigLIP losses: fwd+bwd of open_clip's formulas (eager: the ops' references through
backend="torch"), torch.compile of them, and fastssl (backend "auto": the fused Triton kernels on
CUDA, the reference on the CPU, where this benchmark only smoke-tests with --quick).

One rank's step at CLIP scales: N image and N text rows against M gathered rows of the other
tower (M = N: one GPU; M = 32768: a 32k global batch), a learned fp32 scale (and SigLIP's bias),
gradients of every input. CLIP at M = N is the one grid (both directions from one sweep of the
fused op), at M = 32768 open_clip's local loss (two row-wise sweeps: image->text and text->image);
SigLIP's gathered form one sigmoid pass over the N x M pairs.

FLOPs per call, as the formulas count them: 3 matmul-equivalents of 2·N·M·D per direction (logits,
and the two feature gradients). The fused kernels recompute the logits once more per 128- or
256-column chunk of D (the accumulator's programs), which the TFLOP/s column does not credit.

    fastssl bench contrastive [--quick] [--out DIR]   (or python -m fastssl.bench.contrastive)
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from fastssl.bench.harness import Case, compiled, loss_providers, run_suites
from fastssl.ops import clip_loss, siglip_loss


def clip(backend: str):
    """open_clip's ClipLoss on rank 0: one GPU's N x N grid when M = N, else local_loss=True,
    CE(t X Y_allᵀ) and CE(t Y X_allᵀ)."""
    def loss(x, y, x_all, y_all, scale, bias):
        if x_all.shape[0] == x.shape[0]:
            return clip_loss(x, y, scale, bias, backend=backend)
        gathered = dict(all_image_features=x_all, all_text_features=y_all)
        return clip_loss(x, y, scale, bias, **gathered, backend=backend)
    return loss


def siglip_gathered(backend: str):
    """open_clip's SigLipLoss (dist_impl="gather") on rank 0: its images against every text."""
    def loss(x, y, x_all, y_all, scale, bias):
        return siglip_loss(x, y_all, scale, bias, backend=backend)
    return loss


def cases(name: str, formula, quick: bool, device: str) -> list[Case]:
    shapes = [(32, 64, 32)] if quick else [(1024, 1024, 768), (1024, 32768, 768), (256, 32768, 512)]
    dtypes = [torch.float32] if quick else [torch.bfloat16, torch.float32]
    eager_c = compiled(formula("torch"))
    directions = 2 if name == "clip" else 1
    out = []
    for dtype in dtypes:
        for N, M, D in shapes:
            def make(N=N, M=M, D=D, dtype=dtype):
                rows = [F.normalize(torch.randn(r, D, device=device), dim=1).to(dtype) for r in (N, N, M, M)]
                scalars = [torch.tensor(v, device=device) for v in (10.0, -10.0)]
                return (*[t.requires_grad_() for t in rows + scalars],)

            out.append(Case(
                name=name, params={"N": N, "M": M, "D": D, "dtype": str(dtype)[6:]}, make_inputs=make,
                providers=loss_providers(formula("torch"), formula("auto"), compiled_eager=eager_c),
                flops=directions * 3 * (2 * N * M * D),
            ))
    return out


def main(argv: list[str] | None = None) -> None:
    run_suites(__doc__, {"clip": functools.partial(cases, "clip", clip),
                         "siglip_gathered": functools.partial(cases, "siglip", siglip_gathered)}, argv)


if __name__ == "__main__":
    main()
