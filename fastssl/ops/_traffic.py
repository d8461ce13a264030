"""What every kernels module's `KERNEL_TRAFFIC` formulas share.

A formula takes one launch's bound arguments (name -> value, as the launcher passed them) and
returns (bytes read, bytes written, FLOPs), each distinct address counted once (what DRAM must
serve when a program's re-reads hit cache); FLOPs count the tensor-core work (2 per
multiply-add of a tl.dot), elementwise math left out. tests/test_traffic_model.py checks the
bytes against the addresses each kernel touches under the interpreter; fastssl.bench.traffic
sums them for the model.
"""

from __future__ import annotations

import torch


def nbytes(*tensors: torch.Tensor) -> int:
    """Bytes of the tensors' elements (each read or written whole)."""
    return sum(t.numel() * t.element_size() for t in tensors)


def whole(args: dict, reads: tuple[str, ...], writes: tuple[str, ...]) -> tuple[int, int]:
    """(bytes read, bytes written) of a launch that reads the named tensors whole and writes the
    named outputs whole; a name bound to a non-tensor counts 0."""
    size = lambda n: nbytes(args[n]) if hasattr(args.get(n), "numel") else 0  # noqa: E731
    return sum(size(n) for n in reads), sum(size(n) for n in writes)
