"""The DALI backend: one pipeline graph for every recipe, CPU or GPU by a device switch.

`device="cpu"` runs CPU operators only (`device_id=None`, DALI's CPU-only mode, how the
tests run it); `device="gpu"` decodes files with nvJPEG (`device="mixed"`) or copies
arrays to the GPU, and every augmentation after that runs on the GPU. The graph uses
`@pipeline_def` and `fn.*` only; per-sample probabilities use DALI conditionals
(`enable_conditionals=True`), so a skipped blur or solarize costs nothing.

Image files (folders, file lists) are read by `fn.readers.file` in DALI's own threads,
given the epoch's planned order as its file list (no shuffle, one shard) and the dataset
indices as its labels; class labels are then looked up on the output device, so the
host neither reads files in `pipe.run()` nor waits for a copy. Arrays and WebDataset
shards come in through a parallel `fn.external_source`: a batch callable serving the
planned batches (a memory copy, or one positioned read or HTTP Range request per sample)
run by DALI's Python worker processes, `PREFETCH` batches ahead, so the main process reads nothing while
training (it forks when no CUDA context exists yet, else spawns, as forking a process
holding one is unsupported). Either way the batches are
exactly those the loader planned for the epoch (shuffle, shard or weak-supervision
sampler: decided in Python, the same for both backends). One pipeline is built per epoch
with a seed derived from (seed, epoch, shard), which makes the augmentations of an epoch
a function of those three alone: resuming at epoch e reproduces epoch e.

Shards are not read by `fn.readers.webdataset`, though the index files it needs are
written: it cannot keep the planner's invariants. Its shard_id/num_shards split the samples
into contiguous ranges of unequal size (23 samples over 2 ranks: 11 and 12), so ranks
would run unequal steps; its shuffle (random_shuffle, initial_fill) is its own, so the
order differs from the torchvision backend's and repeat factors cannot be applied; a
mid-epoch resume needs its checkpoints rather than a batch number; and a bad sample is not
named: missing_component_behavior="skip" drops only samples the index lists without an
image, an index that no longer matches its tar stops the pipeline, and a decode failure
cannot be routed around without rewriting the index files. Positioned reads in worker
processes keep all of these and cost one `pread` per sample.

Same ranges and probabilities as the torchvision backend; where the operators differ:
color jitter is one `fn.color_twist` (fixed order brightness, contrast, hue, saturation,
contrast around mid-gray) where torchvision applies the four in random order with contrast
around the image mean; grayscale is saturation 0 in that same color matrix; the blur
window is DALI's +-3 sigma. The outputs of the two backends are alike in distribution, not
equal pixel for pixel.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import numpy as np
import torch

from fastssl.data.lifetime import die_with_parent
from fastssl.data.recipes import Recipe, ViewSpec
from fastssl.data.sources import decode_error, fill_skipped, frame_error, read_each

try:
    from nvidia.dali import backend as dali_native
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import feed_ndarray
    from nvidia.dali.tensors import TensorListGPU

    HAS_DALI = True
except ImportError:  # recorded, never silent: build_loader(loader="dali") raises with this fact
    HAS_DALI = False

PREFETCH = 2


def start_method() -> str:
    """How DALI starts its reader workers: "fork" (cheap, and the callable is inherited) while
    the CUDA driver is not initialized in this process (by torch or by a GPU pipeline), else
    "spawn", as DALI refuses to fork then (the check is DALI's own). Spawned workers import
    the callable's modules and the main module afresh (seconds per pipeline, so once per
    epoch); the main script needs the usual `if __name__ == "__main__":` guard."""
    return "spawn" if dali_native.IsDriverInitialized() else "fork"


def _coin(p: float, dtype):
    """1 with probability p, else 0, per sample (the constant 1 when p >= 1)."""
    if p >= 1.0:
        return 1
    return fn.random.coin_flip(probability=p, dtype=dtype)


def _apply(p: float, op, x):
    """op(x) with probability p per sample; DALI conditionals skip the op for the rest."""
    if p <= 0.0:
        return x
    if p >= 1.0:
        return op(x)
    if fn.random.coin_flip(probability=p, dtype=types.BOOL):
        x = op(x)
    return x


def _factor(on, strength: float):
    """ColorJitter factor: uniform in [1 - s, 1 + s] where `on`, else 1."""
    if strength == 0.0:
        return 1.0
    lo = max(0.0, 1.0 - strength)
    return on * (fn.random.uniform(range=(lo, 1.0 + strength)) - 1.0) + 1.0


def _color(x, v: ViewSpec):
    b, c, s, h = v.jitter
    on = _coin(v.jitter_p, types.INT32) if v.jitter_p > 0 else 0.0
    saturation = _factor(on, s)
    if v.grayscale_p > 0:
        # Saturation 0 in the same color matrix is grayscale of the jittered image.
        saturation = saturation * (1.0 - _coin(v.grayscale_p, types.INT32))
    hue = on * fn.random.uniform(range=(-h * 360.0, h * 360.0)) if h > 0 else 0.0
    return fn.color_twist(
        x, brightness=_factor(on, b), contrast=_factor(on, c), saturation=saturation, hue=hue
    )


def _augment(images, v: ViewSpec, flip_here: bool):
    """Crop and photometric ops of one view on HWC uint8; flips here only when asked
    (RotNet must flip before rotating; otherwise crop_mirror_normalize mirrors for free)."""
    if v.crop == "center":
        return fn.resize(images, resize_shorter=v.resize_to, antialias=True)
    x = fn.random_resized_crop(
        images, size=(v.size, v.size), random_area=v.scale, random_aspect_ratio=v.ratio
    )
    if (v.jitter_p > 0 and any(v.jitter)) or v.grayscale_p > 0:
        x = _color(x, v)
    x = _apply(v.blur_p, lambda y: fn.gaussian_blur(y, sigma=fn.random.uniform(range=v.blur_sigma)), x)
    # Solarize: 255 - x == x ^ 255 for uint8, applied where x >= 128.
    x = _apply(v.solarize_p, lambda y: fn.cast(y ^ ((y >= 128) * 255), dtype=types.UINT8), x)
    if flip_here and v.flip_p > 0:
        x = fn.flip(x, horizontal=_coin(v.flip_p, types.INT32))
    return x


def _rotate(x, k: int):
    """k counter-clockwise quarter turns of HWC, equal to torch.rot90(x, k, dims=(H, W)):
    exact transposes and flips rather than an interpolating rotation."""
    if k == 0:
        return x
    if k == 2:
        return fn.flip(x, horizontal=1, vertical=1)
    x = fn.transpose(x, perm=[1, 0, 2], transpose_layout=False)
    return fn.flip(x, horizontal=0, vertical=1) if k == 1 else fn.flip(x, horizontal=1)


def _normalize(x, v: ViewSpec, recipe: Recipe, mirror, fp16: bool):
    crop = (v.size, v.size) if v.crop == "center" else None
    return fn.crop_mirror_normalize(
        x, crop=crop, crop_pos_x=0.5, crop_pos_y=0.5, mirror=mirror,
        mean=[255.0 * m for m in recipe.mean], std=[255.0 * s for s in recipe.std],
        dtype=types.FLOAT16 if fp16 else types.FLOAT, output_layout="CHW",
    )


if HAS_DALI:

    @pipeline_def(enable_conditionals=True)
    def views_pipeline(feeder, recipe: Recipe, encoded: bool, gpu: bool, fp16: bool, files=None):
        """The whole graph: read (files: fn.readers.file over the planned file order, its
        labels the dataset indices; else the feeder), decode (or take arrays), then each view
        of the recipe, then the label and dataset index passed through. Returns
        (*views, label, index); with files, label is the index too (the caller looks it up)."""
        if files is not None:
            data, index = fn.readers.file(files=files[0], labels=files[1], random_shuffle=False, name="r")
            index = fn.reshape(fn.cast(index, dtype=types.INT64), shape=[])  # the reader's labels are [1]
            label = index
        else:
            data, label, index = fn.external_source(
                source=feeder, num_outputs=3, batch=True, parallel=True, prefetch_queue_depth=PREFETCH,
                dtype=[types.UINT8, types.INT64, types.INT64], layout=["" if encoded else "HWC", "", ""],
            )
        if encoded:
            images = fn.decoders.image(data, device="mixed" if gpu else "cpu", output_type=types.RGB)
        else:
            images = data.gpu() if gpu else data
        if recipe.rotations:
            v = recipe.views[0]
            base = _augment(images, v, flip_here=True)
            views = [_normalize(_rotate(base, k), v, recipe, 0, fp16) for k in recipe.rotations]
        else:
            views = [
                _normalize(_augment(images, v, flip_here=False), v, recipe,
                           _coin(v.flip_p, types.INT32) if v.flip_p > 0 else 0, fp16)
                for v in recipe.views
            ]
        return (*views, label, index)


class _Feeder:
    """Batch callable for the parallel fn.external_source, run in DALI's worker processes
    (picklable; stateless but for its copy of `bad`): batch i of the planned epoch's
    remaining batches. A sample in `bad` (known undecodable), whose bytes cannot be read or
    whose frame is broken (frame_error: it must never reach the decoder) is replaced by another
    sample of its batch (fill_skipped); the main process sees the replacement in the index
    output (DaliViews._note_unread). The worker ends with the process that started it."""

    def __init__(self, source, batches: list[np.ndarray], bad: dict[int, str]):
        self.source, self.batches, self.bad = source, batches, bad
        self.parent, self.bound = os.getpid(), False

    def _read(self, idx: list[int]) -> list:
        """Each sample's encoded bytes (or pixels), None where it is known bad, unreadable or
        its frame is broken; encoded bytes in one call for the batch, which a remote source
        requests together."""
        todo = [i for i in idx if i not in self.bad]
        encoded = self.source.kind == "encoded"
        data = self.source.read_many(todo) if encoded else read_each(self.source.image, todo)
        got = {}
        for i, d in zip(todo, data):
            if isinstance(d, OSError):
                self.bad[i] = f"{type(d).__name__}: {d}"
            elif encoded and (err := frame_error(d)) is not None:
                self.bad[i] = err
            else:
                got[i] = d
        return [got.get(i) for i in idx]

    def __call__(self, iteration: int):
        if not self.bound:  # the first call in this worker: DALI offers no worker initializer
            die_with_parent(self.parent)
            self.bound = True
        if iteration >= len(self.batches):
            raise StopIteration
        idx = [int(i) for i in self.batches[iteration]]
        data = self._read(idx)
        items = fill_skipped(list(zip(data, idx)), [d is not None for d in data])
        # Parallel workers pass arrays only (0-d for the scalars), not NumPy scalars.
        return ([d for d, _ in items], [np.array(self.source.labels[i], np.int64) for _, i in items],
                [np.array(i, np.int64) for _, i in items])


class DaliViews:
    """Runs the recipe's pipeline over planned epochs; yields batches as torch tensors."""

    name = "dali"

    def __init__(self, source, recipe: Recipe, *, device: torch.device, num_threads: int, seed: int,
                 shard_id: int, dtype: torch.dtype, max_batch: int):
        self.source, self.recipe = source, recipe
        self.device, self.num_threads, self.seed, self.shard_id = device, num_threads, seed, shard_id
        self.dtype, self.max_batch = dtype, max_batch
        self.bad: dict[int, str] = {}  # undecodable samples found so far: never fed again
        self.framed: set[int] = set()  # files whose frame was checked (frame_error)
        # Files are read by fn.readers.file (paths known up front); shards and arrays by the feeder.
        self.read_files = source.kind == "encoded" and hasattr(source, "paths")
        self.labels = torch.as_tensor(np.asarray(source.labels), dtype=torch.int64).to(device)
        self.read = source.read_bytes if source.kind == "encoded" else source.image

    def _file_order(self, batches: list[np.ndarray]) -> tuple[list[str], list[int]]:
        """The planned batches as fn.readers.file's files and labels (= dataset indices), each
        known-bad sample replaced by a good one of its batch. Files not seen before have their
        frame checked first (two small reads each, once per run): the reader hands DALI's
        decoder whatever it finds, and a broken file can crash it instead of raising."""
        unseen = sorted({int(i) for idx in batches for i in idx} - self.framed)
        for j in unseen:
            if (err := frame_error(self.source.paths[j])) is not None:
                self.bad[j] = err
        self.framed.update(unseen)
        order: list[int] = []
        for idx in batches:
            items = [int(i) for i in idx]
            order += fill_skipped(items, [i not in self.bad for i in items])
        return [self.source.paths[i] for i in order], order

    def _pipeline(self, epoch: int, batches: list[np.ndarray]):
        gpu = self.device.type == "cuda"
        # DALI seeds are 32-bit; mix (seed, epoch, shard) so neighbouring runs differ.
        seed = hash((self.seed, epoch, self.shard_id)) % (2**31 - 1)
        # A batch callable fills one batch per worker: more workers than batches in flight idle.
        workers = 0 if self.read_files else min(self.num_threads, PREFETCH)
        pipe = views_pipeline(
            _Feeder(self.source, batches, self.bad), self.recipe, self.source.kind == "encoded", gpu,
            self.dtype == torch.float16, self._file_order(batches) if self.read_files else None,
            batch_size=self.max_batch, num_threads=self.num_threads,
            device_id=self.device.index if gpu else None, seed=seed, prefetch_queue_depth=PREFETCH,
            py_num_workers=workers, py_start_method=start_method(),
        )
        pipe.build()
        return pipe

    def _to_torch(self, tensor_list, pin: bool = False) -> torch.Tensor:
        """Copy a dense DALI TensorList into a new torch tensor on the list's device (DALI
        reuses its buffers, so a view would be overwritten by the next batch); pin: into
        page-locked memory, so the copy to the GPU that follows does not block the host."""
        on_gpu = isinstance(tensor_list, TensorListGPU)
        dtype = {types.FLOAT: torch.float32, types.FLOAT16: torch.float16, types.INT64: torch.int64}
        dense = tensor_list.as_tensor()
        out = torch.empty(dense.shape(), dtype=dtype[tensor_list.dtype],
                          device=self.device if on_gpu else "cpu", pin_memory=pin and not on_gpu)
        feed_ndarray(dense, out, cuda_stream=torch.cuda.current_stream(self.device) if on_gpu else None)
        return out

    def _find_undecodable(self, batches: list[np.ndarray]) -> bool:
        """Record in self.bad the samples of `batches` that do not decode; whether any did not.
        Called once the failed pipeline is shut down: its threads must not run beside PIL's."""
        found = False
        if self.source.kind != "encoded":
            return found
        for idx in batches:
            for j in map(int, idx):
                if j in self.bad:
                    continue
                try:
                    err = decode_error(self.source.read_bytes(j))
                except OSError as exc:
                    err = f"{type(exc).__name__}: {exc}"
                if err is not None:
                    self.bad[j], found = err, True
        return found

    def _note_unread(self, planned: np.ndarray, index: np.ndarray) -> None:
        """Record in self.bad the planned samples a reader worker could not read (it filled
        their slots, so they are missing from the batch's index output). The worker's error
        does not cross the process boundary: reading the sample again here names it."""
        for j in set(map(int, planned)) - set(map(int, index)):
            if j in self.bad:
                continue
            try:
                data = self.read(j)
                err = frame_error(data) if self.source.kind == "encoded" else None
                self.bad[j] = err or "could not be read by the reader worker"
            except OSError as exc:
                self.bad[j] = f"{type(exc).__name__}: {exc}"

    def iterate(self, epoch: int, batches: list[np.ndarray], start: int = 0) -> Iterator[dict]:
        """Views of batches[start:]. Broken frames never reach DALI (frame_error); a decoding
        failure inside a whole frame stops DALI's pipeline without naming the sample: the
        pipeline is then shut down, the batches in flight checked with PIL, the bad samples
        recorded, and a new pipeline resumes at the failed batch with them replaced."""
        n_views, pin = self.recipe.num_views, self.device.type == "cuda"
        first = start
        while first < len(batches):
            pipe, failed = self._pipeline(epoch, batches[first:]), None
            try:
                for i in range(first, len(batches)):
                    try:
                        outs = pipe.run()
                    except Exception as exc:  # a decode failure: a RuntimeError without the sample
                        failed = (i, str(exc))  # not the exception: its traceback holds the pipeline
                        break
                    # The file reader fills a short last batch by wrapping around: keep the planned ones.
                    size = len(batches[i])
                    views = [self._to_torch(o)[:size] for o in outs[:n_views]]
                    if self.dtype != views[0].dtype:
                        views = [v.to(self.dtype) for v in views]
                    if not self.read_files:
                        self._note_unread(batches[i], outs[n_views + 1].as_array()[:size])
                    index = self._to_torch(outs[n_views + 1], pin)[:size].to(self.device, non_blocking=True)
                    label = (self.labels[index] if self.read_files else
                             self._to_torch(outs[n_views], pin).to(self.device, non_blocking=True))
                    skipped = [(self.source.name(int(j)), self.bad[int(j)]) for j in batches[i]
                               if int(j) in self.bad]
                    yield {"views": views, "label": label, "index": index, "skipped": skipped}
                else:
                    first = len(batches)
            finally:
                del pipe  # the last reference: DALI shuts the pipeline down, its threads and workers
            if failed is not None:
                gc.collect()
                if not self._find_undecodable(batches[failed[0]: failed[0] + PREFETCH + 1]):
                    raise RuntimeError(f"DALI failed at batch {failed[0]} of epoch {epoch}: {failed[1]}")
                first = failed[0]
