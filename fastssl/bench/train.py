"""End-to-end training throughput: images/s and peak memory of the real
Trainer loop (autocast, optimizer, EMA/queue updates, per-step loss check) on synthetic
on-device views, fused ops (`fused=True`) against every op's reference (`--fused false`).

GPU cases: MoCo v2 and v3 ResNet-50 at 224; DINO ViT-S/16 with 2 x 224 + 10 x 96 crops and
out_dim 65,536; MAE ViT-B/16 at 224. `--quick` (and any CPU run) uses tiny models and
batches: a smoke test of the loop, not a measurement. The steps never wait for the device, so
one step's host time says nothing: after the warm-up steps (which include any compilation), the
loader waits for the device (torch.cuda.synchronize) and records a CUDA event before every
WINDOW-th batch, and images/s = global batch x WINDOW / median window time between two events.

    fastssl bench train [--quick] [--out DIR]   (or python -m fastssl.bench.train [--iters N] [--dry-run])
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from fastssl.bench.harness import environment, parse_args, publish
from fastssl.engine import Trainer, resolve_config
from fastssl.methods import METHODS

GPU_CASES = [
    ("mocov2", {"backbone": "resnet50", "image_size": 224, "batch_size": 256}),
    ("mocov3", {"backbone": "resnet50", "image_size": 224, "batch_size": 256}),
    ("dino", {"backbone": "vit_small_patch16", "image_size": 224, "local_crop_size": 96, "n_local_crops": 10,
              "out_dim": 65536, "batch_size": 64}),
    ("mae", {"backbone": "vit_base_patch16", "image_size": 224, "batch_size": 128}),
]
CPU_CASES = [
    ("mocov2", {"backbone": "resnet18", "image_size": 8, "batch_size": 8, "queue_size": 64,
                "mlp_hidden_dim": 64}),
    ("mocov3", {"backbone": "resnet18", "image_size": 8, "batch_size": 8, "mlp_hidden_dim": 64}),
    ("rotnet", {"backbone": "resnet18", "image_size": 8, "batch_size": 8}),
    ("dino", {"backbone": "vit_tiny_patch4", "image_size": 16, "local_crop_size": 8, "n_local_crops": 2,
              "vit_depth": 1, "out_dim": 128, "head_hidden_dim": 64, "batch_size": 8}),
    ("mae", {"backbone": "vit_tiny_patch4", "image_size": 16, "vit_depth": 1, "decoder_depth": 1,
             "decoder_dim": 32, "decoder_heads": 2, "batch_size": 8}),
]


WINDOW = 5  # steps per timed window on a GPU


class SyntheticLoader:
    """The same on-device batch every step (data loading is not what this measures). Before
    yielding batch i for i in `marks` it waits for the device and notes the time, so the steps
    between two marks are one timed window."""

    def __init__(self, sizes: list[int], batch_size: int, steps: int, device: torch.device,
                 marks: Sequence[int] = ()):
        g = torch.Generator(device=device).manual_seed(0)
        self.batch = {
            "views": [torch.randn(batch_size, 3, s, s, device=device, generator=g) for s in sizes],
            "label": torch.randint(0, 10, (batch_size,), device=device, generator=g),
            "index": torch.arange(batch_size, device=device),
        }
        self.steps, self.marks, self.device = steps, set(marks), device
        self.stamps: list = []

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for i in range(self.steps):
            if i in self.marks:
                self.stamps.append(self._stamp())
            yield self.batch

    def _stamp(self):
        if self.device.type != "cuda":
            return time.perf_counter()
        torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def window_seconds(self) -> list[float]:
        pairs = zip(self.stamps, self.stamps[1:])
        if self.device.type != "cuda":
            return [b - a for a, b in pairs]
        torch.cuda.synchronize()
        return [a.elapsed_time(b) / 1e3 for a, b in pairs]


def config(method_name: str, params: dict, fused: bool, steps: int, out: Path):
    """The case's resolved config: `steps` steps, one epoch longer than the run (no epoch-end
    checkpoint inside the timed windows), no evaluation, no metrics flush until the end."""
    cls = METHODS[method_name]
    return resolve_config(cls.config_class, None, params | {
        "fused": fused, "epochs": 1, "max_steps": steps, "warmup_epochs": 0.0, "eval_knn": False,
        "out": str(out), "log_every": 1_000_000, "checkpoint_every": 0, "compile": "false"})


def measure(method_name: str, params: dict, fused: bool, warmup: int, window: int, windows: int,
            out: Path) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    marks = [warmup + i * window for i in range(windows + 1)]
    # one step after the last mark, so the last window ends before the run's final checkpoint
    cfg = config(method_name, params, fused, marks[-1] + 1, out)
    torch.manual_seed(0)
    method = METHODS[method_name](cfg)
    loader = SyntheticLoader(method.recipe().view_sizes, cfg.data.batch_size, marks[-1] + 2, device, marks)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    Trainer(method, loader, progress=False, log=lambda m: None).fit()
    with open(out / "metrics.jsonl") as f:
        final_loss = [json.loads(line) for line in f][-1]["loss"]
    step_s = statistics.median(loader.window_seconds()) / window
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return {"method": method_name, "fused": fused, "images_per_second": cfg.data.batch_size / step_s,
            "step_ms": 1e3 * step_s, "timed_steps": window * windows, "peak_memory_gib": peak,
            "final_loss": final_loss} | params


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    quick = args.quick or not torch.cuda.is_available()
    cases = CPU_CASES if quick else GPU_CASES
    if args.dry_run:  # the GPU cases' configs resolve (every key exists and is valid); nothing runs
        for name, params in GPU_CASES:
            for fused in (True, False):
                config(name, params, fused, 2, Path(tempfile.gettempdir()) / "unused")
            print(f"dry run: train {name} {params}")
        return
    warmup, window = (1, 1) if quick else (5, WINDOW)
    windows = max(1, (args.iters or (2 if quick else 20)) // window)
    env = environment()
    rows = []
    lines = [f"## Training throughput ({env['device']}, torch {env['torch']}, triton {env['triton']}, "
             f"{env['date']}, git {env['git_sha']})", "",
             "| method | backbone | batch | fused img/s | reference img/s | speedup | fused peak GiB | "
             "reference peak GiB |", "|---|---|---|---|---|---|---|---|"]
    if quick:
        lines.insert(1, "\n(smoke run: tiny models; not a measurement)")
    for name, params in cases:
        if name not in METHODS:
            print(f"skipping {name}: method not registered")
            continue
        pair = {}
        for fused in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                pair[fused] = measure(name, params, fused, warmup, window, windows, Path(tmp))
            rows.append(pair[fused])
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        f, r = pair[True], pair[False]
        mem = lambda row: "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        fast, ref = f["images_per_second"], r["images_per_second"]
        lines.append(f"| {name} | {params['backbone']} | {params['batch_size']} | {fast:.1f} | {ref:.1f} | "
                     f"{fast / ref:.2f}x | {mem(f)} | {mem(r)} |")
        print(lines[-1], flush=True)
    publish("train", "\n".join(lines) + "\n", rows, env, args.out)


if __name__ == "__main__":
    main()
