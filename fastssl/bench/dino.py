"""DINO loss, iBOT patch loss and multi-label softmax loss: fwd+bwd of the official formula
(eager: the ops' references, `dino_loss_ref`, `ibot_patch_loss_ref` and
`multilabel_softmax_loss_ref`), torch.compile of it, and fastssl's fused soft-target
cross-entropy kernel.

Bytes per call, the kernel's minimum traffic as the op's goal counts it: student read twice (forward
and backward), its gradient written once, teacher read once (the multi-label rows: logits read
twice, gradient written, targets read once). The kernel also re-reads the teacher in the backward,
which the GB/s column does not credit.

    fastssl bench dino [--quick] [--out DIR]   (or python -m fastssl.bench.dino)
"""

from __future__ import annotations

import torch

from fastssl.bench.harness import Case, loss_providers, run_suites
from fastssl.losses import multilabel_softmax_loss, sinkhorn_knopp_teacher
from fastssl.ops import dino_loss, ibot_patch_cross_entropy, ibot_patch_loss


def official_dino_loss(student, teacher, center, n_crops):
    """facebookresearch/dino's DINOLoss.forward without the center update."""
    return dino_loss(student, teacher, center, n_crops=n_crops, backend="torch")


def official_multilabel_loss(logits, targets):
    """Softmax cross-entropy with 1/k on each of k labels."""
    return multilabel_softmax_loss(logits, targets, validate=False, backend="torch")


def dino_cases(quick: bool, device: str) -> list[Case]:
    shapes = [(2, 512, 4)] if quick else [(B, 65536, v) for B in (64, 128) for v in (10, 12)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    cases = []
    for (B, K, n_crops) in shapes:
        for dtype in dtypes:
            def make(B=B, K=K, n_crops=n_crops, dtype=dtype):
                student = torch.randn(n_crops * B, K, device=device, dtype=dtype).requires_grad_(True)
                teacher = torch.randn(2 * B, K, device=device, dtype=dtype)
                center = 0.1 * torch.randn(1, K, device=device, dtype=torch.float32)
                return student, teacher, center

            eager = lambda s, t, c, n=n_crops: official_dino_loss(s, t, c, n)
            fused = lambda s, t, c, n=n_crops: dino_loss(s, t, c, n_crops=n, n_global_crops=2)
            elt = torch.finfo(dtype).bits // 8
            cases.append(Case(
                name="dino_loss", params={"B": B, "K": K, "n_crops": n_crops, "dtype": str(dtype)[6:]},
                make_inputs=make,
                providers=loss_providers(eager, fused),
                bytes_moved=(3 * n_crops * B * K + 2 * B * K) * elt,
            ))
    return cases


def ibot_cases(quick: bool, device: str) -> list[Case]:
    """DINOv2's per-GPU patch loss: 64 images of 256 patches, half of them masked at 10-50%
    (~30% of the masked images' patches, n ~ 4,900 rows), its buffers' layout: the n masked
    rows of student and teacher first."""
    shapes = [(4, 16, 512)] if quick else [(64, 256, 65536), (64, 256, 131072)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    cases = []
    for (B, L, K) in shapes:
        for dtype in dtypes:
            masks = torch.zeros(B, L, dtype=torch.bool, device=device)
            masks[: B // 2] = torch.rand(B // 2, L, device=device) < 0.3
            n = int(masks.sum())

            def make(n=n, K=K, dtype=dtype):
                student = torch.randn(n, K, device=device, dtype=dtype).requires_grad_(True)
                teacher = torch.randn(n, K, device=device, dtype=dtype)
                center = 0.1 * torch.randn(1, 1, K, device=device, dtype=torch.float32)
                return student, teacher, center

            eager = lambda s, t, c, m=masks: ibot_patch_loss(s, t, c, masks=m, backend="torch")  # noqa: E731
            fused = lambda s, t, c, m=masks: ibot_patch_loss(s, t, c, masks=m)  # noqa: E731
            elt = torch.finfo(dtype).bits // 8
            cases.append(Case(
                name="ibot_patch_loss", params={"B": B, "L": L, "n": n, "K": K, "dtype": str(dtype)[6:]},
                make_inputs=make,
                providers=loss_providers(eager, fused),
                bytes_moved=4 * n * K * elt,
            ))
    if not quick:  # DINOv2's default: Sinkhorn-Knopp targets (alike on every path), then the loss
        cases.append(sinkhorn_case(device, *shapes[0]))
    return cases


def sinkhorn_case(device: str, B: int, L: int, K: int) -> Case:
    """The Sinkhorn-Knopp step of the iBOT loss in bf16: 3 iterations over the n masked teacher rows,
    then the cross-entropy against them; only the latter differs between the providers."""
    masks = torch.zeros(B, L, dtype=torch.bool, device=device)
    masks[: B // 2] = torch.rand(B // 2, L, device=device) < 0.3
    n = int(masks.sum())

    def make():
        return (torch.randn(n, K, device=device, dtype=torch.bfloat16).requires_grad_(True),
                torch.randn(n, K, device=device, dtype=torch.bfloat16))

    def step(backend):
        def loss(s, t):
            targets = sinkhorn_knopp_teacher(t, 0.07, 3)
            return ibot_patch_cross_entropy(s, targets, masks=masks, backend=backend)
        return loss

    return Case(
        name="ibot_patch_loss sinkhorn_knopp", params={"B": B, "L": L, "n": n, "K": K, "dtype": "bfloat16"},
        make_inputs=make, bytes_moved=4 * n * K * 2, providers=loss_providers(step("torch"), step("auto")))


def multilabel_cases(quick: bool, device: str) -> list[Case]:
    shapes = [(4, 1000)] if quick else [(256, 10_000), (256, 100_000)]
    dtypes = [torch.float32] if quick else [torch.float32, torch.bfloat16]
    cases = []
    for (N, C) in shapes:
        for dtype in dtypes:
            def make(N=N, C=C, dtype=dtype):
                logits = torch.randn(N, C, device=device, dtype=dtype).requires_grad_(True)
                targets = (torch.rand(N, C, device=device) < 5 / C).to(dtype)
                targets[:, 0] = 1  # every image has a label
                return logits, targets

            elt = torch.finfo(dtype).bits // 8
            cases.append(Case(
                name="multilabel_softmax", params={"N": N, "C": C, "dtype": str(dtype)[6:]}, make_inputs=make,
                providers=loss_providers(official_multilabel_loss,
                                         lambda x, y: multilabel_softmax_loss(x, y, validate=False)),
                bytes_moved=4 * N * C * elt,
            ))
    return cases


def main(argv: list[str] | None = None) -> None:
    run_suites(__doc__, {"dino_loss": dino_cases, "ibot_patch_loss": ibot_cases,
                         "multilabel_softmax_loss": multilabel_cases}, argv)


if __name__ == "__main__":
    main()
