"""Step time of the real Trainer loop with sharded (DCP) checkpoints written synchronously,
asynchronously (async_checkpoint: a staged CPU copy written in a background thread) and not
at all, on synthetic on-device views. The seconds per step include every save (and the last
asynchronous save's completion): `train_seconds` of the run over its steps.

GPU case: DINO ViT-S/16, a checkpoint every 5 steps. `--quick` (and any CPU run): DINO on a
12-block ViT-Tiny at 16 px, a checkpoint every 2 steps; the ratio, not the seconds, is the
figure (the background thread competes with training for the same cores on a CPU).

    fastssl bench checkpoint [--quick] [--out DIR]   (or python -m fastssl.bench.checkpoint)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from fastssl.bench.harness import environment, parse_args, publish
from fastssl.bench.train import SyntheticLoader
from fastssl.engine import Trainer, resolve_config
from fastssl.methods import METHODS

GPU_CASE = {"backbone": "vit_small_patch16", "image_size": 224, "local_crop_size": 96, "n_local_crops": 10,
            "out_dim": 65536, "batch_size": 64, "checkpoint_every": 5}
CPU_CASE = {"backbone": "vit_tiny_patch4", "image_size": 16, "local_crop_size": 8, "n_local_crops": 2,
            "out_dim": 128, "head_hidden_dim": 64, "batch_size": 8, "checkpoint_every": 2}
MODES = ("none", "sync", "async")


def measure(params: dict, mode: str, steps: int, out: Path) -> dict:
    """Seconds per step of `steps` DINO steps (parallel=fsdp: the sharded format) saving per `mode`."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cls = METHODS["dino"]
    every = params["checkpoint_every"] if mode != "none" else 0
    # one epoch longer than the run: no epoch-end checkpoint but the ones asked for
    cfg = resolve_config(cls.config_class, None, params | {
        "epochs": 1, "max_steps": steps, "warmup_epochs": 0.0, "eval_knn": False, "out": str(out),
        "log_every": 1_000_000, "parallel": "fsdp", "checkpoint_every": every, "compile": "false",
        "async_checkpoint": mode == "async"})
    torch.manual_seed(0)
    method = cls(cfg)
    loader = SyntheticLoader(method.recipe().view_sizes, cfg.data.batch_size, steps + 1, device)
    summary = Trainer(method, loader, progress=False, log=lambda m: None).fit()
    saves = steps // every if every else 0
    return {"mode": mode, "backbone": params["backbone"], "checkpoint_every": every, "steps": steps,
            "saves": saves, "step_s": summary["train_seconds"] / steps,
            "params": sum(p.numel() for p in method.parameters())}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(__doc__.split("\n\n")[0], argv)
    quick = args.quick or not torch.cuda.is_available()
    params, steps = (CPU_CASE, args.iters or 6) if quick else (GPU_CASE, args.iters or 30)
    env = environment()
    rows = []
    for mode in MODES:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(measure(params, mode, steps, Path(tmp)))
    base = rows[0]["step_s"]
    lines = [f"## Step time with sharded checkpoints ({env['device']}, torch {env['torch']}, {env['date']}, "
             f"git {env['git_sha']})", "",
             f"DINO {params['backbone']}, a checkpoint every {params['checkpoint_every']} steps, "
             f"{steps} steps.", "",
             "| checkpoints | s / step | vs none |", "|---|---|---|"]
    for row in rows:
        row["ratio_to_none"] = row["step_s"] / base
        lines.append(f"| {row['mode']} | {row['step_s']:.4f} | {row['ratio_to_none']:.2f}x |")
    publish("checkpoint", "\n".join(lines) + "\n", rows, env, args.out)


if __name__ == "__main__":
    main()
