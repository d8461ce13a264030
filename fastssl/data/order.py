"""The order in which a rank reads the samples of sharded data in one epoch, as a
streaming reader would: shards in a seeded order (or drawn with replacement in the
resampled mode), each shard's samples in stored order, through a shuffle buffer. Planned
up front from the samples' shard numbers alone, so both loader backends, every rank and a
resumed epoch agree on it, and a local or remote source gives the same order.
"""

from __future__ import annotations

import numpy as np


def stream_indices(shard_of: np.ndarray, *, epoch: int, seed: int, shard_id: int, num_shards: int,
                   buffer_size: int, repeats: np.ndarray | None = None, length: int | None = None,
                   drop_last: bool = True) -> np.ndarray:
    """This rank's sample indices for one epoch of a sharded dataset, as a streaming reader
    sees them: the shards in a per-epoch order from (seed, epoch), each shard's samples in
    stored order (sample i repeated repeats[i] times, for resampling on a stream), through a
    shuffle buffer of buffer_size (webdataset's: each arriving sample takes the place of a
    uniformly chosen one, which is emitted); cut or wrapped to `length` when given (a
    resampled stream's epoch keeps one length); then, as shard_indices, trimmed to a multiple
    of num_shards (drop_last; else padded by wrapping) and every num_shards-th from shard_id.
    shard_of: int64 [N], the shard of each sample, samples of a shard contiguous."""
    rng = np.random.default_rng([seed, epoch])
    starts = _shard_starts(shard_of)
    stream = _concat_shards(starts, rng.permutation(len(starts) - 1))
    if repeats is not None:
        stream = np.repeat(stream, repeats[stream])
    stream = _shuffle_buffer(stream, buffer_size, rng)
    n = len(stream)
    if length is not None:
        stream, n = np.resize(stream, length), length
    if drop_last:
        stream = stream[: n - n % num_shards]
    elif n % num_shards:
        stream = np.concatenate([stream, np.resize(stream, num_shards - n % num_shards)])
    return stream[shard_id::num_shards].astype(np.int64)


def _shard_starts(shard_of: np.ndarray) -> np.ndarray:
    """Where each shard's samples begin in `shard_of` (and the end): shard k is [starts[k], starts[k+1])."""
    n_shards = int(shard_of.max()) + 1 if len(shard_of) else 0
    return np.searchsorted(shard_of, np.arange(n_shards + 1))


def _concat_shards(starts: np.ndarray, order) -> np.ndarray:
    return np.concatenate([np.arange(starts[k], starts[k + 1]) for k in order] or [np.zeros(0, np.int64)])


def _shuffle_buffer(stream: np.ndarray, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """webdataset's shuffle buffer: each arriving sample takes the place of a uniformly chosen
    one of the buffer_size held, which is emitted; the last ones leave in random order."""
    n, b = len(stream), min(buffer_size, len(stream))
    if b <= 1:
        return stream
    out = np.empty(n, dtype=np.int64)
    buf = stream[:b].copy()
    picks = rng.integers(0, b, n - b)
    for t in range(n - b):
        out[t] = buf[picks[t]]
        buf[picks[t]] = stream[b + t]
    out[n - b:] = rng.permutation(buf)
    return out


def resampled_indices(shard_of: np.ndarray, *, epoch: int, seed: int, shard_id: int, num_samples: int,
                      buffer_size: int) -> tuple[np.ndarray, np.ndarray]:
    """This rank's `num_samples` sample indices for one epoch of the resampled mode (as
    open_clip's --dataset-resampled): shards drawn with replacement, uniformly among those
    with samples, by a generator seeded from (seed, epoch, shard_id), so each rank draws its
    own sequence and an epoch is a fixed number of samples whatever the shard count; each
    drawn shard's samples in stored order, through the shuffle buffer, cut to num_samples.
    Returns (indices, the drawn shard sequence). Deterministic, so a resumed epoch repeats."""
    rng = np.random.default_rng([seed, epoch, shard_id])
    starts = _shard_starts(shard_of)
    sizes = np.diff(starts)
    full = np.flatnonzero(sizes)
    if num_samples < 1 or not len(full):
        raise ValueError(f"num_samples must be >= 1 over shards with samples, got {num_samples} over "
                         f"{len(full)} non-empty shard(s)")
    # Enough draws to cover num_samples in one go: at most num_samples (every shard holds >= 1).
    draws = full[rng.integers(0, len(full), num_samples)]
    drawn = draws[: int(np.searchsorted(np.cumsum(sizes[draws]), num_samples)) + 1]
    return _shuffle_buffer(_concat_shards(starts, drawn), buffer_size, rng)[:num_samples], drawn


__all__ = ["resampled_indices", "stream_indices"]
