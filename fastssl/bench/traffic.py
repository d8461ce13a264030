"""A traffic model of each fused op against its official formula, runnable on a CPU.

For each op and benchmark shape, one training step of the loss (forward and backward):

* eager: the official formula (the op's `*_ref`) runs on meta tensors under a DispatchCounter:
  its kernels (every aten op that is not a view or an allocation), the bytes each reads and
  writes (inputs' distinct elements + outputs), and the peak memory it allocates, all measured;
  its FLOPs per op from torch.utils.flop_counter's registry (matmul-like ops only: the
  tensor-core work; elementwise math is left out on both sides).
* fused: the fused path runs on meta tensors with its Triton launches recorded instead of run:
  the torch ops around the kernels are measured as above, each kernel's bytes come from the
  formula written next to it (`KERNEL_TRAFFIC` in its op's kernels module, gathered by
  `fastssl.ops.kernel_traffic()`, FLOPs included), tested against the addresses the kernel touches
  under the Triton interpreter.

Predicted time = max(bytes / bandwidth, FLOPs / peak) summed over kernels, at the datasheet peaks
of an H100 SXM (`LIMITS`); launch overheads are left out. It is a model, not a measurement:
a real card reaches less than its datasheet peaks, so measured times will be longer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from unittest import mock

import torch

from fastssl.bench.counter import DispatchCounter, Launch, kernel_launches
from fastssl.ops import kernel_traffic
from fastssl.ops.backend import modeled_gpu

# (bytes/s, dense bf16 FLOP/s): NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column: GPU memory
# bandwidth 3.35 TB/s; BF16 Tensor Core 1,979 TFLOPS "with sparsity", half of it dense.
LIMITS = {"datasheet": (3.35e12, 989e12)}
LIMITS_SOURCE = ("H100 SXM datasheet peaks (NVIDIA H100 Tensor Core GPU datasheet): 3.35 TB/s HBM3, "
                 "989 TFLOP/s dense BF16 (1,979 with 2:4 sparsity)")
H100_SMS = 132


# ---------------------------------------------------------------- measuring one path


@dataclass
class PathCount:
    kernels: int
    bytes: int
    flops: int
    peak_bytes: int
    times: dict  # limit name -> predicted seconds


def _predict(ops: list[tuple[int, int]]) -> dict:
    """Each kernel (bytes, flops) runs at the slower of its two limits."""
    return {name: sum(max(b / bw, f / peak) for b, f in ops) for name, (bw, peak) in LIMITS.items()}


def _h100_device():
    """Launchers size their grids from the device (SM count); on meta tensors, an H100 SXM's."""
    props = mock.Mock(multi_processor_count=H100_SMS, shared_memory_per_block_optin=232448)
    return mock.patch.object(torch.cuda, "get_device_properties", lambda *a, **k: props)


@contextlib.contextmanager
def _fused_on_meta():
    """Let backend='triton' accept meta tensors and the launchers size their grids for the H100."""
    with modeled_gpu(H100_SMS), _h100_device():
        yield


def count_eager(make: Callable[[], tuple], step: Callable[..., None]) -> PathCount:
    """step(*make()) measured; the inputs are made outside the counter (not extra memory)."""
    inputs = make()
    with DispatchCounter() as counter:
        step(*inputs)
    ops = [(r.bytes_read + r.bytes_written, r.flops) for r in counter.records]
    return PathCount(
        counter.kernels, counter.bytes, sum(f for _, f in ops), counter.peak_bytes, _predict(ops)
    )


def count_fused(make: Callable[[], tuple], step: Callable[..., None]) -> tuple[PathCount, list[Launch]]:
    """step(*make()) with its Triton launches recorded, each costed by its kernel's formula."""
    formulas = kernel_traffic()
    inputs = make()
    with _fused_on_meta(), kernel_launches() as launches, DispatchCounter() as counter:
        step(*inputs)
    ops = [(r.bytes_read + r.bytes_written, r.flops) for r in counter.records]
    kernel_bytes, kernel_flops = 0, sum(f for _, f in ops)
    for launch in launches:
        read, written, f = formulas[launch.name](launch.args)
        ops.append((read + written, f))
        kernel_bytes += read + written
        kernel_flops += f
    return PathCount(
        counter.kernels + len(launches),
        counter.bytes + kernel_bytes,
        kernel_flops,
        counter.peak_bytes,
        _predict(ops),
    ), launches


# ---------------------------------------------------------------- the benchmark shapes

MAE_RATIO = 0.75


def _meta(*shape, dtype=torch.bfloat16, grad=False):
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_(grad)


def _info_nce_case(N, K, D, queue):
    from fastssl.ops.info_nce import info_nce, info_nce_ref

    def make():
        q = _meta(N, D, grad=True)
        if queue:  # MoCo v2: keys from the momentum encoder, the queue as given
            return q, _meta(N, D), _meta(K, D)
        return q, _meta(K, D, grad=True), None  # in-batch: both sides get a gradient

    def eager(q, k, qu):
        info_nce_ref(q, k, qu, temperature=0.2).backward()

    def fused(q, k, qu):
        info_nce(q, k, qu, temperature=0.2, backend="triton").backward()

    return make, eager, fused


def _dino_case(B, crops, K):
    from fastssl.losses.dino import DINOLoss

    def make(backend):
        criterion = DINOLoss(K, crops, 0.04, 0.04, 0, 100, backend=backend).to("meta")
        return criterion, _meta(crops * B, K, grad=True), _meta(2 * B, K)

    def step(criterion, student, teacher):  # loss, backward and the center update
        criterion(student, teacher, epoch=0).backward()

    return (lambda: make("torch"), step), (lambda: make("triton"), step)


def _mae_case(N, L, D):
    """Masking (+ pos, + class token), unshuffle (+ class token, + pos), loss on the tokens
    (P = D, as fastssl/bench/mae.py; the networks in between left out), norm-pix."""
    from fastssl.ops.mae import (
        mae_loss,
        mae_loss_ref,
        random_masking,
        random_masking_ref,
        unshuffle_tokens,
        unshuffle_tokens_ref,
    )

    def make():
        conv_out = _meta(N, D, L, grad=True)  # the patch embedding's output, as timm returns it
        return (
            conv_out.transpose(1, 2),
            _meta(1, 1 + L, D),
            _meta(1, 1, D, grad=True),
            _meta(D, grad=True),
            _meta(N, L, D),
        )

    def eager(x, pos, cls, token, target):
        noise = torch.rand(N, L, device="meta")
        kept, mask, ids = random_masking_ref(x, MAE_RATIO, noise=noise, pos_embed=pos[:, 1:],
                                             cls_token=cls + pos[:, :1])
        pred = unshuffle_tokens_ref(kept, token, ids, pos_embed=pos, with_cls_token=True)
        mae_loss_ref(pred, target, mask, norm_pix_loss=True, with_cls_token=True).backward()

    def fused(x, pos, cls, token, target):
        kept, mask, ids = random_masking(
            x, MAE_RATIO, pos_embed=pos[:, 1:], cls_token=cls + pos[:, :1], backend="triton"
        )
        pred = unshuffle_tokens(kept, token, ids, pos_embed=pos, with_cls_token=True, backend="triton")
        mae_loss(pred, target, mask, with_cls_token=True, backend="triton").backward()

    return make, eager, fused


def _multilabel_case(N, C):
    from fastssl.losses.multilabel import multilabel_softmax_loss

    def make():
        return _meta(N, C, grad=True), _meta(N, C)

    def step(backend):
        return lambda logits, targets: multilabel_softmax_loss(
            logits, targets, validate=False, backend=backend
        ).backward()

    return make, step("torch"), step("triton")


def _siglip_case(N, M, D):
    """One rank's N images against the M gathered texts (open_clip's dist_impl="gather"), its
    positives at offset 0, a learned fp32 scale and bias; both feature sets get a gradient."""
    from fastssl.ops.siglip_loss import siglip_loss, siglip_loss_ref

    def make():
        scale, bias = _meta((), dtype=torch.float32, grad=True), _meta((), dtype=torch.float32, grad=True)
        return _meta(N, D, grad=True), _meta(M, D, grad=True), scale, bias

    def eager(x, y, scale, bias):
        siglip_loss_ref(x, y, scale, bias).backward()

    def fused(x, y, scale, bias):
        siglip_loss(x, y, scale, bias, backend="triton").backward()

    return make, eager, fused


def ibot_case(B: int, L: int, n: int, K: int):
    """DINOv2's iBOT patch loss on one GPU: the patch head's logits [n, K] of the n masked tokens of
    B global crops of L patches, student (with a gradient) and teacher, softmax centering, per-image
    weights. eager: the official formula (ibot_patch_loss_ref: fp32 teacher softmax, student
    log-softmax, their product, over [n, K]); fused: ibot_patch_loss through the DINO kernels."""
    from fastssl.ops.ibot_patch_loss import ibot_patch_loss, ibot_patch_loss_ref

    def make():
        masks = torch.empty(B, L, dtype=torch.bool, device="meta")
        indices, weights = torch.empty(n, dtype=torch.int64, device="meta"), _meta(n, dtype=torch.float32)
        center = _meta(1, 1, K, dtype=torch.float32)
        return _meta(n, K, grad=True), _meta(n, K), center, masks, indices, weights

    def step(loss, **backend):
        return lambda s, t, center, masks, indices, weights: loss(
            s, t, center, masks=masks, mask_indices=indices, masks_weight=weights, **backend).backward()

    return make, step(ibot_patch_loss_ref), step(ibot_patch_loss, backend="triton")


# DINOv2's default configuration on one GPU: 64 images, so 128 global crops of 16 x 16 patches at 224 px
# (/14), half of them masked at ratios spread over 10-50%: 64 x 30% x 256 = 4,915 masked tokens.
IBOT_PAPER = dict(B=128, L=256, n=4915, K=65536)


def _clip_case(N, M, D, dtype=torch.bfloat16):
    """open_clip's ClipLoss on one rank, a learned fp32 scale, every feature set with a gradient:
    M = N its one grid (local_loss=False on one GPU; fused: both directions from one sweep), else
    local_loss=True with gather_with_grad, this rank's N rows against the M gathered of each tower."""
    from fastssl.ops.clip_loss import clip_loss, clip_loss_ref

    def make():
        rows = (N, N) if M == N else (N, N, M, M)  # images, texts[, all images, all texts]
        scale = _meta((), dtype=torch.float32, grad=True)
        image, text, *gathered = (_meta(n, D, dtype=dtype, grad=True) for n in rows)
        return image, text, scale, *gathered

    def step(loss, **backend):
        def run(x, y, scale, *gathered):
            kw = dict(zip(("all_image_features", "all_text_features"), gathered))
            loss(x, y, scale, **kw, **backend).backward()
        return run

    return make, step(clip_loss_ref), step(clip_loss, backend="triton")


# CLIP at its scales: a per-GPU batch of 256-1,024 of a 32k global batch, D = 512-1,024
CLIP_CASES = [
    ("clip one grid", "N=M=1024 D=512 bf16", lambda: _clip_case(1024, 1024, 512)),
    ("clip one grid", "N=M=1024 D=1024 bf16", lambda: _clip_case(1024, 1024, 1024)),
    ("clip one grid", "N=M=4096 D=768 bf16", lambda: _clip_case(4096, 4096, 768)),
    ("clip local", "N=256 of M=32768 D=1024 bf16", lambda: _clip_case(256, 32768, 1024)),
    ("clip local", "N=1024 of M=32768 D=768 bf16", lambda: _clip_case(1024, 32768, 768)),
    ("clip local", "N=1024 of M=32768 D=1024 fp32", lambda: _clip_case(1024, 32768, 1024, torch.float32)),
]


def _split(case):
    """(eager make, eager step), (fused make, fused step) of a case."""
    if len(case) == 2:
        return case
    make, eager, fused = case
    return (make, eager), (make, fused)


CASES = [
    ("info_nce moco_v2", "N=4096 K=65536 D=128 bf16", lambda: _info_nce_case(4096, 65536, 128, True)),
    ("info_nce in-batch", "N=M=4096 D=256 bf16", lambda: _info_nce_case(4096, 4096, 256, False)),
    ("dino_loss", "B=128 x 12 crops K=65536 bf16", lambda: _dino_case(128, 12, 65536)),
    ("mae mask+unshuffle+loss", "N=256 L=196 D=1024 bf16 r=0.75 norm-pix", lambda: _mae_case(256, 196, 1024)),
    ("multilabel softmax", "N=256 C=27000 bf16", lambda: _multilabel_case(256, 27000)),
    *CLIP_CASES,
    ("siglip gathered", "N=1024 of M=32768 D=768 bf16", lambda: _siglip_case(1024, 32768, 768)),
    ("ibot_patch_loss", "n=4915 masked of 128 x 256 tokens K=65536 bf16", lambda: ibot_case(**IBOT_PAPER)),
]


@dataclass
class Record:
    op: str
    shape: str
    eager_bytes: int
    fused_bytes: int
    eager_kernels: int
    fused_kernels: int
    eager_flops: int
    fused_flops: int
    eager_peak_bytes: int
    fused_peak_bytes: int
    predicted_speedup: float
    eager_time_s: dict
    fused_time_s: dict


def model() -> list[Record]:
    """One Record per benchmark op and shape (forward + backward)."""
    records = []
    for op, shape, build in CASES:
        eager_case, fused_case = _split(build())
        eager = count_eager(*eager_case)
        fused, _ = count_fused(*fused_case)
        records.append(
            Record(
                op,
                shape,
                eager.bytes,
                fused.bytes,
                eager.kernels,
                fused.kernels,
                eager.flops,
                fused.flops,
                eager.peak_bytes,
                fused.peak_bytes,
                eager.times["datasheet"] / fused.times["datasheet"],
                eager.times,
                fused.times,
            )
        )
    return records


def table(records: list[Record]) -> str:
    """The markdown table `fastssl bench --model` prints (times predicted at the datasheet peaks)."""
    mb = lambda b: f"{b / 1e6:,.1f}"  # noqa: E731
    us = lambda t: f"{t * 1e6:,.0f}"  # noqa: E731
    lines = [
        "| op | shape | kernels eager / fused | MB eager / fused (ratio) | GFLOP eager / fused | "
        "peak MB eager / fused | predicted µs eager / fused | predicted speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(
            f"| {r.op} | {r.shape} | {r.eager_kernels} / {r.fused_kernels} | {mb(r.eager_bytes)} / "
            f"{mb(r.fused_bytes)} ({r.fused_bytes / r.eager_bytes:.3f}) | {r.eager_flops / 1e9:,.1f} / "
            f"{r.fused_flops / 1e9:,.1f} | {mb(r.eager_peak_bytes)} / {mb(r.fused_peak_bytes)} | "
            f"{us(r.eager_time_s['datasheet'])} / {us(r.fused_time_s['datasheet'])} | "
            f"{r.predicted_speedup:.1f}x |"
        )
    return "\n".join(lines)


def goals(records: list[Record]) -> list[str]:
    """The model's goals, each with whether it holds."""
    by_op = {r.op: r for r in records}
    dino, mae, nce = by_op["dino_loss"], by_op["mae mask+unshuffle+loss"], by_op["info_nce moco_v2"]
    checks = [
        ("DINO fused bytes <= 1/8 of eager", dino.fused_bytes / dino.eager_bytes, 1 / 8),
        (
            "MAE masking + unshuffle + loss fused bytes <= 1/3 of eager",
            mae.fused_bytes / mae.eager_bytes,
            1 / 3,
        ),
        (
            "InfoNCE (N=4096, K=65536) peak extra memory <= 2% of eager",
            nce.fused_peak_bytes / nce.eager_peak_bytes,
            0.02,
        ),
        (
            "CLIP fused predicted time <= eager's at every CLIP row (worst fused / eager)",
            max(r.fused_time_s["datasheet"] / r.eager_time_s["datasheet"] for r in records
                if r.op.startswith("clip")),
            1.0,
        ),
    ]
    return [
        f"{'holds' if value <= limit else 'FAILS'}: {text} (model: {value:.4f})"
        for text, value, limit in checks
    ]


def main(json_path: str | None = None) -> int:
    """Print the model's table and goals; write the records as JSON lines (with machine, date,
    versions, git SHA) to json_path when given."""
    from pathlib import Path

    from fastssl.bench.harness import environment, write_rows

    records = model()
    env = environment()
    print(f"Traffic model (a model, not a measurement) · {env['date']} · torch {env['torch']} · "
          f"triton {env['triton']} · git {env['git_sha']}")
    print(f"limits: {LIMITS_SOURCE}; forward + backward; launch latency left out")
    print(table(records))
    for line in goals(records):
        print(line)
    print()
    from fastssl.bench import step_launches

    step_launches.main()
    if json_path:
        write_rows(Path(json_path), [asdict(r) for r in records], env)
    return 0
