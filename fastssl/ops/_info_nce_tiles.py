"""Tiles and launch shapes of the InfoNCE kernels (_info_nce_kernels.py, behind fastssl.ops.info_nce
and fastssl.ops.clip_loss): the configurations per input precision, the D chunks, the splits of the
streamed rows and the launch itself. Imported only where triton is installed."""

from collections.abc import Callable

import torch
import triton

from fastssl.ops._tiles import block_d, precision, stream_splits
from fastssl.ops.backend import multiprocessor_count, triton_interpreting

# Tiles (outer, inner, num_warps, num_stages) per input precision, autotuned on a GPU for
# problems big enough to repay it (each config is a compile); small ones run _FIXED_TILES, the
# interpreter _INTERPRETER_TILES. Triton's autotuner drops a config whose compiled kernel needs
# more shared memory than the tensor's device has (its launch raises OutOfResources). Every
# config compiles without register spills for sm_80, sm_89 and sm_90, with wgmma on sm_90 (the
# outer tile has >= 64 rows) and mma on the others: tests/ops/compile_gate.py checks it.
# No 128x128 tiles (they spill at D=128 on 8 warps) and no 32-row tiles (no wgmma).
_CONFIGS = {
    # 16-bit: 128x64 for the H100 and A100; 64x64 for the L40S / RTX 4090, whose 101 KB of
    # shared memory favours smaller tiles. 8 warps and 2 stages: with 4 warps or 3 stages,
    # 64x64 at D > 128 spills on sm_100.
    "16bit": [(128, 64, 8, 3), (64, 64, 8, 2)],
    # fp32 (tf32x3: each dot splits its operands into two tf32 halves, doubling their
    # registers): 64x32 tiles over 8 warps on every card, D reduced in chunks of 32 (64x64
    # spills on sm_80); 3 stages where the shared memory allows.
    "fp32": [(64, 32, 8, 2), (64, 32, 8, 3)],
}
_FIXED_TILES = {"16bit": (64, 64, 8, 2), "fp32": (64, 32, 8, 2)}  # one of each list: no extra compile
_AUTOTUNE_MIN_LOGITS = 1 << 22  # N·K below this: the fixed configuration
_INTERPRETER_TILES = {"BLOCK_N": 32, "BLOCK_M": 64}
_MAX_ONE_CHUNK = {"16bit": 128, "fp32": 32}  # padded D held whole in registers (D=256 spills)
_CHUNKS = {"16bit": (64, 128), "fp32": (32, 128)}  # (BLOCK_K, BLOCK_DV) above that
# Above one BLOCK_DV chunk of the accumulator, one program covers every chunk of D and keeps the
# probabilities of its tiles for the later chunks (KEEP_P) in a workspace in the input's dtype. The
# launchers run the problem band after band (bands of key rows in the key gradient, of whole column
# splits in the forward), every band reusing one workspace of at most this many bytes, so it is flat
# in N and in the number of ranks. 48 MiB: about an H100's L2 (50 MB), so that the p a program
# writes in its first pass is mostly still on chip when its passes over the D chunks read it back.
_KEEP_P_BYTES = 48 << 20
# KEEP_P launches run the fixed tiles (the 128-row 16-bit tiles spill there on sm_80/89/100) and
# this BLOCK_DV: fp32's tf32x3 kernels spill on sm_80 above 32 columns (more passes over the kept
# p, no more FLOPs); tests/ops/compile_gate.py checks it.
_KEPT_CHUNK = {"16bit": 128, "fp32": 32}


def _tiles(outer_block: str, outer: int, inner: int) -> dict:
    """The outer tile (queries in the forward, keys in the key gradient) and the streamed inner one."""
    return {outer_block: outer, ("BLOCK_M" if outer_block == "BLOCK_N" else "BLOCK_N"): inner}


def _configs(tile_class: str, outer_block: str) -> list:
    return [triton.Config(_tiles(outer_block, n, m), num_warps=w, num_stages=st) for n, m, w, st in _CONFIGS[tile_class]]


def _d_tiles(D: int, dtype: torch.dtype, *, keep_p: bool = False) -> dict:
    """BLOCK_K (D chunk of the logits dot), BLOCK_DV (D chunk of the accumulator: one program each,
    or with keep_p one pass each of one program, KEEP_P, where D has more than one), ONE_CHUNK."""
    padded = block_d(D)
    if padded <= _MAX_ONE_CHUNK[precision(dtype)]:
        return {"BLOCK_K": padded, "BLOCK_DV": padded, "ONE_CHUNK": True, "KEEP_P": False}
    block_k, block_dv = _CHUNKS[precision(dtype)]
    keep = keep_p and padded > block_dv
    if keep:
        block_dv = _KEPT_CHUNK[precision(dtype)]
    return {"BLOCK_K": block_k, "BLOCK_DV": min(block_dv, padded), "ONE_CHUNK": False, "KEEP_P": keep}


def _kept_band(*, units: int, unit_bytes: int, band_programs: Callable[[int], int], chunks: int,
               recompute_programs: int, device: torch.device) -> int:
    """How many units (outer tiles of the key gradient, column splits of the forward) one KEEP_P band
    holds: as many as fit _KEEP_P_BYTES, at most all of them; 0 for the recompute path, where not one
    fits, or where a band's programs (band_programs(n) for n units) fill the device so little that
    recomputing the logits in each of the `chunks` D programs is faster: KEEP_P does 2 matmuls'
    work (logits once, the accumulation) over min(programs, SMs), recomputing chunks + 1 over
    min(recompute_programs, SMs)."""
    band = min(units, _KEEP_P_BYTES // unit_bytes)
    sms = multiprocessor_count(device)
    if band == 0 or sms is None:  # the interpreter: banding exercised, no device to fill
        return band
    kept_time = 2 / min(band_programs(band), sms)
    return band if kept_time <= (chunks + 1) / min(recompute_programs, sms) else 0


def stream_tile(dtype: torch.dtype) -> int:
    """The streamed tile (BLOCK_M) of the forward: every configuration of a precision has the same."""
    if triton_interpreting():
        return _INTERPRETER_TILES["BLOCK_M"]
    (inner,) = {config[1] for config in _CONFIGS[precision(dtype)]}
    return inner


def _fixed_outer(dtype: torch.dtype, outer_block: str) -> int:
    """The outer tile of an untuned launch (the interpreter's, or the fixed tiles)."""
    if triton_interpreting():
        return _INTERPRETER_TILES[outer_block]
    return _tiles(outer_block, *_FIXED_TILES[precision(dtype)][:2])[outer_block]


def _launch(kernel, tuned: dict, *, splits: int, d_programs: int, outer_block: str, outer_rows: int, logits: int,
            args: tuple, flags: dict, dtype: torch.dtype, tune: bool = True) -> None:
    """Run `kernel` over (ceil(outer_rows / BLOCK), splits, d_programs) programs with the tiles for this
    machine; tune=False keeps the fixed tiles (`_fixed_outer`) at any size."""
    if triton_interpreting():
        grid = (triton.cdiv(outer_rows, _INTERPRETER_TILES[outer_block]), splits, d_programs)
        kernel[grid](*args, **flags, **_INTERPRETER_TILES)
    elif tune and logits >= _AUTOTUNE_MIN_LOGITS:
        grid = lambda meta: (triton.cdiv(outer_rows, meta[outer_block]), splits, d_programs)
        tuned[precision(dtype)][grid](*args, **flags)
    else:
        n, m, warps, stages = _FIXED_TILES[precision(dtype)]
        tiles = _tiles(outer_block, n, m)
        grid = (triton.cdiv(outer_rows, tiles[outer_block]), splits, d_programs)
        kernel[grid](*args, **flags, **tiles, num_warps=warps, num_stages=stages)


def _combine_block(D: int) -> int:  # rows per program of the combine kernels: ~2K elements a tile
    return max(1, min(64, 2048 // block_d(D)))


def _combine_warps(D: int) -> int:
    # a 4096-wide row over 4 (sm_90) or 8 (sm_100) warps spills, and a 1024-wide key gradient's merge
    # over 4 (sm_90, fp16)
    return 16 if block_d(D) > 2048 else 8 if block_d(D) >= 1024 else 4


def _num_splits(outer_rows: int, stream_rows: int, D: int, d_programs: int, device: torch.device, *,
                kept_bytes: int = 0) -> tuple[int, int]:
    """stream_splits with the outer tiles counted at 128 rows (the largest) and the fp32 partials
    [splits, outer_rows, D] kept under ~16 MiB; under _KEEP_P_BYTES for a forward whose KEEP_P
    workspace (kept_bytes, whole) is over that cap and so runs in bands of splits: more, narrower
    splits keep a band's programs filling the device."""
    partial_bytes = _KEEP_P_BYTES if kept_bytes > _KEEP_P_BYTES else 16 << 20
    return stream_splits(triton.cdiv(outer_rows, 128), stream_rows, d_programs, device,
                         max_splits=max(1, partial_bytes // (outer_rows * D * 4)))
