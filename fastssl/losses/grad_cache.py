"""GradCache: a contrastive loss over the full batch while holding one micro-batch's activations.

GradCache (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup") keeps the in-batch negatives of a large batch: (1) encode each micro-batch without a graph
and cache its features; (2) compute the loss on the concatenated features and the gradient of each
feature row; (3) re-encode each micro-batch with a graph and backpropagate its slice of those
gradients. `grad_cache_encode` does (1) with a non-reentrant checkpoint per micro-batch, so the
caller computes the loss on the full batch's features as usual and one `loss.backward()` does (2)
and (3): the parameters receive exactly the gradients of the full batch of those micro-batches, and
under DDP / FSDP the gradients are synchronised once, in that backward.

The replay's rule (what makes (3) the same computation as (1)):
- random draws: each micro-batch's replay runs from the CPU generator's state and the inputs'
  device generators' states at the start of its cached pass, so dropout and drop-path draw the same
  masks, and the caller's generators are left as the cached passes left them;
- running statistics: every normalization layer with running statistics in `module` (BatchNorm's
  running mean / variance and batch count) is restored after each replay, so each micro-batch moves
  them once, in its cached pass, as A micro-batches through one forward each would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fastssl.validation import check_int, check_tensor

Features = torch.Tensor | tuple[torch.Tensor, ...]


@contextlib.contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore the running statistics of `module`'s normalization layers on exit."""
    saved = [(b, b.clone()) for m in module.modules()
             if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats
             for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


def grad_cache_encode(encode: Callable[..., Features], *inputs: torch.Tensor, micro_batches: int,
                      module: nn.Module) -> Features:
    """encode(*inputs) in `micro_batches` equal row chunks of every input, concatenated along rows:
    a tensor, or a tuple of tensors when encode returns one. With gradients enabled each chunk keeps
    no activations until the backward replays it (module docstring); without, the chunks run plainly
    (a momentum encoder's keys). micro_batches=1 is encode(*inputs). `module`: the module whose
    normalization layers' running statistics the replay leaves untouched (the method)."""
    micro_batches = check_int("micro_batches", micro_batches, low=1)
    if not inputs:
        raise ValueError("inputs: expected at least one tensor to split into micro-batches, got none")
    rows = check_tensor("inputs[0]", inputs[0], dtypes=None).shape[0]
    for i, x in enumerate(inputs):
        if check_tensor(f"inputs[{i}]", x, dtypes=None).shape[0] != rows:
            raise ValueError(f"inputs[{i}]: expected {rows} rows as inputs[0], got {x.shape[0]}")
    if rows % micro_batches:
        raise ValueError(f"micro_batches (accum_steps): expected a divisor of the batch's {rows} rows, got "
                         f"{micro_batches}; set batch_size to a multiple of world size x accum_steps")
    if micro_batches == 1:
        return encode(*inputs)
    chunks = zip(*(x.chunk(micro_batches) for x in inputs))
    if torch.is_grad_enabled():
        def contexts():  # the first pass as is; the replay keeps the running statistics
            return contextlib.nullcontext(), _running_stats_kept(module)

        parts = [checkpoint(encode, *c, use_reentrant=False, context_fn=contexts) for c in chunks]
    else:
        parts = [encode(*c) for c in chunks]
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return tuple(torch.cat(p) for p in zip(*parts))
