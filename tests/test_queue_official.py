"""KeyQueue and the official MoCo queue: a checkpoint's [dim, K] queue and pointer continue as the
official `_dequeue_and_enqueue` would (wrapping the ring), bad official input is refused by name,
and MoCo v2 contrasts against the stored queue without a per-step copy."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import fastssl.losses.info_nce
from fastssl.queue import KeyQueue


def official_dequeue_and_enqueue(queue: torch.Tensor, queue_ptr: torch.Tensor, keys: torch.Tensor) -> None:
    """MoCo's `_dequeue_and_enqueue` in one process, as the paper and repository describe it: the
    queue is [dim, K], the batch's keys are written as columns [ptr, ptr + n), K must be a multiple
    of n, and ptr advances by n modulo K."""
    n, K = keys.shape[0], queue.shape[1]
    ptr = int(queue_ptr)
    assert K % n == 0
    queue[:, ptr:ptr + n] = keys.T
    queue_ptr[0] = (ptr + n) % K


def test_from_official_checkpoint_continues_like_the_official_queue():
    torch.manual_seed(5)
    dim, K, n = 16, 48, 8
    queue = nn.functional.normalize(torch.randn(dim, K), dim=0)  # the official initialisation
    queue_ptr = torch.zeros(1, dtype=torch.long)
    for _ in range(3):  # a run that stopped mid-ring
        official_dequeue_and_enqueue(queue, queue_ptr, nn.functional.normalize(torch.randn(n, dim), dim=1))
    checkpoint = {"module.queue": queue.clone(), "module.queue_ptr": queue_ptr.clone()}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    q = KeyQueue.from_official(loaded["module.queue"], loaded["module.queue_ptr"])
    assert (q.size, q.dim, q.dtype, q.ptr.tolist()) == (K, dim, torch.float32, [24])
    assert torch.equal(q.keys, queue.T)
    for _ in range(5):  # wraps around the ring
        keys = nn.functional.normalize(torch.randn(n, dim), dim=1)
        official_dequeue_and_enqueue(queue, queue_ptr, keys)
        q.push(keys)
        assert torch.equal(q.keys, queue.T) and torch.equal(q.ptr, queue_ptr)
    # The checkpoint's tensors are copied, not aliased.
    assert not torch.equal(loaded["module.queue"], queue)
    assert KeyQueue.from_official(queue, queue_ptr, dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("queue,ptr,exc,words", [
    (torch.randn(48), torch.zeros(1, dtype=torch.long), ValueError, ["queue", "2-D"]),
    (torch.randn(16, 48), torch.tensor([48]), ValueError, ["ptr", "[0, 48)"]),
    (torch.randn(16, 48), torch.tensor([0.0]), TypeError, ["ptr", "integer"]),
    (torch.randn(16, 48), torch.zeros(2, dtype=torch.long), TypeError, ["queue_ptr", "one-element"]),
    (torch.zeros(16, 48, dtype=torch.int64), torch.zeros(1, dtype=torch.long), TypeError, ["queue", "dtype"]),
], ids=["1-D", "ptr-range", "ptr-float", "ptr-shape", "int-queue"])
def test_from_official_bad_input(queue, ptr, exc, words):
    with pytest.raises(exc) as info:
        KeyQueue.from_official(queue, ptr)
    for word in words:
        assert word in str(info.value), word


def test_mocov2_contrasts_against_the_stored_queue(monkeypatch):
    from fastssl.engine import resolve_config
    from fastssl.methods.mocov2 import MoCoV2, MoCoV2Config

    cfg = resolve_config(MoCoV2Config, overrides=dict(backbone="resnet20", image_size=32, queue_size=64,
                                                      moco_dim=8, mlp_hidden_dim=16))
    method = MoCoV2(cfg)
    seen = []
    real = fastssl.losses.info_nce.info_nce  # the op as the method's loss module calls it
    monkeypatch.setattr(fastssl.losses.info_nce, "info_nce",
                        lambda q, k, queue, **kw: seen.append(queue) or real(q, k, queue, **kw))
    method._loss(torch.randn(4, 8), torch.randn(4, 8))
    assert seen[0] is method.queue.keys  # no per-step copy of the queue
