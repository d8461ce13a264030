"""The memory plan: per-GPU bytes of one training step of DINO, MAE and DINOv2 at scale, measured on
fake tensors (no GPU, no real memory), for DDP, FSDP and HSDP with and without activation
checkpointing (full: each transformer block recomputed; selective, for ViT-L, ViT-H and ViT-g: its
matmul and attention outputs kept, the rest recomputed). HSDP rows use a 2 x 8 mesh (2 nodes of 8
GPUs: the model state sharded over the 8 GPUs of a node, replicated over the 2 nodes).

DINOv2 at paper scale (its default configuration; the giant as its vitg14 configuration): 2 x 224
+ 8 x 98 px crops, 65,536 prototypes (ViT-g/14: 131,072, a separate iBOT head, bottleneck 384),
half of the global crops masked at 10-50% by the block masking the loader uses; the official
per-GPU batches (64; ViT-g/14: 12). Each DINOv2 row also gives the peak memory of its iBOT patch
loss alone, the official formula against the fused kernel (fastssl.bench.traffic on meta tensors).

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

Instance discrimination's memory bank (fastssl.bank.MemoryBank, replicated on every GPU) is not
a step to trace but a buffer: its rows are predicted from MemoryBank.bytes, with the negatives the
NCE form samples per step.

Run as `fastssl bench --memory [--out DIR]` (or `python -m fastssl.bench.memory`): the process
joins a fake process group, so it must not be a training process. `--out DIR` writes the rows
(bytes, with machine, date, versions and git SHA) to DIR/memory_plan.jsonl and the memory bank's
to DIR/memory_bank.jsonl.
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
          "mae": ["vit_base_patch16", "vit_large_patch16", "vit_huge_patch14"],
          "dinov2": ["vit_small_patch14", "vit_large_patch14", "vit_giant_patch14"]}
GLOBAL_BATCH = {"dino": 1024, "mae": 4096}
# DINOv2's per-GPU batches: its ssl_default_config (64) and vitg14 configuration (12)
DINOV2_BATCH_PER_GPU = {"vit_small_patch14": 64, "vit_large_patch14": 64, "vit_giant_patch14": 12}
# DINOv2's vitg14 configuration: 131,072 prototypes, a separate iBOT head, bottleneck 384, drop path 0.4
DINOV2_GIANT = dict(out_dim=131072, separate_patch_head=True, bottleneck_dim=384, drop_path_rate=0.4)
WORLDS = (8, 64)
HSDP_MESH = (2, 8)  # (replicas, shard size): 2 nodes x 8 GPUs
SETUPS = [("ddp", "none"), ("ddp", "full"), ("fsdp", "none"), ("fsdp", "full")]
LARGE_SETUPS = [("ddp", "selective"), ("fsdp", "selective")]
HSDP_SETUPS = [("hsdp", "none"), ("hsdp", "full"), ("hsdp", "selective")]
LARGE_BACKBONES = ("vit_large_patch16", "vit_huge_patch14", "vit_large_patch14", "vit_giant_patch14")


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
    base = dict(backbone=backbone, image_size=224, batch_size=GLOBAL_BATCH.get(method, 1024), eval_knn=False)
    # 96 px local crops for /16 models, 98 px for /14 ones (as DINOv2's: a whole number of patches)
    local = 98 if backbone.endswith("patch14") else 96
    if method == "dino":  # the paper's multi-crop: 2 x 224 + 10 x 96, 65,536 prototypes
        base |= dict(n_local_crops=10, local_crop_size=local, out_dim=65536, drop_path_rate=0.1)
    if method == "dinov2":  # DINOv2's defaults: 2 x 224 + 8 x 98, 65,536 prototypes, masks at 10-50%
        base |= dict(n_local_crops=8, local_crop_size=local, out_dim=65536)
        base |= DINOV2_GIANT if "giant" in backbone else {}
    return cls, resolve_config(cls.config_class, overrides=base | overrides)


def batch_per_gpu(method: str, backbone: str, world: int) -> int:
    """The method's global batch split over `world` GPUs; DINOv2's official per-GPU batch."""
    return DINOV2_BATCH_PER_GPU[backbone] if method == "dinov2" else GLOBAL_BATCH[method] // world


def _masks(model: nn.Module, per_gpu: int) -> dict:
    """DINOv2's block masks of this GPU's global crops, drawn by the loader's generator (real CPU tensors)."""
    masks = model.masking().for_batch(per_gpu, epoch=0, shard=0, batch=0)
    return {k: masks[k] for k in ("masks", "mask_indices", "masks_weight")}


def ibot_loss_peaks(masks: dict, K: int) -> tuple[int, int]:
    """Peak bytes of the iBOT patch loss (forward + backward) on these masks' tokens: the official
    formula and the fused kernel, on meta tensors."""
    from fastssl.bench import traffic

    B, L = masks["masks"].shape
    make, eager, fused = traffic.ibot_case(B, L, masks["mask_indices"].numel(), K)
    return traffic.count_eager(make, eager).peak_bytes, traffic.count_fused(make, fused)[0].peak_bytes


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
            per_gpu_batch: int, *, replicate_size: int = HSDP_MESH[0], **overrides) -> dict[str, Any]:
    """Per-GPU bytes of one step (see the module docstring). Needs the fake process group of
    `world` ranks (`join_fake_group`). Returns params, grads, optimizer, teacher, activations,
    peak (bytes) with the setting. parallel: ddp | fsdp | hsdp (over a replicate_size x
    world / replicate_size mesh); checkpointing: none | full | selective (a bool: full or none).
    DINOv2 rows add the masked tokens and the iBOT loss's peaks (`ibot_loss_peaks`)."""
    from fastssl.engine.optim import build_optimizer
    from fastssl.engine.parallel import apply_activation_checkpointing, device_mesh, shard_method
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
    mesh = None
    if parallel != "ddp":
        mesh = device_mesh(parallel, cpu, world, replicate_size if parallel == "hsdp" else None)
        shard_method(model, cpu, mesh)
    multi_crop = method in ("dino", "dinov2")
    sizes = [cfg.data.image_size] * (2 if multi_crop else 1)
    if multi_crop:
        sizes += [cfg.method.local_crop_size] * cfg.method.n_local_crops
    masks = _masks(model, per_gpu_batch) if method == "dinov2" else {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device=cpu)
        optimizer = build_optimizer(cfg, model.parameter_groups())
        batch = {"views": [torch.empty(per_gpu_batch, 3, s, s) for s in sizes], **masks}
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
        tracker = _step_tracker(model, optimizer, mesh is not None)
        if mesh is not None:
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
            "mesh": list(mesh.shape) if mesh is not None and mesh.ndim == 2 else None,
        }
    if masks:
        eager, fused = ibot_loss_peaks(masks, cfg.method.out_dim)
        result |= {"out_dim": cfg.method.out_dim, "ibot_masked_tokens": masks["mask_indices"].numel(),
                   "ibot_loss_peak_eager": eager, "ibot_loss_peak_fused": fused}
    return result


def join_fake_group(world: int) -> None:
    """This process becomes rank 0 of a fake process group of `world` ranks (collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        dist.destroy_process_group()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world)


def default_setups(backbone: str) -> list[tuple[str, str]]:
    """(parallel, activation checkpointing) pairs measured for a ViT: selective for the large ones."""
    return SETUPS + (LARGE_SETUPS if backbone in LARGE_BACKBONES else [])


def hsdp_setups(backbone: str) -> list[tuple[str, str]]:
    """The HSDP pairs measured for a ViT on the HSDP mesh: the large ViTs only."""
    return HSDP_SETUPS if backbone in LARGE_BACKBONES else []


def plan(models: dict[str, list[str]] = MODELS, worlds=WORLDS, setups=default_setups,
         reg_tokens: int = 0, hsdp_mesh: tuple[int, int] | None = HSDP_MESH, hsdp=hsdp_setups) -> list[dict]:
    """measure() every (GPU count, method, ViT, setup of `setups(ViT)`) at the method's batch
    (`batch_per_gpu`), then every setup of `hsdp(ViT)` on the (replicas, shard size) `hsdp_mesh`;
    DINO's and DINOv2's ViTs with `reg_tokens` register tokens (MAE's ViT has none); prints each
    row as it comes (markdown) and returns them all."""
    rows = []
    passes = [(world, setups) for world in worlds]
    if hsdp_mesh:
        passes.append((hsdp_mesh[0] * hsdp_mesh[1], hsdp))
    for world, setups_of in passes:
        join_fake_group(world)
        for method, backbones in models.items():
            for backbone in backbones:
                for parallel, checkpointing in setups_of(backbone):
                    t0 = time.perf_counter()
                    per_gpu = batch_per_gpu(method, backbone, world)
                    options = {"vit_reg_tokens": reg_tokens} if reg_tokens and method != "mae" else {}
                    if hsdp_mesh:
                        options["replicate_size"] = hsdp_mesh[0]
                    row = measure(method, backbone, parallel, checkpointing, world, per_gpu, **options)
                    row["seconds"] = time.perf_counter() - t0
                    rows.append(row)
                    print(format_row(row), flush=True)
    dist.destroy_process_group()
    return rows


# Instance discrimination's bank at ImageNet scale: (data set, images), the paper's D = 128 and
# its NCE form: m = 4096 negatives per image, global batch 256 (fastssl.methods.instdisc's defaults)
BANK_DATASETS = [("ImageNet-1k", 1_281_167), ("ImageNet-22k", 14_197_122)]
BANK_DIM, BANK_NEGATIVES, BANK_GLOBAL_BATCH, BANK_WORLD = 128, 4096, 256, 8


def bank_rows() -> list[dict]:
    """Predicted per-GPU bytes of instdisc's memory bank (replicated: every GPU holds all N rows;
    MemoryBank.bytes) and of the negatives its NCE form samples in a step on one of BANK_WORLD GPUs
    (m rows per image in the bank's dtype, their int64 indices, and the float32 copy the loss makes
    of rows that are not float32)."""
    from fastssl.bank import MemoryBank

    per_gpu = BANK_GLOBAL_BATCH // BANK_WORLD
    rows = []
    for dataset, size in BANK_DATASETS:
        for dtype in (torch.float32, torch.bfloat16):
            drawn = per_gpu * BANK_NEGATIVES
            negatives = drawn * (BANK_DIM * dtype.itemsize + 8)
            if dtype != torch.float32:
                negatives += drawn * BANK_DIM * 4
            rows.append({"dataset": dataset, "size": size, "dim": BANK_DIM,
                         "dtype": str(dtype).removeprefix("torch."), "world": BANK_WORLD,
                         "per_gpu_batch": per_gpu, "negatives": BANK_NEGATIVES,
                         "bank": MemoryBank.bytes(size, BANK_DIM, dtype), "negatives_bytes": negatives,
                         "predicted": True})
    return rows


BANK_HEADER = ("| data set | N x D | dtype | bank per GPU (replicated) | NCE negatives per step | "
               "share of 80 GB |\n|---|---|---|---|---|---|")


def format_bank_row(r: dict) -> str:
    total = r["bank"] + r["negatives_bytes"]
    return (f"| {r['dataset']} | {r['size']:,} x {r['dim']} | {r['dtype']} | {r['bank'] / GIB:.2f} GiB | "
            f"{r['negatives_bytes'] / GIB:.2f} GiB ({r['per_gpu_batch']} img x {r['negatives']}) | "
            f"{total / CARD_BYTES:.1%} |")


HEADER = ("| method | ViT | parallel | act. ckpt | GPUs | batch/GPU | params | grads | AdamW | teacher | "
          "activations | peak | fits 80 GB |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def format_row(r: dict) -> str:
    gib = [f"{r[k] / GIB:.2f}" for k in ("params", "grads", "optimizer", "teacher", "activations", "peak")]
    fits = "yes" if r["peak"] < CARD_BYTES else "**no**"
    registers = f"+reg{r['reg_tokens']}" if r.get("reg_tokens") else ""
    gpus = "{} ({} x {})".format(r["world"], *r["mesh"]) if r.get("mesh") else r["world"]
    return (f"| {r['method']} | {r['backbone'].removeprefix('vit_')}{registers} | {r['parallel']} | "
            f"{ac_mode(r['checkpointing'])} | {gpus} | {r['per_gpu_batch']} | "
            + " | ".join(gib) + f" | {fits} |")


IBOT_HEADER = ("| ViT | batch/GPU | K | masked tokens | iBOT loss peak, official formula | fused | ratio |\n"
               "|---|---|---|---|---|---|---|")


def ibot_table(rows: list[dict]) -> list[str]:
    """The DINOv2 rows' iBOT loss peaks (GiB), once per (ViT, batch, K, masked tokens)."""
    lines, seen = [], set()
    for r in rows:
        key = (r["backbone"], r["per_gpu_batch"], r["out_dim"], r["ibot_masked_tokens"])
        if r["method"] != "dinov2" or key in seen:
            continue
        seen.add(key)
        eager, fused = r["ibot_loss_peak_eager"], r["ibot_loss_peak_fused"]
        lines.append(f"| {r['backbone'].removeprefix('vit_')} | {r['per_gpu_batch']} | {r['out_dim']:,} | "
                     f"{r['ibot_masked_tokens']:,} | {eager / GIB:.2f} GiB | {fused / GIB:.3f} GiB | "
                     f"{eager / fused:.0f}x |")
    return [IBOT_HEADER] + lines


def _mesh(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    replicas, _, shard = text.partition("x")
    if not (replicas.isdigit() and shard.isdigit() and int(replicas) > 0 and int(shard) > 0):
        raise argparse.ArgumentTypeError(f"expected REPLICASxSHARD (e.g. 2x8) or none, got {text!r}")
    return int(replicas), int(shard)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="ViT-S DINO and ViT-B MAE only")
    parser.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="GPU counts, e.g. 8,64")
    parser.add_argument("--methods", help=f"only these methods, e.g. dinov2 (of {', '.join(MODELS)})")
    parser.add_argument("--backbones", help="only these ViTs, in this order, e.g. vit_huge_patch14")
    parser.add_argument("--parallel", help="only these of ddp, fsdp, hsdp, e.g. hsdp")
    parser.add_argument("--hsdp-mesh", type=_mesh, default=HSDP_MESH,
                        help="the HSDP rows' REPLICASxSHARD mesh (default 2x8: 2 nodes x 8 GPUs), or none")
    parser.add_argument("--out", type=Path,
                        help="folder for memory_plan.jsonl and memory_bank.jsonl (the rows as data)")
    parser.add_argument("--reg-tokens", type=int, default=0,
                        help="register tokens of DINO's and DINOv2's ViTs (DINOv2's: 4)")
    parser.add_argument("--checkpointing", help="only these activation checkpointing modes, e.g. selective")
    parser.add_argument("--append", action="store_true",
                        help="add the rows to --out's memory_plan.jsonl, keeping the rows it holds")
    args = parser.parse_args(argv)
    models = {"dino": MODELS["dino"][:1], "mae": MODELS["mae"][:1]} if args.quick else MODELS
    if args.methods:
        models = {m: b for m, b in models.items() if m in args.methods.split(",")}
    if args.backbones:
        wanted = args.backbones.split(",")
        models = {m: [b for b in wanted if b in backbones] for m, backbones in models.items()}
    env = environment()
    print(f"# memory plan, GiB per GPU, measured on fake tensors ({env['date']}, torch {env['torch']}, "
          f"{env['device']}, git {env['git_sha']})")
    print(HEADER, flush=True)
    modes = args.checkpointing.split(",") if args.checkpointing else ["none", "full", "selective"]
    modes_of = (args.parallel or "ddp,fsdp,hsdp").split(",")

    def chosen(setups_of):
        return lambda b: [s for s in setups_of(b) if s[0] in modes_of and s[1] in modes]

    rows = plan(models, worlds=[int(w) for w in args.worlds.split(",") if w], setups=chosen(default_setups),
                reg_tokens=args.reg_tokens, hsdp_mesh=args.hsdp_mesh, hsdp=chosen(hsdp_setups))
    banks = bank_rows()
    print(f"\n# instdisc's memory bank, predicted (MemoryBank.bytes), {BANK_WORLD} GPUs\n{BANK_HEADER}")
    print("\n".join(format_bank_row(r) for r in banks))
    if args.out:
        path = args.out / "memory_plan.jsonl"
        kept = []
        if args.append and path.exists():
            kept = [json.loads(line) for line in path.read_text().splitlines()]
        write_rows(path, kept + [{**env, **r} for r in rows], env={})
        write_rows(args.out / "memory_bank.jsonl", banks, env=env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
