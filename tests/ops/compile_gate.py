"""Ahead-of-time compile gate: every Triton kernel of fastssl, compiled for real NVIDIA cards with
no GPU and no driver, at the configurations its launcher picks for a grid of real shapes.

    python tests/ops/compile_gate.py --targets 80,89,90,100 [--json FILE] [--results FILE]

How the configurations are found: the public ops (info_nce, clip_loss, dino_loss, soft_cross_entropy,
random_masking, unshuffle_tokens, mae_loss, siglip_loss, ibot_patch_loss, ibot_patch_cross_entropy) run
on shape-only CUDA tensors (FakeTensorMode) with each custom op's fake implementation swapped for its real
one followed by its registered backward,
so the real launchers run, forward and backward; torch.cuda.get_device_properties answers for the target
card, and kernel launches (JITFunction.run, Autotuner.run) are recorded instead of run. Each recorded
launch is bound by the JIT's own binder (signature, constexprs, specialization) and compiled by
triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32)): ttir -> ... -> cubin, the last stage
by the ptxas bundled with Triton, whose -v log gives registers and spills; shared memory is Triton's
metadata. Only loading a cubin needs a driver. The capture lives in gate_capture.py, the compile in
gate_compile.py, the tables and the published summary (--results) in gate_report.py.

Besides the shape grid, the gate compiles what the library itself launches: each method's
training step at its paper configuration (gate_call_sites.py), under bf16 autocast; and every
flag/dtype combination the public ops accept at one small shape (gate_flag_grid.py), for sm_90
only (FLAG_GRID_TARGETS): the configuration a flag selects compiles alike for every target, and the
shape grid checks the tiles of each card; sm_90 is the target the suite's coverage check compares
with (gate_coverage.py), and one target keeps the grid's ~400 compiles within CI's time.

A compile is identified by Triton's own cache key (kernel source and dependencies, constexprs,
specialization, target, options, Triton version), so shapes that specialize alike compile once;
its figures are stored beside Triton's cache (one small JSON per key and gate version, a hash of
the code that turns a compile into a verdict) and re-read on later runs.

Fails (exit 1) on: a compile error; a register spill in a configuration the launcher keeps on
the card; shared memory above the card's opt-in limit in a fixed launch, or in every
configuration of an autotuned one (Triton's autotuner drops a configuration whose launch runs
out of resources, so only those that fit are kept); a tl.dot, in a kernel or a helper it calls,
that is not lowered to tensor cores (its TTGIR op and the PTX's wgmma on sm_90, mma on the others;
gate_dots.py); a @triton.jit kernel of fastssl.ops
that no scenario launches. Needs a CUDA build of torch (no GPU) and triton; run it in a process
without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pkgutil
import re
import sys
import time
from pathlib import Path

import gate_dots  # beside this file
import gate_report
from gate_capture import CARDS, Launch, Ptr, expand, fake_cuda
from gate_compile import cached_compile, compile_key, target_supported

DTYPE_NAMES = ("fp32", "bf16", "fp16")
FLAG_GRID, FLAG_GRID_TARGETS = "flags ", (90,)  # the flag grid's scenario names start with FLAG_GRID


# ----------------------------------------------------------------------------- scenarios


def scenarios():
    """(name, callable) for the shape grid, then each method's training step at its paper
    configuration (gate_call_sites.py), then the flag grid (gate_flag_grid.py); each runs on fake
    CUDA tensors (under FakeTensorMode); fake_cuda runs each op's backward too."""
    import torch

    from fastssl.ops.clip_loss import clip_loss
    from fastssl.ops.dino_loss import dino_loss, soft_cross_entropy
    from fastssl.ops.ibot_patch_loss import (
        ibot_patch_cross_entropy,
        ibot_patch_loss,
        ibot_patch_loss_with_teacher_sum,
    )
    from fastssl.ops.info_nce import info_nce
    from fastssl.ops.mae import mae_loss, random_masking, unshuffle_tokens
    from fastssl.ops.siglip_loss import siglip_loss

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

    def t(*shape, dtype, grad=False):
        return torch.empty(*shape, device="cuda", dtype=dtype, requires_grad=grad)

    def moco_v2(dt, N, D, K=65536):  # momentum key: no gradient
        info_nce(t(N, D, dtype=dt, grad=True), t(N, D, dtype=dt), t(K, D, dtype=dt), backend="triton")

    def in_batch(dt, N, D):
        info_nce(t(N, D, dtype=dt, grad=True), t(N, D, dtype=dt, grad=True), backend="triton")

    def nt_xent(dt, B, world, D=128):  # SimCLR: both views stacked, keys gathered from every rank
        z = t(2 * B, D, dtype=dt, grad=True)
        keys = t(2 * B * world, D, dtype=dt, grad=True)
        info_nce(z, keys, label_offset=2 * B * (world - 1), exclude_self=True, backend="triton")

    def dino(dt, B, crops, K):
        s = t(crops * B, K, dtype=dt, grad=True)
        dino_loss(s, t(2 * B, K, dtype=dt), t(K, dtype=torch.float32), n_crops=crops, backend="triton")

    def ibot(dt, K, B=64, L=256, n=5000):  # DINOv2's per-GPU batch: ~30% of 64 x 256 tokens masked
        masks = torch.empty(B, L, device="cuda", dtype=torch.bool)
        idx = torch.empty(n, device="cuda", dtype=torch.int64)
        ibot_patch_loss(t(B, L, K, dtype=dt, grad=True), t(B, L, K, dtype=dt), t(K, dtype=torch.float32),
                        masks=masks, mask_indices=idx, backend="triton")
        ibot_patch_cross_entropy(t(n, K, dtype=dt, grad=True), t(n, K, dtype=torch.float32), masks=masks,
                                 masks_weight=t(n, dtype=torch.float32), backend="triton")
        # iBOT's centering step (iBOTPatchLoss.masked_loss): the heads' [n, K] logits, the teacher's sum
        center = t(1, 1, K, dtype=torch.float32)
        ibot_patch_loss_with_teacher_sum(t(n, K, dtype=dt, grad=True), t(n, K, dtype=dt), center, masks=masks,
                                         mask_indices=idx, masks_weight=t(n, dtype=torch.float32),
                                         backend="triton")

    def multilabel(dt, C, N=256):
        soft_cross_entropy(t(N, C, dtype=dt, grad=True), t(N, C, dtype=dt), backend="triton")

    def mae(dt, D, N=256, L=196, Dd=512, P=768):
        x = t(N, L, D, dtype=dt, grad=True)
        kept, mask, ids = random_masking(x, 0.75, pos_embed=t(L, D, dtype=dt), backend="triton")
        random_masking(x, 0.75, backend="triton")
        unshuffle_tokens(
            t(N, kept.shape[1], Dd, dtype=dt, grad=True), t(Dd, dtype=dt, grad=True), ids, backend="triton"
        )
        for norm_pix in (True, False):
            mae_loss(
                t(N, L, P, dtype=dt, grad=True),
                t(N, L, P, dtype=dt),
                mask.detach(),
                norm_pix_loss=norm_pix,
                backend="triton",
            )

    def siglip(dt, N, M, D, offset):  # CLIP-scale towers: both features, scale and bias learn
        image, text = t(N, D, dtype=dt, grad=True), t(M, D, dtype=dt, grad=True)
        scale, bias = t((), dtype=torch.float32, grad=True), t((), dtype=torch.float32, grad=True)
        siglip_loss(image, text, scale, bias, label_offset=offset, backend="triton")

    def clip(dt, N, M, D):  # M = N: one grid, both directions in one sweep; else the local loss
        image, text = t(N, D, dtype=dt, grad=True), t(N, D, dtype=dt, grad=True)
        scale = t((), dtype=torch.float32, grad=True)
        kw = {} if M == N else dict(all_image_features=t(M, D, dtype=dt, grad=True),
                                    all_text_features=t(M, D, dtype=dt, grad=True))
        clip_loss(image, text, scale, **kw, backend="triton")

    out = []
    for name, dt in dtypes.items():
        out += [
            (f"clip N={N} M={M} D={D} {name}", lambda dt=dt, N=N, M=M, D=D: clip(dt, N, M, D))
            # 4096: tuned backward tiles; 1024 of 2048: the local form on 2 GPUs (key gradients in
            # splits, merged); 32768: open_clip's local_loss=False at a 32k global batch, whose
            # probabilities run in bands through the kept-p workspace (key gradients in splits,
            # merged); 524288: not one key tile's probabilities fit it (each D chunk its own program)
            for N, M in ((256, 256), (4096, 4096), (1024, 2048), (1024, 32768), (32768, 32768),
                         (524288, 524288))
            for D in (512, 1024)
        ]
        # a small tower's embedding (D = 128, one accumulator chunk) in the local form
        out += [(f"clip N=1024 M=32768 D=128 {name}", lambda dt=dt: clip(dt, 1024, 32768, 128))]
        # per-GPU batch 256-1024, local texts, a rank's block of another's, or all 32k gathered
        out += [
            (f"siglip N={N} M={M} D={D} {name}", lambda dt=dt, N=N, M=M, D=D, o=o: siglip(dt, N, M, D, o))
            for N, M, o in ((256, 256, 0), (1024, 1024, None), (1024, 32768, 0))
            for D in (512, 1024)
        ]
        out += [
            (f"info_nce queue N={N} K=65536 D={D} {name}", lambda dt=dt, N=N, D=D: moco_v2(dt, N, D))
            for N in (256, 4096)
            for D in (128, 256)
        ]
        out += [
            (f"info_nce in-batch N=M={N} D={D} {name}", lambda dt=dt, N=N, D=D: in_batch(dt, N, D))
            for N in (256, 4096)
            for D in (128, 256, 1024)
        ]
        out += [(f"info_nce nt-xent 2x{B} of {B * W} D=128 {name}", lambda dt=dt, B=B, W=W: nt_xent(dt, B, W))
                for B, W in ((128, 1), (512, 8))]
        # a projection wider than one accumulator chunk: the kept p with the own column left out
        out += [(f"info_nce nt-xent 2x512 of 4096 D=256 {name}", lambda dt=dt: nt_xent(dt, 512, 8, D=256))]
        # the widest rows a launcher accepts (D chunks over programs)
        out += [(f"info_nce in-batch N=M=256 D=4096 {name}", lambda dt=dt: in_batch(dt, 256, 4096))]
        out += [
            (f"dino B={B} crops={V} K={K} {name}", lambda dt=dt, B=B, V=V, K=K: dino(dt, B, V, K))
            for B in (32, 128)
            for V in (2, 10, 12)
            for K in (4096, 65536)
        ]
        out += [
            (f"ibot B=64 L=256 n=5000 K={K} {name}", lambda dt=dt, K=K: ibot(dt, K))
            for K in (8192, 65536, 131072)  # iBOT's prototypes, DINOv2's and DINOv2-g's
        ]
        out += [
            (f"multilabel N=256 C={C} {name}", lambda dt=dt, C=C: multilabel(dt, C)) for C in (10000, 27000)
        ]
        out += [
            (f"mae N=256 L=196 D={D} dec=512 P=768 {name}", lambda dt=dt, D=D: mae(dt, D))
            for D in (768, 1024)
        ]
    from gate_call_sites import call_site_scenarios  # beside this file
    from gate_flag_grid import flag_scenarios

    return out + call_site_scenarios() + flag_scenarios()


# ----------------------------------------------------------------------------- gate


def describe(launch: Launch) -> str:
    """The constexprs (EPS left out), pointer dtypes and warps/stages of a launch."""
    vals = dict(zip(launch.fn.arg_names, launch.args)) | launch.kwargs
    parts = [
        f"{p.name}={int(vals[p.name]) if isinstance(vals[p.name], bool) else vals[p.name]}"
        for p in launch.fn.params
        if p.is_constexpr and p.name in vals and p.name != "EPS"
    ]
    dts = sorted({str(v.dtype).replace("torch.", "") for v in vals.values() if isinstance(v, Ptr)})
    parts.append("ptr:" + "/".join(dts).replace("bfloat16", "bf16").replace("float", "fp"))
    for k in ("num_warps", "num_stages"):
        if k in launch.kwargs:
            parts.append(f"{k[4:]}={launch.kwargs[k]}")
    return " ".join(parts)


def triton_kernels() -> dict:
    """Every @triton.jit function defined in fastssl.ops, by qualified name."""
    from triton.runtime.jit import JITFunction


    found = {}
    for info in pkgutil.iter_modules(importlib.util.find_spec("fastssl.ops").submodule_search_locations):
        mod = importlib.import_module(f"fastssl.ops.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, JITFunction) and obj.__module__ == mod.__name__:
                found[f"{mod.__name__}.{name}"] = obj
    return found


def run_gate(caps: list[int], only: str = "") -> tuple[list[dict], list[str], list[str], dict]:
    """Capture, dedupe and compile for each target. Returns (rows, failures, skipped targets, stats)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    knobs.nvidia.dump_ptxas_log = True
    cache_dir = Path(knobs.cache.dir) / "fastssl_compile_gate"
    cache_dir.mkdir(parents=True, exist_ok=True)
    rows, failures, skipped = [], [], []
    stats = dict(triton=triton.__version__, launches=0, compiles=0, cached=0, seconds=0.0)
    launched = set()
    t0 = time.time()
    for cap in caps:
        card = CARDS[cap]
        why = target_supported(cap)
        if why:
            skipped.append(why)
            continue
        unique: dict[str, Launch] = {}
        for name, run in scenarios():
            if only not in name or (name.startswith(FLAG_GRID) and cap not in FLAG_GRID_TARGETS):
                continue
            with fake_cuda(card) as recorded:
                run()
            for launch in expand(recorded, card):
                stats["launches"] += 1
                key = compile_key(launch, GPUTarget("cuda", cap, 32))
                unique.setdefault(key, launch).scenarios.append(name)
        by_launch = {}  # autotuned launch -> does any kept config fit the card?
        for launch in unique.values():
            launched.add(f"{launch.fn.__module__}.{launch.fn.__name__}")
            res, was_cached = cached_compile(launch, cap, cache_dir)
            stats["compiles"] += 1
            stats["cached"] += was_cached
            print(
                f"[{len(rows) + 1}] sm_{cap} {res['seconds']:5.1f}s{' (cached)' * was_cached} "
                f"{launch.fn.__name__} {describe(launch)}",
                file=sys.stderr,
                flush=True,
            )
            fits = res["ok"] and res["smem"] <= card.smem_optin
            row = dict(
                kernel=launch.fn.__name__,
                config=describe(launch),
                launch=launch.how,
                target=f"sm_{cap}",
                dot=bool(gate_dots.dot_sites(launch.fn)),
                scenarios=launch.scenarios,
                fits=fits,
                **res,
            )
            rows.append(row)
            where = (
                f"{row['kernel']} {row['config']} on sm_{cap} ({row['launch']}; e.g. {launch.scenarios[0]})"
            )
            if not res["ok"]:
                failures.append(f"compile error: {where}:\n{res['error']}")
                continue
            if launch.how == "fixed" and not fits:
                failures.append(f"shared memory {res['smem']} B > {card.smem_optin} B: {where}")
            if fits and res["spills"]:
                failures.append(f"spill of {res['spills']} B ({res['regs']} registers): {where}")
            fma = [label for label, verdict in res["dots"].items() if verdict == "fma"]
            if fma:
                failures.append(f"tl.dot without tensor cores at {', '.join(fma)}: {where}")
            if launch.how != "fixed":
                for sc in launch.scenarios:
                    by_launch[(row["kernel"], sc)] = by_launch.get((row["kernel"], sc), False) or fits
        failures += [
            f"no configuration of {k} fits sm_{cap}'s {card.smem_optin} B of shared memory ({sc})"
            for (k, sc), ok in by_launch.items()
            if not ok
        ]
    if not only and len(skipped) < len(caps):
        failures += [
            f"{name} is launched by no scenario of the compile gate"
            for name, fn in triton_kernels().items()
            if name not in launched and not _inlined(fn, launched)
        ]
    stats["seconds"] = round(time.time() - t0, 1)
    return rows, failures, skipped, stats


def _inlined(fn, launched: set) -> bool:
    """A device helper: called from a launched kernel's source."""
    kernels = triton_kernels()
    return any(re.search(rf"\b{fn.__name__}\(", kernels[name].src) for name in launched if name in kernels)



def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--targets",
        default="80,89,90,100",
        help="compute capabilities; those the installed Triton cannot target are skipped with a note",
    )
    ap.add_argument("--only", default="", help="only scenarios whose name contains this")
    ap.add_argument("--json", help="write rows, failures and stats here")
    ap.add_argument(
        "--results",
        type=Path,
        help="publish the summary (one row per kernel and target) in this JSON-lines file, replacing "
        "the rows of the installed triton version (benchmarks/results/compile_gate.jsonl)",
    )
    a = ap.parse_args(argv)
    if a.results and a.only:
        ap.error("--results publishes the whole gate: drop --only")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("the compile gate needs compiled kernels: unset TRITON_INTERPRET", file=sys.stderr)
        return 2
    caps = [int(c) for c in a.targets.split(",")]
    unknown = [c for c in caps if c not in CARDS]
    if unknown:
        print(f"no card for sm_{unknown}; known: {sorted(CARDS)}", file=sys.stderr)
        return 2
    rows, failures, skipped, stats = run_gate(caps, a.only)
    summary = gate_report.summary(rows, stats)
    if rows:
        print(gate_report.format_table(rows))
        print()
        print(gate_report.summary_markdown(summary))
    spills = [r for r in rows if r["fits"] and r["spills"]]
    print(
        f"\ntriton {stats['triton']}: {stats['launches']} launches -> {stats['compiles']} distinct compiles "
        f"({stats['cached']} from the cache) for sm_{', sm_'.join(map(str, caps))} in {stats['seconds']} s; "
        f"max registers {max([r['regs'] or 0 for r in rows] + [0])}, {len(spills)} kept configs spill"
    )
    for why in skipped:
        print("skipped:", why)
    for f in failures:
        print("FAIL:", f)
    if a.json:
        Path(a.json).write_text(
            json.dumps(dict(stats=stats, failures=failures, skipped=skipped, rows=rows), indent=1)
        )
    if a.results and not failures:  # a failing gate publishes nothing
        gate_report.write_results(a.results, summary, gate_report.environment(stats["triton"]))
        print(f"wrote {len(summary)} rows for triton {stats['triton']} to {a.results}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
