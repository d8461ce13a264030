"""The memory plan: per-GPU bytes of one training step of DINO and MAE at scale, measured on fake
tensors (no GPU, no real memory), for DDP and FSDP with and without activation checkpointing
(full: each transformer block recomputed; selective, for ViT-L and ViT-H: its matmul and
attention outputs kept, the rest recomputed).

How it measures: a fake process group ("fake" backend) of `world` ranks lets FSDP2 shard the
method exactly as it would on `world` GPUs; the method is built on the meta device, sharded
(fastssl.engine.parallel.shard_method, the code training runs), then materialised as
FakeTensors. An optimizer step on zero gradients creates the AdamW state; then a training
step (zero_grad, bf16 autocast forward, backward, per-parameter clipping, AdamW, EMA teacher
update) runs under torch's
memory tracker (`torch.distributed._tools` MemTracker / FSDPMemTracker), which follows every
storage the step allocates and frees. Parameters, gradients, optimizer state and teacher are
the bytes of this rank's tensors (shards under FSDP, padding included); activations are what
the tracker attributes to them at the step's peak; peak is the tracker's total at that moment
(it also holds all-gathered parameters, temporaries and the inputs). Not included: the CUDA
context and allocator fragmentation (a few GB on a real card); DDP's gradient buckets are the
gradients themselves (the trainer sets gradient_as_bucket_view). Autocast runs on the CPU's op
list, and attention and the DINO loss take their CPU paths (the reference DINO loss keeps a
few [rows, 65536] temporaries the fused kernel does not).

Run as `fastssl bench --memory [--out DIR]` (or `python -m fastssl.bench.memory`): the process
joins a fake process group, so it must not be a training process. `--out DIR` writes the rows
(bytes, with machine, date, versions and git SHA) to DIR/memory_plan.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed.tensor import DTensor

from fastssl.bench.harness import environment, write_rows

GIB = 1024**3
CARD_BYTES = 80 * 10**9  # an "80 GB" A100 / H100

# (method, ViT) pairs of the plan and each method's global batch (the papers' defaults)
MODELS = {"dino": ["vit_small_patch16", "vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"],
          "mae": ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"]}
GLOBAL_BATCH = {"dino": 1024, "mae": 4096}
WORLDS = (8, 64)
SETUPS = [("ddp", "none"), ("ddp", "full"), ("fsdp", "none"), ("fsdp", "full")]
SELECTIVE_SETUPS = [("ddp", "selective"), ("fsdp", "selective")]
SELECTIVE_BACKBONES = ("vit_large_patch16", "vit_huge_patch14")


def ac_mode(checkpointing: bool | str) -> str:
    """A row's activation checkpointing as none | full | selective (rows written before the
    selective mode hold a bool: full or none)."""
    if isinstance(checkpointing, bool):
        return "full" if checkpointing else "none"
    return checkpointing


def _config(method: str, backbone: str, **overrides) -> Any:
    from fastssl.engine.config import resolve_config
    from fastssl.methods import METHODS

    cls = METHODS[method]
    base = dict(backbone=backbone, image_size=224, batch_size=GLOBAL_BATCH[method], eval_knn=False)
    if method == "dino":  # the paper's multi-crop: 2 x 224 + 10 x 96, 65,536 prototypes
        # (ViT-H/14: 10 x 98 as DINOv2's /14 models, since 96 px is not a whole number of 14 px patches)
        local = 98 if backbone.endswith("patch14") else 96
        base |= dict(n_local_crops=10, local_crop_size=local, out_dim=65536, drop_path_rate=0.1)
    return cls, resolve_config(cls.config_class, overrides=base | overrides)


def _bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        total += t.numel() * t.element_size()
    return total


def _step_tracker(model: nn.Module, optimizer: torch.optim.Optimizer, fsdp: bool):
    """torch's FSDPMemTracker (FSDP) or MemTracker (a replica, DDP) keeping the step's peak only.

    Two adjustments, both in what is recorded, not in what is counted: the per-module peaks,
    which torch updates by walking every module on every op (hours for a ViT-H step here), are
    not kept; and a replica's frozen parameters (an EMA teacher) get no gradient hooks, which
    torch would try to register and refuse ("cannot register a hook on a tensor that doesn't
    require gradient"); gradients are still tracked through the trainable submodules."""
    from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
    from torch.distributed._tools.mem_tracker import MemTracker

    class StepPeakTracker(FSDPMemTracker if fsdp else MemTracker):
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap["Total"]:
                    self._peak_mem[dev] = snap["Total"]
                    self._peak_mem_snap[dev] = dict(snap)

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            trainable = all(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trainable)

    return StepPeakTracker(model, optimizer) if fsdp else StepPeakTracker()


def measure(method: str, backbone: str, parallel: str, checkpointing: bool | str, world: int,
            per_gpu_batch: int, **overrides) -> dict[str, Any]:
    """Per-GPU bytes of one step (see the module docstring). Needs the fake process group of
    `world` ranks (`join_fake_group`). Returns params, grads, optimizer, teacher, activations,
    peak (bytes) with the setting. checkpointing: none | full | selective (a bool: full or none)."""
    from fastssl.engine.optim import build_optimizer
    from fastssl.engine.parallel import apply_activation_checkpointing, shard_method
    from fastssl.method import StepContext

    if dist.get_world_size() != world:
        raise ValueError(f"world: the fake process group has {dist.get_world_size()} ranks, got {world}")
    cls, cfg = _config(method, backbone, **overrides)
    cpu = torch.device("cpu")
    with torch.device("meta"):
        model = cls(cfg)
    checkpointing = ac_mode(checkpointing)
    if checkpointing != "none":
        apply_activation_checkpointing(model, checkpointing)
    if parallel == "fsdp":
        shard_method(model, cpu)
    sizes = [cfg.data.image_size] * (2 if method == "dino" else 1)
    if method == "dino":
        sizes += [cfg.method.local_crop_size] * cfg.method.n_local_crops
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=cpu)
        optimizer = build_optimizer(cfg, model.parameter_groups())
        batch = {"views": [torch.empty(per_gpu_batch, 3, s, s) for s in sizes]}
        # epoch 1: past DINO's frozen last layer, so every parameter has a gradient and an AdamW state
        ctx = StepContext(step=1, epoch=1, steps_per_epoch=1, total_steps=10, lr=1e-4, weight_decay=0.04,
                          schedules={"teacher_momentum": 0.996})

        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch, ctx)["loss"]
            loss.backward()
            model.before_optimizer_step(ctx)
            optimizer.step()
            model.after_optimizer_step(ctx)

        # the AdamW state (held throughout the measured step) comes from a step on zero gradients
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        optimizer.step()
        tracker = _step_tracker(model, optimizer, parallel == "fsdp")
        if parallel == "fsdp":
            tracker.track_inputs((batch["views"],))
        else:
            tracker.track_external(model, optimizer, batch["views"])
        with tracker:
            step()
        peak = tracker.get_tracker_snapshot("peak")[cpu]
        trainable = [p for p in model.parameters() if p.requires_grad]
        frozen = [p for p in model.parameters() if not p.requires_grad]
        states = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        result = {
            "method": method, "backbone": backbone, "parallel": parallel, "checkpointing": checkpointing,
            "world": world, "per_gpu_batch": per_gpu_batch, "reg_tokens": cfg.model.vit_reg_tokens,
            "params": _bytes(trainable), "grads": _bytes(p.grad for p in trainable),
            "optimizer": _bytes(states), "teacher": _bytes(frozen),
            "activations": peak.get("Activation", 0), "peak": peak["Total"],
        }
    return result


def join_fake_group(world: int) -> None:
    """This process becomes rank 0 of a fake process group of `world` ranks (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def default_setups(backbone: str) -> list[tuple[str, str]]:
    """(parallel, activation checkpointing) pairs measured for a ViT: selective for the large ones."""
    return SETUPS + (SELECTIVE_SETUPS if backbone in SELECTIVE_BACKBONES else [])


def plan(models: dict[str, list[str]] = MODELS, worlds=WORLDS, setups=default_setups,
         reg_tokens: int = 0) -> list[dict]:
    """measure() every (GPU count, method, ViT, setup of `setups(ViT)`) at the method's global
    batch, DINO's ViTs with `reg_tokens` register tokens (MAE's ViT has none); prints each row as
    it comes (markdown) and returns them all."""
    rows = []
    for world in worlds:
        join_fake_group(world)
        for method, backbones in models.items():
            for backbone in backbones:
                for parallel, checkpointing in setups(backbone):
                    t0 = time.perf_counter()
                    per_gpu = GLOBAL_BATCH[method] // world
                    registers = {"vit_reg_tokens": reg_tokens} if reg_tokens and method == "dino" else {}
                    row = measure(method, backbone, parallel, checkpointing, world, per_gpu, **registers)
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    print(format_row(row), flush=True)
    dist.destroy_process_group()
    return rows


HEADER = ("| method | ViT | parallel | act. ckpt | GPUs | batch/GPU | params | grads | AdamW | teacher | "
          "activations | peak | fits 80 GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    gib = [f"{r[k] / GIB:.2f}" for k in ("params", "grads", "optimizer", "teacher", "activations", "peak")]
    fits = "yes" if r["peak"] < CARD_BYTES else "**no**"
    registers = f"+reg{r['reg_tokens']}" if r.get("reg_tokens") else ""
    return (f"| {r['method']} | {r['backbone'].removeprefix('vit_')}{registers} | {r['parallel']} | "
            f"{ac_mode(r['checkpointing'])} | {r['world']} | {r['per_gpu_batch']} | "
            + " | ".join(gib) + f" | {fits} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S DINO and ViT-B MAE only")
    parser.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="GPU counts, e.g. 8,64")
    parser.add_argument("--backbones", help="only these ViTs, in this order, e.g. vit_huge_patch14")
    parser.add_argument("--out", type=Path, help="folder for memory_plan.jsonl (the rows as data)")
    parser.add_argument("--reg-tokens", type=int, default=0,
                        help="register tokens of DINO's ViTs (DINOv2's: 4)")
    parser.add_argument("--checkpointing", help="only these activation checkpointing modes, e.g. selective")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to --out's memory_plan.jsonl, keeping the rows it holds")
    args = parser.parse_args(argv)
    models = {"dino": MODELS["dino"][:1], "mae": MODELS["mae"][:1]} if args.quick else MODELS
    if args.backbones:
        wanted = args.backbones.split(",")
        models = {m: [b for b in wanted if b in backbones] for m, backbones in models.items()}
    env = environment()
    print(f"# memory plan, GiB per GPU, measured on fake tensors ({env['date']}, torch {env['torch']}, "
          f"{env['device']}, git {env['git_sha']})")
    print(HEADER, flush=True)
    modes = args.checkpointing.split(",") if args.checkpointing else ["none", "full", "selective"]
    rows = plan(models, worlds=[int(w) for w in args.worlds.split(",")],
                setups=lambda b: [s for s in default_setups(b) if s[1] in modes], reg_tokens=args.reg_tokens)
    if args.out:
        path = args.out / "memory_plan.jsonl"
        kept = []
        if args.append and path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines()]
        write_rows(path, kept + [{**env, **r} for r in rows], env={})
    return 0


if __name__ == "__main__":
    sys.exit(main())

