"""One forward + backward of every fused kernel, a KeyQueue push and a MemoryBank update, on
CUDA, at a small shape (for compute-sanitizer) or at the benchmarks' shapes (for one ncu summary
per kernel).

    python -m fastssl.bench.kernel_cases [--size small|bench] [--device cuda|cpu]
        [--profile-second-pass] [--dry-run]

Each case goes through the public op with backend="triton", so the launchers pick their
configurations exactly as in training: bf16 on CUDA; float32 on the CPU, which needs
TRITON_INTERPRET=1 and is how the script's own logic is tested without a GPU. Exits non-zero
on the first failing case. --profile-second-pass runs every case twice and brackets the second
pass with cudaProfilerStart/Stop, so `ncu --profile-from-start off` sees each kernel once at the
configuration the autotuner chose in the first pass, not its tuning trials. --dry-run lists the
cases and runs nothing (the GPU script's check on a CPU)."""

from __future__ import annotations

import argparse

import torch

from fastssl import KeyQueue
from fastssl.bank import MemoryBank
from fastssl.losses import multilabel_softmax_loss
from fastssl.ops import (
    clip_loss,
    dino_loss,
    ibot_patch_cross_entropy,
    ibot_patch_loss,
    info_nce,
    mae_loss,
    random_masking,
    siglip_loss,
    unshuffle_tokens,
)


def cases(size: str, device: str) -> dict:
    small = size == "small"
    N, K, D = (17, 130, 64) if small else (4096, 65536, 128)
    B, n_crops, P = (3, 4, 1000) if small else (128, 12, 65536)
    n_img, L, width, patch_dim = (3, 16, 32, 48) if small else (256, 196, 1024, 768)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    bf16 = dict(device=device, dtype=dtype)

    def moco_v2():
        q = torch.randn(N, D, **bf16, requires_grad=True)
        k = torch.randn(N, D, **bf16)
        queue = torch.nn.functional.normalize(torch.randn(K, D, **bf16), dim=1)
        info_nce(q, k, queue, temperature=0.2, backend="triton").backward()

    def in_batch():
        q = torch.randn(N, 2 * D, **bf16, requires_grad=True)
        k = torch.randn(N, 2 * D, **bf16, requires_grad=True)
        info_nce(q, k, temperature=0.2, backend="triton").backward()

    def dino():
        student = torch.randn(n_crops * B, P, **bf16, requires_grad=True)
        teacher = torch.randn(2 * B, P, **bf16)
        center = torch.zeros(1, P, device=device)
        dino_loss(student, teacher, center, n_crops=n_crops, backend="triton").backward()

    def ibot():  # the masked rows read in place from strided [images, 1 + L, K] tokens
        tokens = torch.randn(n_img, 1 + L, P, **bf16, requires_grad=True)
        teacher = torch.randn(n_img, L, P, **bf16)
        masks = torch.rand(n_img, L, device=device) < 0.3
        ibot_patch_loss(tokens[:, 1:], teacher, torch.zeros(P, device=device), masks=masks,
                        backend="triton").backward()

    def ibot_targets():  # DINOv2's Sinkhorn-Knopp path: the n masked rows first, given targets and weights
        masks = torch.rand(n_img, L, device=device) < 0.3
        n = int(masks.sum())
        student = torch.randn(n, P, **bf16, requires_grad=True)
        targets = torch.rand(n, P, device=device)
        weights = torch.rand(n, device=device)
        ibot_patch_cross_entropy(student, targets, masks=masks, masks_weight=weights,
                                 backend="triton").backward()

    def multilabel():
        logits = torch.randn(4 * B, P // 2, **bf16, requires_grad=True)
        targets = (torch.rand(4 * B, P // 2, device=device) < 0.01).to(dtype)
        targets[:, 0] = 1
        multilabel_softmax_loss(logits, targets, backend="triton").backward()

    def mae():
        tokens = torch.randn(n_img, L, width, **bf16, requires_grad=True)
        kept, mask, ids_restore = random_masking(tokens, 0.75, backend="triton")
        mask_token = torch.zeros(1, 1, width, **bf16, requires_grad=True)
        full = unshuffle_tokens(kept, mask_token, ids_restore, backend="triton")
        pred = full[..., :patch_dim] if width >= patch_dim else full.repeat(1, 1, 2)[..., :patch_dim]
        target = torch.randn(n_img, L, patch_dim, **bf16)
        mae_loss(pred, target, mask, norm_pix_loss=True, backend="triton").backward()

    def siglip():  # a rank's images against gathered texts, learned scale and bias
        image = torch.randn(N, 4 * D, **bf16, requires_grad=True)
        texts = torch.randn(2 * N, 4 * D, **bf16, requires_grad=True)
        scale, bias = (torch.tensor(v, device=device, requires_grad=True) for v in (10.0, -10.0))
        siglip_loss(image, texts, scale, bias, label_offset=N, backend="triton").backward()

    def clip():  # one GPU's N x N grid, both directions from one sweep; learned scale, a bias
        image, text = (torch.nn.functional.normalize(torch.randn(N, 4 * D, **bf16), dim=1).requires_grad_()
                       for _ in range(2))
        scale, bias = (torch.tensor(v, device=device, requires_grad=True) for v in (100.0, -3.0))
        clip_loss(image, text, scale, bias, backend="triton").backward()

    def queue_push():
        queue = KeyQueue(K, D, device=device, normalize=True)
        queue.push(torch.randn(N, D, **bf16))
        queue.push(torch.randn(N, D, **bf16))

    def bank_update():  # instance discrimination's memory bank, a repeated index included
        bank = MemoryBank(K, D, device=device)
        indices = torch.randint(0, K, (N,), device=device)
        indices[-1] = indices[0]
        bank.update(torch.randn(N, D, **bf16), indices)

    return {"info_nce_queue": moco_v2, "info_nce_in_batch": in_batch, "dino_loss": dino,
            "ibot_patch_loss": ibot, "ibot_targets": ibot_targets, "multilabel": multilabel, "mae": mae,
            "siglip": siglip, "clip": clip, "queue_push": queue_push, "bank_update": bank_update}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "bench"), default="small")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--profile-second-pass", action="store_true",
                        help="run every case twice, the second pass between cudaProfilerStart/Stop (ncu)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases, run nothing")
    args = parser.parse_args(argv)
    if args.profile_second_pass and args.device != "cuda":
        parser.error("--profile-second-pass: needs --device cuda (the profiler brackets CUDA work)")
    todo = cases(args.size, args.device)
    if args.dry_run:
        print(f"dry run: {args.size} cases on {args.device}: {', '.join(todo)}")
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU visible")
    for profiled in (False, True) if args.profile_second_pass else (False,):
        if profiled:
            torch.cuda.synchronize()
            torch.cuda.profiler.start()
        for name, run in todo.items():
            torch.manual_seed(0)
            run()
            if args.device == "cuda":
                torch.cuda.synchronize()
            print(f"{name}: ok{' (profiled)' if profiled else ''}", flush=True)
        if profiled:
            torch.cuda.profiler.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
