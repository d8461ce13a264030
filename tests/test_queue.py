"""KeyQueue (fastssl/queue.py, csrc/*/queue_push*): ring semantics against a one-row-at-a-time
reference, casts, fused normalization, errors without state change, state round trips,
the 2-process gather, the JIT-fallback error, the official MoCo queue layout, the CUDA images
the extension carries (cuobjdump) and the fallback where none fits, and (GPU) zero syncs per push."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension
from dist_utils import run_gloo
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

import fastssl.losses.info_nce
import fastssl.queue
from fastssl import _build, _ext
from fastssl.queue import KeyQueue, has_kernel_image, queue_push_ref

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


def test_jit_fallback_names_what_is_missing(monkeypatch):
    # The prebuilt module "fails to import" and neither ninja nor a compiler is there:
    # the error must say so (never a bare ImportError) and point at the fix.
    monkeypatch.setitem(sys.modules, "fastssl._C", None)
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler-fastssl")
    monkeypatch.setattr(_build, "nvcc", lambda: None)
    with pytest.raises(_ext.ExtensionError) as info:
        _ext.load()
    message = str(info.value)
    assert not isinstance(info.value, ImportError)
    for word in ("fastssl._C", "ninja", "no-such-compiler-fastssl", "C++ compiler", "nvcc", "pip install"):
        assert word in message, word


def test_jit_fallback_names_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fastssl._C", None)
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_build, "CSRC", tmp_path / "csrc")
    with pytest.raises(_ext.ExtensionError, match="sources"):
        _ext.load()


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


# CUDA's rules: SASS runs within its major version on equal or higher minor (the "a" variants on
# their exact capability only); PTX is JIT-compiled for its capability and anything newer.
PORTABLE_IMAGES = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "compute_100"]


@pytest.mark.parametrize("capability,images,runs", [
    ((8, 0), PORTABLE_IMAGES, True),       # A100
    ((8, 6), PORTABLE_IMAGES, True),       # A10, RTX 3090
    ((8, 7), PORTABLE_IMAGES, True),       # Jetson Orin: sm_86 SASS
    ((8, 9), PORTABLE_IMAGES, True),       # L40S, RTX 4090
    ((9, 0), PORTABLE_IMAGES, True),       # H100
    ((10, 0), PORTABLE_IMAGES, True),      # B200
    ((12, 0), PORTABLE_IMAGES, True),      # RTX 5090: PTX of 10.0, JIT-compiled
    ((7, 5), PORTABLE_IMAGES, False),      # T4: older than every image
    ((8, 0), ["sm_90"], False),            # the old Hopper-only build on an A100
    ((8, 9), ["sm_90"], False),
    ((10, 0), ["sm_90"], False),           # SASS does not cross a major version
    ((8, 9), ["sm_80"], True),
    ((8, 6), ["sm_89"], False),            # nor run on a lower minor
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_90a", "compute_90a"], False),  # arch-specific: exactly 9.0
    ((10, 0), ["compute_90"], True),
    ((12, 0), ["compute_100f"], False),    # family PTX: major 10 only
    ((10, 3), ["compute_100f"], True),
    ((9, 0), [], False),                   # a CPU-only build
])
def test_kernel_image_decision(capability, images, runs):
    assert has_kernel_image(capability, images) is runs


def test_kernel_image_decision_rejects_bad_names():
    with pytest.raises(ValueError, match="images"):
        has_kernel_image((9, 0), ["sm90"])


def test_device_without_image_warns_once_and_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(fastssl.queue, "_KERNEL_RUNS_ON", {})
    monkeypatch.setattr(fastssl.queue, "extension_cuda_images", lambda: ("sm_90",))
    capabilities = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capabilities[torch.device(d).index])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fastssl.queue.kernel_runs_on(torch.device("cuda", 0))
        second = fastssl.queue.kernel_runs_on(torch.device("cuda", 0))
        hopper = fastssl.queue.kernel_runs_on(torch.device("cuda", 1))
        cpu = fastssl.queue.kernel_runs_on(torch.device("cpu"))
    assert (first, second, hopper, cpu) == (False, False, True, True)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    for word in ("sm_80", "sm_90", "queue_push_ref", "TORCH_CUDA_ARCH_LIST"):
        assert word in str(caught[0].message), word


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def built_extension() -> tuple[list[str], object, str]:
    """(the CUDA images the built extension reports, its library module, a cuobjdump), or a skip
    saying which of them this machine lacks."""
    _ext.load()
    reported = fastssl.queue.extension_cuda_images()
    if not reported:
        pytest.skip(f"the extension was built CPU-only ({_ext.load()})")
    library = sys.modules.get("fastssl._C")
    if library is None:
        pytest.skip(f"the extension was JIT-built ({_ext.load()})")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither Triton's bundled one nor on PATH)")
    return reported, library, tool


def test_extension_carries_the_images_it_reports():
    reported, library, tool = built_extension()

    def listed(flag: str) -> set[str]:
        out = subprocess.run([tool, flag, library.__file__], capture_output=True, text=True, check=False)
        # "ELF file    1: queue_push.sm_90.cubin", "PTX file    1: queue_push.sm_100.ptx"
        lines = out.stdout.splitlines()
        return {line.rsplit(".", 2)[-2] for line in lines if line.endswith((".cubin", ".ptx"))}

    sass, ptx = listed("--list-elf"), listed("--list-ptx")
    assert {i for i in reported if i.startswith("sm_")} == sass
    assert {i.replace("compute_", "sm_") for i in reported if i.startswith("compute_")} == ptx
    assert ptx, "no PTX: cards newer than the newest image could not run the kernel"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Built as `make test` builds it (no GPU, no user list): every portable arch nvcc has.
        have = _build.nvcc_archs()
        portable = {f"sm_{a.replace('.', '')}" for a in _build.PORTABLE_CUDA_ARCHS if a in have}
        assert portable <= sass, f"missing {sorted(portable - sass)}"
        assert max(portable, key=lambda s: int(s[3:])) in ptx


def test_portable_arch_list():
    nvcc_13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0", "12.1"]
    assert _build.portable_arch_list(nvcc_13) == "8.0;8.6;8.9;9.0;10.0+PTX"
    nvcc_11_8 = ["3.5", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]
    assert _build.portable_arch_list(nvcc_11_8) == "8.0;8.6;8.9;9.0+PTX"
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        _build.portable_arch_list(["5.0", "7.0"])
    if _build.nvcc() is not None:
        assert set(_build.nvcc_archs()) >= {"8.0", "9.0"}


def test_arch_list_choice(monkeypatch):
    monkeypatch.setattr(_build, "nvcc_archs", lambda: ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert "set by the user" in _build.set_default_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.9"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "visible GPU" in _build.set_default_arch_list()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # torch's builder then targets the visible GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "portable" in _build.set_default_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;8.9;9.0;10.0+PTX"
    if _build.nvcc() is not None:
        images = _build.cuda_images()
        assert sorted(images) == ["compute_100", "sm_100", "sm_80", "sm_86", "sm_89", "sm_90"]
        assert _build.image_define(images).startswith("-DFASTSSL_CUDA_IMAGES=")


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
