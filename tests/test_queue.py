"""KeyQueue (fastssl/queue.py, csrc/*/queue_push*): ring semantics against a one-row-at-a-time
reference, casts, fused normalization, errors without state change, state round trips,
the 2-process gather, and (GPU) zero syncs per push. The official MoCo queue layout:
tests/test_queue_official.py; the extension's build, images and fallback: tests/test_queue_extension.py."""

from __future__ import annotations

import io

import pytest
import torch
import torch.utils.cpp_extension
from dist_utils import run_gloo
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastssl.losses.info_nce
import fastssl.queue
from fastssl.queue import KeyQueue, queue_push_ref

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def push_ref(queue: torch.Tensor, ptr: int, keys: torch.Tensor, normalize: bool = False) -> int:
    """The issue's definition, literally: each row in order goes to slot ptr, then ptr += 1
    (mod size). Normalization is F.normalize's x / max(||x||, 1e-12), done in fp64."""
    for row in keys:
        row = row.double()
        if normalize:
            norm = torch.linalg.vector_norm(row)
            row = row / torch.where(norm < 1e-12, torch.full_like(norm, 1e-12), norm)
        queue[ptr] = row.to(queue.dtype)
        ptr = (ptr + 1) % queue.shape[0]
    return ptr


def queue_state(q: KeyQueue) -> tuple[torch.Tensor, torch.Tensor]:
    return q.keys.clone(), q.ptr.clone()


def _push_without_host_sync(queue, batches) -> None:
    """Push each batch with CUDA's sync debug mode raising on any host synchronisation."""
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for keys in batches:
            queue.push(keys)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    "sizes",
    [[1] * 9, [3, 3, 3], [7], [8], [20], [2, 9, 1, 13, 6], [5, 2, 7, 1, 14, 3], [6, 6, 6, 1]],
    ids=lambda s: "-".join(map(str, s)),
)
def test_push_sequences_match_one_row_reference(sizes):
    torch.manual_seed(0)
    q = KeyQueue(7, 5)
    expected, ptr = q.keys.clone(), 0
    for n in sizes:
        keys = torch.randn(n, 5)
        q.push(keys)
        ptr = push_ref(expected, ptr, keys)
        assert torch.equal(q.keys, expected)
        assert q.ptr.tolist() == [ptr]


@pytest.mark.parametrize("size,dim", [(1, 1), (1, 4), (3, 33), (16, 2), (130, 17)])
def test_random_push_sizes(size, dim):
    gen = torch.Generator().manual_seed(size * 1000 + dim)
    q = KeyQueue(size, dim)
    expected, ptr = q.keys.clone(), 0
    for _ in range(12):
        n = int(torch.randint(1, 3 * size + 3, (1,), generator=gen))
        keys = torch.randn(n, dim, generator=gen)
        q.push(keys)
        ptr = push_ref(expected, ptr, keys)
    assert torch.equal(q.keys, expected)
    assert q.ptr.tolist() == [ptr]


def test_initial_rows_are_random_unit_vectors():
    q = KeyQueue(64, 16)
    assert q.keys.shape == (64, 16) and q.keys.dtype == torch.float32
    assert torch.allclose(torch.linalg.vector_norm(q.keys, dim=1), torch.ones(64), atol=1e-6)
    # Random directions: no two rows alike, mean close to 0 (|mean| ~ 1/sqrt(64*16) per entry).
    cos = q.keys @ q.keys.T - torch.eye(64)
    assert cos.abs().max() < 0.99
    assert q.keys.mean().abs() < 0.1
    assert q.ptr.dtype == torch.int64 and q.ptr.tolist() == [0]
    assert not torch.equal(KeyQueue(64, 16).keys, q.keys)
    q64 = KeyQueue(8, 300, dtype=torch.float64)
    norms64 = torch.linalg.vector_norm(q64.keys, dim=1)
    assert torch.allclose(norms64, torch.ones(8, dtype=torch.float64), atol=1e-14)


@pytest.mark.parametrize("queue_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("key_dtype", FLOATS, ids=str)
def test_cast_inside_push(key_dtype, queue_dtype):
    gen = torch.Generator().manual_seed(1)
    q = KeyQueue(6, 9, dtype=queue_dtype)
    expected, ptr = q.keys.clone(), 0
    for n in (4, 5, 1):
        # Values that do not round-trip through the narrower types, plus tiny/large ones.
        keys = (torch.randn(n, 9, generator=gen, dtype=torch.float64) * 3).to(key_dtype)
        keys[0, 0] = 1e-6
        keys[0, 1] = 6e4  # near float16's max
        q.push(keys)
        ptr = push_ref(expected, ptr, keys)
    assert q.keys.dtype == queue_dtype
    assert torch.equal(q.keys, expected)


def _max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item()


@pytest.mark.parametrize("queue_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_normalize(key_dtype, queue_dtype):
    gen = torch.Generator().manual_seed(2)
    dim = 130
    q = KeyQueue(10, dim, dtype=queue_dtype, normalize=True)
    keys = (torch.randn(13, dim, generator=gen, dtype=torch.float64) * 5).to(key_dtype)
    keys[4] *= 1e-8  # tiny but above eps: still a unit vector
    keys[7] = 0  # below eps: F.normalize gives zeros
    q.push(keys)
    survivors = keys[3:]  # 13 rows into 10 slots: rows 3..12 land in slots 3..9, 0..2
    slots = [(3 + i) % 10 for i in range(10)]
    truth = torch.nn.functional.normalize(survivors.double(), dim=1)
    got = q.keys[slots]
    # DESIGN's rule: at most twice the error of PyTorch's own low-precision path, plus a small atol.
    torch_low = torch.nn.functional.normalize(survivors, dim=1).to(queue_dtype)
    atol = {torch.float64: 1e-15}.get(queue_dtype, 1e-7)
    assert _max_err(got, truth) <= 2 * _max_err(torch_low, truth) + atol
    assert torch.equal(got[7 - 3], torch.zeros(dim, dtype=queue_dtype))
    norms = torch.linalg.vector_norm(got.double(), dim=1)
    unit = torch.ones(10, dtype=torch.float64)
    unit[7 - 3] = 0
    assert torch.allclose(norms, unit, atol=1e-2 if queue_dtype in (torch.float16, torch.bfloat16) else 1e-6)


def test_nan_in_gives_nan_out():
    for normalize in (False, True):
        q = KeyQueue(4, 6, normalize=normalize)
        keys = torch.randn(3, 6)
        keys[1, 2] = float("nan")
        q.push(keys)
        assert torch.isnan(q.keys[1, 2])
        if normalize:  # the whole row's norm is NaN, so is every entry (never masked to finite)
            assert torch.isnan(q.keys[1]).all()
        assert torch.isfinite(q.keys[[0, 2, 3]]).all()


def test_keys_need_not_be_contiguous_or_grad_free():
    q = KeyQueue(5, 4)
    expected, ptr = q.keys.clone(), 0
    base = torch.randn(4, 3, requires_grad=True)
    keys = base.T * 2  # [3, 4], transposed view, part of an autograd graph
    q.push(keys)
    ptr = push_ref(expected, ptr, keys.detach())
    expanded = torch.randn(1, 4).expand(3, 4)  # stride-0 rows
    q.push(expanded)
    ptr = push_ref(expected, ptr, expanded)
    assert torch.equal(q.keys, expected) and q.ptr.tolist() == [ptr]
    assert not q.keys.requires_grad


def test_pushing_the_queues_own_rows_reads_them_first():
    q = KeyQueue(5, 3)
    q.push(torch.randn(4, 3))  # ptr = 4: the next rows overwrite slots 4, 0, 1, 2
    expected, ptr = q.keys.clone(), 4
    ptr = push_ref(expected, ptr, q.keys[1:5].clone())
    q.push(q.keys[1:5])
    assert torch.equal(q.keys, expected) and q.ptr.tolist() == [ptr]


@pytest.mark.parametrize(
    "keys,exc,words",
    [
        (torch.randn(8), ValueError, ["keys", "2-D", "(8,)"]),
        (torch.randn(2, 3, 4), ValueError, ["keys", "2-D", "(2, 3, 4)"]),
        (torch.randn(3, 5), ValueError, ["keys", "4 columns", "(3, 5)"]),
        (torch.ones(3, 4, dtype=torch.int64), TypeError, ["keys", "dtype", "int64"]),
        (torch.ones(3, 4, dtype=torch.bool), TypeError, ["keys", "dtype", "bool"]),
        (torch.randn(3, 4, dtype=torch.complex64), TypeError, ["keys", "complex64"]),
        (torch.empty(0, 4), ValueError, ["keys", "empty", "(0, 4)"]),
        (torch.empty(3, 4, device="meta"), ValueError, ["keys", "cpu", "meta"]),
        ([[1.0, 2.0, 3.0, 4.0]], TypeError, ["keys", "torch.Tensor", "list"]),
    ],
    ids=["1d", "3d", "dim", "int", "bool", "complex", "empty", "device", "list"],
)
def test_bad_push_raises_and_changes_nothing(keys, exc, words):
    q = KeyQueue(6, 4)
    q.push(torch.randn(2, 4))
    before = queue_state(q)
    with pytest.raises(exc) as info:
        q.push(keys)
    for word in words:
        assert word in str(info.value)
    assert torch.equal(q.keys, before[0]) and torch.equal(q.ptr, before[1])


@pytest.mark.parametrize(
    "args,kwargs,exc,words",
    [
        ((0, 4), {}, ValueError, ["size", ">= 1", "0"]),
        ((-3, 4), {}, ValueError, ["size", "-3"]),
        ((4, 0), {}, ValueError, ["dim", "0"]),
        ((4.0, 4), {}, TypeError, ["size", "int", "float"]),
        ((True, 4), {}, TypeError, ["size", "bool"]),
        ((4, 4), {"dtype": torch.int32}, TypeError, ["dtype", "int32"]),
        ((4, 4), {"normalize": 1}, TypeError, ["normalize", "True or False", "int"]),
    ],
    ids=["size0", "size-neg", "dim0", "size-float", "size-bool", "dtype", "normalize"],
)
def test_bad_construction(args, kwargs, exc, words):
    with pytest.raises(exc) as info:
        KeyQueue(*args, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_state_dict_round_trip_and_module_buffers():
    torch.manual_seed(3)
    model = nn.Module()
    model.proj = nn.Linear(4, 4)
    model.queue = KeyQueue(9, 4, normalize=True)
    model.queue.push(torch.randn(13, 4))
    sd = model.state_dict()
    assert set(sd) == {"proj.weight", "proj.bias", "queue.keys", "queue.ptr"}  # scratch counter not saved
    buffer = io.BytesIO()
    torch.save(sd, buffer)
    buffer.seek(0)
    other = nn.Module()
    other.proj = nn.Linear(4, 4)
    other.queue = KeyQueue(9, 4, normalize=True)
    other.load_state_dict(torch.load(buffer))
    assert torch.equal(other.queue.keys, model.queue.keys) and torch.equal(other.queue.ptr, model.queue.ptr)
    # Same state in, same pushes: identical queues afterwards.
    for n in (5, 11, 1):
        keys = torch.randn(n, 4)
        model.queue.push(keys)
        other.queue.push(keys)
    assert torch.equal(other.queue.keys, model.queue.keys) and torch.equal(other.queue.ptr, model.queue.ptr)
    # Module casts move the buffers; the queue's dtype follows.
    other.double()
    assert other.queue.dtype == torch.float64 and other.queue.ptr.dtype == torch.int64
    other.queue.push(torch.randn(2, 4))
    assert other.queue.ptr.tolist() == [(model.queue.ptr.item() + 2) % 9]


@pytest.mark.parametrize(
    "change,exc,words",
    [
        ({"keys": torch.randn(8, 4)}, ValueError, ["keys", "(9, 4)", "(8, 4)"]),
        ({"keys": torch.ones(9, 4, dtype=torch.int32)}, TypeError, ["keys", "floating", "int32"]),
        ({"ptr": torch.tensor([9])}, ValueError, ["ptr", "[0, 9)", "9"]),
        ({"ptr": torch.tensor([-1])}, ValueError, ["ptr", "-1"]),
        ({"ptr": torch.tensor([1.0])}, TypeError, ["ptr", "integer", "float32"]),
        ({"ptr": torch.tensor([1, 2])}, TypeError, ["ptr", "(2,)"]),
    ],
    ids=["keys-shape", "keys-dtype", "ptr-high", "ptr-neg", "ptr-float", "ptr-shape"],
)
def test_bad_state_dict_raises_and_changes_nothing(change, exc, words):
    q = KeyQueue(9, 4)
    q.push(torch.randn(3, 4))
    sd = {**KeyQueue(9, 4).state_dict(), **change}
    before = queue_state(q)
    with pytest.raises(exc) as info:
        q.load_state_dict(sd)
    for word in words:
        assert word in str(info.value)
    assert torch.equal(q.keys, before[0]) and torch.equal(q.ptr, before[1])


def test_op_registration_passes_opcheck():
    queue = torch.randn(5, 3)
    ptr = torch.tensor([3])
    arrivals = torch.zeros(1, dtype=torch.int32)
    keys = torch.randn(4, 3, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastssl.queue_push_.default, (queue, ptr, arrivals, keys, True))


def test_push_traces_under_torch_compile_fullgraph():
    # register_fake + the mutation annotations let a training step with push() compile as
    # one graph (aot_eager: the tracing/functionalization path, without inductor's codegen).
    q = KeyQueue(7, 4, normalize=True)
    expected, ptr = q.keys.clone(), 0

    def step(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        keys = torch.tanh(x @ w)
        q.push(keys)
        return keys

    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for _ in range(3):
        keys = compiled_step(torch.randn(5, 4), torch.randn(4, 4))
        ptr = push_ref(expected, ptr, keys, normalize=True)
    torch.testing.assert_close(q.keys, expected, atol=1e-6, rtol=1e-6)
    assert q.ptr.tolist() == [ptr]


def _gather_worker(rank: int, world: int, sizes: list[int]) -> dict:
    torch.manual_seed(0)  # same initial rows on every rank
    q = KeyQueue(10, 3)
    initial = q.keys.clone()
    pushed = []
    for step, n in enumerate(sizes):
        keys = torch.randn(n, 3, generator=torch.Generator().manual_seed(100 * step + rank))
        pushed.append(keys)
        q.push(keys, gather=True)
    return {"initial": initial, "pushed": pushed, "keys": q.keys, "ptr": q.ptr}


def test_gather_two_processes_gloo():
    sizes = [1, 4, 3, 7, 2]
    results = run_gloo(_gather_worker, 2, sizes)
    expected, ptr = results[0]["initial"].clone(), 0
    for step in range(len(sizes)):
        # all_gather order: rank 0's rows, then rank 1's.
        batch = torch.cat([results[0]["pushed"][step], results[1]["pushed"][step]])
        ptr = push_ref(expected, ptr, batch)
    for r in results:
        assert torch.equal(r["keys"], expected) and r["ptr"].tolist() == [ptr]


def test_gather_without_process_group_is_a_plain_push():
    q, plain = KeyQueue(4, 2), KeyQueue(4, 2)
    plain.load_state_dict(q.state_dict())
    keys = torch.randn(3, 2)
    q.push(keys, gather=True)
    plain.push(keys)
    assert torch.equal(q.keys, plain.keys) and torch.equal(q.ptr, plain.ptr)


@pytest.mark.gpu
def test_cuda_push_has_no_sync_and_matches_reference():
    torch.manual_seed(0)
    size, dim = 1000, 128
    q = KeyQueue(size, dim, device="cuda")
    expected, ptr = q.keys.cpu(), 0
    sizes = [1, 5, 256, 999, 1000, 1001, 4096 + 3, 7, 300]
    batches = [torch.randn(n, dim, device="cuda") for n in sizes]
    _push_without_host_sync(q, batches)
    for keys in batches:
        ptr = push_ref(expected, ptr, keys.cpu())
    assert torch.equal(q.keys.cpu(), expected) and q.ptr.tolist() == [ptr]


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [False, True])
def test_cuda_casts_normalize_and_large_grid(normalize):
    torch.manual_seed(1)
    for queue_dtype in FLOATS:
        for key_dtype in FLOATS:
            q = KeyQueue(37, 65, dtype=queue_dtype, device="cuda", normalize=normalize)
            cpu = KeyQueue(37, 65, dtype=queue_dtype, normalize=normalize)
            cpu.load_state_dict(q.state_dict())
            for n in (3, 40, 36, 100):
                keys = torch.randn(n, 65, dtype=torch.float64).to(key_dtype)
                keys[0, 1] = float("nan")
                q.push(keys.cuda())
                cpu.push(keys)
            # Same formula in both kernels; only fp32 summation order may differ.
            tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(queue_dtype, 1e-6)
            torch.testing.assert_close(q.keys.cpu(), cpu.keys, atol=tol if normalize else 0,
                                       rtol=tol if normalize else 0, equal_nan=True)
            assert q.ptr.item() == cpu.ptr.item()
    # More rows than the kernel's blocks * warps: exercises the grid-stride loop and the
    # last-block pointer advance across thousands of blocks.
    size, dim, n = 50_000, 8, 45_001
    q = KeyQueue(size, dim, dtype=torch.float32, device="cuda", normalize=normalize)
    q.ptr.fill_(49_990)
    keys = torch.randn(n, dim, device="cuda")
    expected = q.keys.clone()
    slots = (49_990 + torch.arange(n, device="cuda")) % size
    expected[slots] = torch.nn.functional.normalize(keys, dim=1) if normalize else keys
    for _ in range(3):  # repeated launches: the arrival counter must reset each time
        q.ptr.fill_(49_990)
        q.push(keys)
        torch.testing.assert_close(q.keys, expected, atol=1e-6, rtol=1e-6)
        assert q.ptr.item() == (49_990 + n) % size
    assert q._arrivals.item() == 0


@pytest.mark.parametrize("queue_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("key_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("normalize", [False, True])
def test_torch_path_equals_the_kernel(key_dtype, queue_dtype, normalize):
    # queue_push_ref is what a CUDA device without a kernel image runs: same ring, same casts.
    gen = torch.Generator().manual_seed(4)
    kernel = KeyQueue(11, 33, dtype=queue_dtype, normalize=normalize)
    keys_ref, ptr_ref = kernel.keys.clone(), kernel.ptr.clone()
    expected, ptr = kernel.keys.clone(), 0
    for n in (4, 11, 1, 25, 7):
        keys = (torch.randn(n, 33, generator=gen, dtype=torch.float64) * 3).to(key_dtype)
        keys[0, 2] = float("nan") if n == 7 else keys[0, 2]
        kernel.push(keys)
        queue_push_ref(keys_ref, ptr_ref, keys, normalize)
        if not normalize:
            ptr = push_ref(expected, ptr, keys)
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}.get(queue_dtype, 1e-6) if normalize else 0
    torch.testing.assert_close(keys_ref, kernel.keys, atol=tol, rtol=tol, equal_nan=True)
    assert torch.equal(ptr_ref, kernel.ptr)
    if not normalize:  # the exact one-row-at-a-time definition
        assert torch.equal(keys_ref.isnan(), expected.isnan())
        assert torch.equal(keys_ref.nan_to_num(), expected.nan_to_num()) and ptr_ref.tolist() == [ptr]


def test_default_dtype_is_the_devices_training_dtype():
    assert KeyQueue(8, 4).dtype == torch.float32
    with FakeTensorMode():  # CUDA tensors without a GPU: shapes and dtypes only
        assert KeyQueue(8, 4, device="cuda").dtype == torch.bfloat16
        moved = KeyQueue(8, 4).to("cuda")
        assert moved.dtype == torch.bfloat16 and moved.keys.is_cuda
        assert moved.to("cpu").dtype == torch.float32
        assert KeyQueue(8, 4, dtype=torch.float32).to("cuda").dtype == torch.float32  # explicit: kept
        assert KeyQueue(8, 4, device="cuda").double().dtype == torch.float64  # a cast in place: kept
        cast = KeyQueue(8, 4).to(torch.float16)
        assert cast.to("cuda").dtype == torch.float16 and cast.to("cpu").dtype == torch.float16
        assert KeyQueue(8, 4).to("cuda", torch.float64).dtype == torch.float64


@pytest.mark.gpu
def test_cuda_torch_path_has_no_sync(monkeypatch):
    device = torch.device("cuda", torch.cuda.current_device())
    monkeypatch.setitem(fastssl.queue._KERNEL_RUNS_ON, device, False)
    q = KeyQueue(100, 32, device="cuda", normalize=True)
    kernel = KeyQueue(100, 32, device="cuda", normalize=True)
    kernel.load_state_dict(q.state_dict())
    batches = [torch.randn(n, 32, device="cuda") for n in (7, 100, 130)]
    _push_without_host_sync(q, batches)
    monkeypatch.setitem(fastssl.queue._KERNEL_RUNS_ON, device, True)
    for keys in batches:
        kernel.push(keys)
    torch.testing.assert_close(q.keys, kernel.keys, atol=8e-3, rtol=8e-3)
    assert torch.equal(q.ptr, kernel.ptr)
