"""InfoNCE: fwd+bwd of the official MoCo v2 / v3 formulas (eager: `info_nce_ref`), torch.compile
of them, and fastssl.ops.info_nce (backend "auto": the fused Triton kernels on CUDA, the
reference on the CPU, where this benchmark only smoke-tests with --quick).

FLOPs per call, as the op's goal counts them: 2 matmul-equivalents of 2·N·K·D each (K = queue
rows + 1 for MoCo v2, K = M keys in-batch). The in-batch kernels actually run 4 at D <= 128 (the
key gradient recomputes the logits in the backward) and more for wider 16-bit rows (each
128-column chunk of the accumulator recomputes the logits: 6 at D = 256), which the TFLOP/s
column does not credit.

Cases: MoCo v2 N ∈ {256, 1024, 4096}, K = 65536, D = 128 (query gradient only: keys come
from the momentum encoder); in-batch N = M ∈ {4096, 16384}, D = 256 (query and key
gradients); bf16 and fp32. Each form is its own table so a time-out keeps the first.

    fastssl bench info_nce [--quick] [--out DIR]   (or python -m fastssl.bench.info_nce)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastssl.bench.harness import Case, compiled, loss_providers, run_suites
from fastssl.ops import info_nce

T = 0.2


def official_moco_v2(q, k, queue):
    """facebookresearch/moco's loss: logits [l_pos, l_neg] / T of normalized q, k, label 0."""
    return info_nce(q, k, queue, temperature=T, backend="torch")


def official_moco_v3(q, k):
    """facebookresearch/moco-v3's contrastive_loss on one rank: q k^T / T, labels arange."""
    return info_nce(q, k, temperature=T, backend="torch")


def fastssl_moco_v2(q, k, queue):
    return info_nce(q, k, queue, temperature=T)


def fastssl_moco_v3(q, k):
    return info_nce(q, k, temperature=T)


def moco_v2_cases(quick: bool, device: str) -> list[Case]:
    shapes = [(64, 512, 32)] if quick else [(N, 65536, 128) for N in (256, 1024, 4096)]
    dtypes = [torch.float32] if quick else [torch.bfloat16, torch.float32]
    eager_c = compiled(official_moco_v2)  # one compiled function per form: later shapes go dynamic
    cases = []
    for dtype in dtypes:
        for N, K, D in shapes:
            def make(N=N, K=K, D=D, dtype=dtype):
                q = torch.randn(N, D, device=device, dtype=dtype).requires_grad_(True)
                k = torch.randn(N, D, device=device, dtype=dtype)
                queue = F.normalize(torch.randn(K, D, device=device), dim=1).to(dtype)
                return q, k, queue

            cases.append(Case(
                name="moco_v2", params={"N": N, "K": K, "D": D, "dtype": str(dtype)[6:]}, make_inputs=make,
                providers=loss_providers(official_moco_v2, fastssl_moco_v2, compiled_eager=eager_c),
                flops=2 * (2 * N * (K + 1) * D),
            ))
    return cases


def in_batch_cases(quick: bool, device: str) -> list[Case]:
    shapes = [(128, 32)] if quick else [(4096, 256), (16384, 256)]
    dtypes = [torch.float32] if quick else [torch.bfloat16, torch.float32]
    eager_c = compiled(official_moco_v3)
    cases = []
    for dtype in dtypes:
        for N, D in shapes:
            def make(N=N, D=D, dtype=dtype):
                q = torch.randn(N, D, device=device, dtype=dtype).requires_grad_(True)
                k = torch.randn(N, D, device=device, dtype=dtype).requires_grad_(True)
                return q, k

            cases.append(Case(
                name="in_batch", params={"N": N, "M": N, "D": D, "dtype": str(dtype)[6:]}, make_inputs=make,
                providers=loss_providers(official_moco_v3, fastssl_moco_v3, compiled_eager=eager_c),
                flops=2 * (2 * N * N * D),
            ))
    return cases


def main(argv: list[str] | None = None) -> None:
    run_suites(__doc__, {"info_nce_moco_v2": moco_v2_cases, "info_nce_in_batch": in_batch_cases}, argv)


if __name__ == "__main__":
    main()
