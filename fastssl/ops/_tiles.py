"""What the streaming kernels (InfoNCE / CLIP, SigLIP) share: the Triton prologue of their
(outer tiles, stream splits, D programs) grid and the host-side tile arithmetic.

Imported only where triton is installed."""

import torch
import triton
import triton.language as tl

from fastssl.ops.backend import multiprocessor_count

SPLIT_CHUNK = 128  # streamed rows per split are a multiple of this, the largest streamed tile of any config


@triton.jit
def program_tiles(outer_rows, D, split_rows, stream_rows, BLOCK: tl.constexpr, BLOCK_DV: tl.constexpr):
    """This program's share of the grid: its outer rows [program_id(0)·BLOCK, +BLOCK) and their mask,
    its accumulator columns [program_id(2)·BLOCK_DV, +BLOCK_DV) and theirs, and the streamed rows
    [start, end) of its split program_id(1)."""
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    dims = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    start = tl.program_id(1) * split_rows
    return rows, rows < outer_rows, dims, dims < D, start, tl.minimum(start + split_rows, stream_rows)


@triton.jit
def row_block(ptr, first, end, stride, BLOCK: tl.constexpr):
    """Rows [first, first + BLOCK) of a row-strided operand: their indices, their mask (< end) and
    their base pointers [BLOCK, 1]."""
    rows = first + tl.arange(0, BLOCK)
    return rows, rows < end, ptr + rows.to(tl.int64)[:, None] * stride


@triton.jit
def chunked_dot(a_rows, a_ok, stride_ad, b_rows, b_ok, stride_bd, D, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """The fp32 tile a_i·b_j [len(a_ok), len(b_ok)], summed over D in BLOCK_K chunks (each reloaded
    from cache, so registers stay bounded for any D); a_rows, b_rows are the rows' base pointers
    [rows, 1]; b is converted to a's dtype on load."""
    dims = tl.arange(0, BLOCK_K)
    s = tl.zeros([a_ok.shape[0], b_ok.shape[0]], tl.float32)
    for d0 in range(0, D, BLOCK_K):
        dk = d0 + dims
        a = tl.load(a_rows + dk[None, :] * stride_ad, mask=a_ok[:, None] & (dk < D)[None, :], other=0.0)
        b = tl.load(b_rows + dk[None, :] * stride_bd, mask=b_ok[:, None] & (dk < D)[None, :], other=0.0)
        s = tl.dot(a, tl.trans(b.to(a.dtype)), s, input_precision=DOT_PRECISION)
    return s


def precision(dtype: torch.dtype) -> str:
    """The tile class of an input dtype: "fp32" (tf32x3 dots, whose split operands double a tile's
    registers) or "16bit"."""
    return "fp32" if dtype == torch.float32 else "16bit"


def dot_precision(dtype: torch.dtype) -> str:
    return "tf32x3" if dtype == torch.float32 else "tf32"  # ignored for 16-bit inputs


def block_d(D: int) -> int:
    return max(16, triton.next_power_of_2(D))  # tl.dot needs every tile dim >= 16


def stream_splits(outer_programs: int, stream_rows: int, d_programs: int, device: torch.device, *,
                  chunk: int = SPLIT_CHUNK, max_splits: int | None = None) -> tuple[int, int]:
    """(splits, rows per split) of the streamed dimension: enough programs to fill the GPU (about 2
    per SM) while every split keeps >= 4 chunks of work (and at most max_splits); on the CPU
    interpreter 2 splits, so tests exercise the merge."""
    chunks = triton.cdiv(stream_rows, chunk)
    sms = multiprocessor_count(device)
    if sms is not None:
        want = min(triton.cdiv(2 * sms, outer_programs * d_programs), max(1, chunks // 4), max_splits or chunks)
    else:
        want = 2
    per_split = triton.cdiv(chunks, max(1, min(want, chunks)))
    return triton.cdiv(chunks, per_split), per_split * chunk
