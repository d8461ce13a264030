"""Model FLOPs of a training step and the model FLOPs utilisation (MFU) they give.

The FLOPs are counted once per run by torch.utils.flop_counter on meta tensors (a copy of the
method built on the meta device: no memory, no compute): the forward and backward of one
micro-batch of this rank, through the reference ops (the counter knows aten's matmuls and
attention, not fastssl's fused kernels, which do the same arithmetic). The optimizer and the
EMA update are not counted (elementwise: a few FLOPs per parameter).

MFU = achieved model FLOP/s / the card's dense bf16 peak (tensor cores, without sparsity):

    card        TFLOP/s   source (NVIDIA datasheets; they quote 2x "with sparsity")
    H100 SXM    989.5     https://www.nvidia.com/en-us/data-center/h100/
    H100 NVL    835.5     https://www.nvidia.com/en-us/data-center/h100/
    H100 PCIe   756.5     https://www.nvidia.com/en-us/data-center/h100/
    H200        989.5     https://www.nvidia.com/en-us/data-center/h200/
    A100        312       https://www.nvidia.com/en-us/data-center/a100/
    L4          121       https://www.nvidia.com/en-us/data-center/l4/
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

# (substring of torch.cuda.get_device_name(), dense bf16 TFLOP/s), most specific first
PEAK_BF16_TFLOPS = [("H100 NVL", 835.5), ("H100 PCIe", 756.5), ("H100", 989.5), ("H200", 989.5),
                    ("A100", 312.0), ("L4", 121.0)]


def peak_tflops(device: torch.device) -> float | None:
    """The card's dense bf16 peak in TFLOP/s, or None (a CPU, or a card not in the table)."""
    return card_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


def card_peak_tflops(name: str) -> float | None:
    """The dense bf16 peak of the card named `name` (as CUDA names it), or None when not in the table."""
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def mask_shapes(method: nn.Module, batch_size: int, device: str | torch.device) -> dict:
    """The batch keys of a masking method's block masks (method.masking()), shaped as one draw makes
    them, as empty tensors on `device` (meta, fake CUDA); {} for a method that does not mask."""
    from torch.utils._python_dispatch import _disable_current_modes

    masking = method.masking()
    if masking is None:
        return {}
    with _disable_current_modes():  # the draw is real CPU work, outside any fake mode
        drawn = masking.for_batch(batch_size, epoch=0, shard=0, batch=0)
    return {k: torch.empty(v.shape, dtype=v.dtype, device=device) if torch.is_tensor(v) else v
            for k, v in drawn.items()}


def step_flops(method: nn.Module, view_sizes: list[int], batch_size: int) -> int:
    """FLOPs of the forward and backward of `method` (a fresh copy on meta tensors, reference
    ops) on a batch of `batch_size` samples with views of `view_sizes` pixels."""
    from torch.utils.flop_counter import FlopCounterMode

    from fastssl.method import StepContext

    # accum_steps=1: `batch_size` is one micro-batch, and a GradCache replay is recompute, not model FLOPs
    model_cfg = dataclasses.replace(method.cfg.model, fused=False, compile="false")
    cfg = dataclasses.replace(method.cfg, model=model_cfg,
                              dist=dataclasses.replace(method.cfg.dist, accum_steps=1))
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = type(method)(cfg)
    schedules = {k: float(v[0]) for k, v in model.schedules(2, 1).items()}
    ctx = StepContext(step=0, epoch=0, steps_per_epoch=1, total_steps=2, lr=0.0, weight_decay=0.0,
                      schedules=schedules)
    # labels and indices stay real CPU tensors (methods check their values); images and model are meta
    batch = {"label": torch.zeros(batch_size, dtype=torch.long), "index": torch.arange(batch_size),
             "views": [torch.empty(batch_size, 3, s, s, device="meta") for s in view_sizes],
             **mask_shapes(model, batch_size, "meta")}
    with FlopCounterMode(display=False) as counter:
        model(batch, ctx)["loss"].backward()
    return counter.get_total_flops()


class StepFlops:
    """The model FLOPs of this rank's optimizer step (micro-batch FLOPs x accum_steps) and the
    rates they give: TFLOP/s per rank, and MFU where the card's peak is known."""

    def __init__(self, flops: int | None, peak: float | None):
        self.flops, self.peak = flops, peak

    @classmethod
    def of(cls, method: nn.Module, micro_batch: int, accum_steps: int, device: torch.device,
           log=print) -> StepFlops:
        """Counted once for the run; when the counter cannot run the method, one line says so
        and the rates are left out."""
        try:
            flops = step_flops(method, method.recipe().view_sizes, micro_batch) * accum_steps
        except Exception as e:  # the rates are a report; training does not depend on them
            log(f"flops: not counted ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); "
                "no TFLOP/s or MFU in the metrics")
            flops = None
        return cls(flops, peak_tflops(device))

    def rates(self, step_seconds: float) -> dict[str, float]:
        """{"tflops": model TFLOP/s of this rank, "mfu": its fraction of the peak (cards in the table)}."""
        if not self.flops or step_seconds <= 0:
            return {}
        tflops = self.flops / step_seconds / 1e12
        return {"tflops": tflops} | ({"mfu": tflops / self.peak} if self.peak else {})
