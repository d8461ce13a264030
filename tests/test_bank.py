"""MemoryBank (fastssl/bank.py, csrc/*/memory_bank_update*): the momentum update by index against
the rule written out one index at a time in fp64 (duplicates: the last occurrence wins), the
PyTorch reference, casts, normalization, the official initialisation, errors without state
change, state round trips, the 2-process gather, sampling, the memory formula, the CUDA images
the extension carries for the kernel and their register use (cuobjdump), and (GPU) the kernel with no
host sync."""

from __future__ import annotations

import io
import subprocess

import pytest
import torch
from dist_utils import run_gloo
from test_queue_extension import built_extension

import fastssl.bank
from fastssl.bank import MemoryBank, memory_bank_update_ref

FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def update_literal(memory: torch.Tensor, features: torch.Tensor, indices: torch.Tensor, momentum: float,
                   normalize: bool) -> torch.Tensor:
    """The stated rule in fp64, one index at a time: row i becomes m * v_i + (1 - m) * f_r for the
    LAST r with indices[r] == i, divided by max(||.||_2, 1e-12) when normalizing. Returns the fp64 truth."""
    out = memory.double().clone()
    last = {int(i): r for r, i in enumerate(indices.tolist())}
    for i, r in last.items():
        row = momentum * memory[i].double() + (1 - momentum) * features[r].double()
        if normalize:
            norm = torch.linalg.vector_norm(row)
            row = row / torch.where(norm < 1e-12, torch.full_like(norm, 1e-12), norm)
        out[i] = row
    return out


def bank_state(bank: MemoryBank) -> tuple[torch.Tensor, ...]:
    return bank.memory.clone(), bank.rejected.clone(), bank._scratch.clone()


def _max_err(x: torch.Tensor, truth: torch.Tensor) -> float:
    return (x.double() - truth).abs().max().item()


TOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float64: 1e-12, torch.float32: 1e-6}


@pytest.mark.parametrize("n", [1, 3, 17, 130])
@pytest.mark.parametrize("bank_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("feature_dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
def test_op_equals_reference_and_the_rule(n, bank_dtype, feature_dtype, normalize):
    gen = torch.Generator().manual_seed(n)
    size, dim = max(2, n // 2), 33  # fewer rows than the batch: indices repeat
    bank = MemoryBank(size, dim, momentum=0.3, dtype=bank_dtype, normalize=normalize, seed=n)
    before = bank.memory.clone()
    features = (torch.randn(n, dim, generator=gen, dtype=torch.float64) * 2).to(feature_dtype)
    indices = torch.randint(0, size, (n,), generator=gen)
    ref_memory, ref_rejected = before.clone(), torch.zeros(1, dtype=torch.int64)
    memory_bank_update_ref(ref_memory, ref_rejected, features, indices, 0.3, normalize)
    bank.update(features, indices)

    truth = update_literal(before, features, indices, 0.3, normalize)
    atol = {torch.float64: 1e-15}.get(bank_dtype, 1e-7)
    # DESIGN's rule: at most twice the error of PyTorch's own low-precision path, plus a small atol.
    assert _max_err(bank.memory, truth) <= 2 * _max_err(ref_memory, truth) + atol
    torch.testing.assert_close(bank.memory, ref_memory, atol=TOL[bank_dtype], rtol=TOL[bank_dtype])
    untouched = torch.ones(size, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(bank.memory[untouched], before[untouched])
    assert bank.rejected.item() == 0 and ref_rejected.item() == 0
    assert not bank._scratch.any()  # the claims are released for the next update


@pytest.mark.parametrize("bank_dtype", FLOATS, ids=str)
def test_duplicates_the_last_occurrence_wins_exactly(bank_dtype):
    bank = MemoryBank(7, 4, momentum=0.0, dtype=bank_dtype, normalize=False)
    before = bank.memory.clone()
    features = torch.arange(24, dtype=torch.float32).view(6, 4).to(bank_dtype)  # distinct, exact rows
    indices = torch.tensor([2, 5, 2, 2, 0, 5])
    bank.update(features, indices)
    assert torch.equal(bank.memory[2], features[3])
    assert torch.equal(bank.memory[5], features[5])
    assert torch.equal(bank.memory[0], features[4])
    assert torch.equal(bank.memory[[1, 3, 4, 6]], before[[1, 3, 4, 6]])
    # Halving is exact: m = 0.5 without normalizing is exact in every dtype too.
    halves = MemoryBank(7, 4, momentum=0.5, dtype=bank_dtype, normalize=False)
    start = halves.memory.clone()
    halves.update(features, indices)
    assert torch.equal(halves.memory[2], (start[2].double() / 2 + features[3].double() / 2).to(bank_dtype))


def test_repeated_updates_and_int32_indices():
    gen = torch.Generator().manual_seed(9)
    bank = MemoryBank(50, 16, momentum=0.7)
    truth = bank.memory.double()
    for n in (1, 40, 130, 3, 17):
        features = torch.randn(n, 16, generator=gen)
        indices = torch.randint(0, 50, (n,), generator=gen, dtype=torch.int32)
        bank.update(features, indices)
        truth = update_literal(truth, features, indices.long(), 0.7, True)
    torch.testing.assert_close(bank.memory.double(), truth, atol=1e-6, rtol=1e-6)


def test_momentum_per_call_and_its_extremes():
    bank = MemoryBank(6, 5, momentum=0.5, normalize=False)
    before = bank.memory.clone()
    features = torch.randn(3, 5)
    bank.update(features, torch.tensor([0, 1, 2]), momentum=1.0)
    assert torch.equal(bank.memory, before)  # 1 * v + 0 * f
    bank.update(features, torch.tensor([0, 1, 2]), momentum=0.0)
    assert torch.equal(bank.memory[:3], features) and torch.equal(bank.memory[3:], before[3:])
    assert bank.momentum == 0.5  # the per-call value is not stored


@pytest.mark.parametrize("bank_dtype", FLOATS, ids=str)
def test_normalize(bank_dtype):
    bank = MemoryBank(8, 130, momentum=0.5, dtype=bank_dtype)
    features = torch.randn(4, 130, dtype=torch.float64) * 5
    features[1] = -bank.memory[1].double()  # m * v + (1 - m) * f = 0: F.normalize gives zeros
    features[2] *= 1e-8  # small but the blend is not: still a unit vector
    bank.update(features.to(bank_dtype), torch.tensor([0, 1, 2, 3]))
    norms = torch.linalg.vector_norm(bank.memory.double(), dim=1)
    expected = torch.ones(8, dtype=torch.float64)
    expected[1] = 0
    low = bank_dtype in (torch.float16, torch.bfloat16)
    assert torch.allclose(norms, expected, atol=1e-2 if low else 1e-6)
    assert torch.equal(bank.memory[1], torch.zeros(130, dtype=bank_dtype))


def test_nan_in_gives_nan_out():
    for normalize in (False, True):
        bank = MemoryBank(4, 6, normalize=normalize)
        features = torch.randn(2, 6)
        features[1, 2] = float("nan")
        bank.update(features, torch.tensor([0, 3]))
        assert torch.isnan(bank.memory[3, 2])
        if normalize:  # the row's norm is NaN, so is every entry (never masked to finite)
            assert torch.isnan(bank.memory[3]).all()
        assert torch.isfinite(bank.memory[:3]).all()


def test_features_may_be_views_or_rows_of_the_bank():
    bank = MemoryBank(5, 4, momentum=0.25)
    truth = bank.memory.double()
    base = torch.randn(4, 3, requires_grad=True)
    features = base.T * 2  # [3, 4], a transposed view inside an autograd graph
    bank.update(features, torch.tensor([4, 0, 4]))
    truth = update_literal(truth, features.detach(), torch.tensor([4, 0, 4]), 0.25, True)
    rows = bank.memory[[1, 2]]  # a copy by advanced indexing: the swap below reads old values
    own = bank.memory[1:3]  # a view of the bank: update must read it all before writing
    truth = update_literal(truth, rows.double(), torch.tensor([2, 1]), 0.25, True)
    bank.update(own, torch.tensor([2, 1]))
    torch.testing.assert_close(bank.memory.double(), truth, atol=1e-6, rtol=1e-6)
    assert not bank.memory.requires_grad


def test_initialisation_is_the_official_uniform_draw():
    dim = 48
    stdv = 1 / (dim / 3) ** 0.5
    raw = MemoryBank(2000, dim, normalize=False, seed=1)
    assert raw.memory.dtype == torch.float32
    assert raw.memory.abs().max() <= stdv and raw.memory.abs().max() > 0.99 * stdv
    # Uniform on [-s, s]: mean 0, variance s^2 / 3 = 1 / dim, so E||v||^2 = 1.
    assert abs(raw.memory.mean().item()) < 0.01
    assert abs(raw.memory.var().item() * dim - 1) < 0.03
    assert abs((raw.memory ** 2).sum(1).mean().item() - 1) < 0.03
    unit = MemoryBank(2000, dim, seed=1)
    torch.testing.assert_close(unit.memory, torch.nn.functional.normalize(raw.memory, dim=1))
    assert torch.equal(MemoryBank(2000, dim, seed=1).memory, unit.memory)  # same seed, same rows
    assert not torch.equal(MemoryBank(2000, dim, seed=2).memory, unit.memory)
    # Drawn in chunks: a size spanning several chunks matches the same draw in one piece.
    big = MemoryBank(3, (1 << 21) + 5, normalize=False, seed=4)
    whole = torch.rand(3, (1 << 21) + 5, generator=torch.Generator().manual_seed(4))
    stdv_big = 1 / (((1 << 21) + 5) / 3) ** 0.5
    torch.testing.assert_close(big.memory, whole * (2 * stdv_big) - stdv_big)
    half = MemoryBank(10, 8, dtype=torch.float16, seed=5)
    assert torch.equal(half.memory, MemoryBank(10, 8, dtype=torch.float32, seed=5).memory.half())


def _bad_update_cases():
    f, i = torch.randn(3, 4), torch.tensor([0, 1, 2])
    empty = (torch.randn(0, 4), torch.zeros(0, dtype=torch.int64))
    return [
        ("1-D features", (torch.randn(4), i), {}, ValueError, ["features", "2-D", "(4,)"]),
        ("3-D features", (torch.randn(3, 4, 1), i), {}, ValueError, ["features", "2-D"]),
        ("columns", (torch.randn(3, 5), i), {}, ValueError, ["features", "4 columns", "(3, 5)"]),
        ("int features", (f.long(), i), {}, TypeError, ["features", "dtype", "int64"]),
        ("float indices", (f, i.float()), {}, TypeError, ["indices", "dtype", "float32"]),
        ("bool indices", (f, torch.tensor([True, False, True])), {}, TypeError, ["indices", "dtype", "bool"]),
        ("2-D indices", (f, i.view(3, 1)), {}, ValueError, ["indices", "1-D"]),
        ("length", (f, i[:2]), {}, ValueError, ["indices", "one entry per feature row", "(2,)"]),
        ("negative", (f, torch.tensor([0, -1, 2])), {}, ValueError, ["indices", "[0, 6)", "-1"]),
        ("too large", (f, torch.tensor([0, 6, 2])), {}, ValueError, ["indices", "[0, 6)", "6"]),
        ("momentum", (f, i), {"momentum": 1.5}, ValueError, ["momentum", "1.5"]),
        ("gather", (f, i), {"gather": "yes"}, TypeError, ["gather", "True or False"]),
        ("empty", empty, {}, ValueError, ["features", "empty"]),
    ]


@pytest.mark.parametrize("args,kwargs,exc,words", [c[1:] for c in _bad_update_cases()],
                         ids=[c[0] for c in _bad_update_cases()])
def test_bad_update_is_one_line_and_changes_nothing(args, kwargs, exc, words):
    bank = MemoryBank(6, 4)
    before = bank_state(bank)
    with pytest.raises(exc) as info:
        bank.update(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message, word
    assert all(torch.equal(a, b) for a, b in zip(bank_state(bank), before))


def test_op_refuses_an_out_of_range_batch_on_the_device_side():
    # Called directly (as the CUDA path runs: no host check), the op and the reference both
    # refuse the whole batch, count it and leave every row and the scratch as they were.
    bank = MemoryBank(6, 4)
    before = bank.memory.clone()
    features = torch.randn(3, 4)
    for bad in (torch.tensor([0, 6, 1]), torch.tensor([-3, 1, 1])):
        op_args = (bank.memory, bank._scratch, bank.rejected, features, bad, 0.5, True)
        torch.ops.fastssl.memory_bank_update_(*op_args)
        ref_memory, ref_rejected = before.clone(), torch.zeros(1, dtype=torch.int64)
        memory_bank_update_ref(ref_memory, ref_rejected, features, bad, 0.5, True)
        assert torch.equal(ref_memory, before) and ref_rejected.item() == 1
    assert torch.equal(bank.memory, before) and bank.rejected.item() == 2 and not bank._scratch.any()
    bank.update(features, torch.tensor([0, 1, 1]))  # the next good batch goes through
    assert not torch.equal(bank.memory, before) and bank.rejected.item() == 2


@pytest.mark.parametrize("size,dim,momentum,normalize,seed,dtype,exc,words", [
    (0, 4, 0.5, True, 0, None, ValueError, ["size", ">= 1", "0"]),
    (4, 2.0, 0.5, True, 0, None, TypeError, ["dim", "integer"]),
    (4, 4, -0.1, True, 0, None, ValueError, ["momentum", "-0.1"]),
    (4, 4, 0.5, 1, 0, None, TypeError, ["normalize", "True or False"]),
    (4, 4, 0.5, True, -1, None, ValueError, ["seed", ">= 0"]),
    (4, 4, 0.5, True, 0, torch.int64, TypeError, ["dtype", "int64"]),
])
def test_bad_constructor_arguments(size, dim, momentum, normalize, seed, dtype, exc, words):
    with pytest.raises(exc) as info:
        MemoryBank(size, dim, momentum=momentum, normalize=normalize, seed=seed, dtype=dtype)
    assert "\n" not in str(info.value)
    for word in words:
        assert word in str(info.value), word


def test_state_dict_round_trip():
    gen = torch.Generator().manual_seed(3)
    bank = MemoryBank(20, 8, momentum=0.4, seed=1)
    bank.update(torch.randn(9, 8, generator=gen), torch.randint(0, 20, (9,), generator=gen))
    assert list(bank.state_dict()) == ["memory"]  # the official NCEAverage buffer's name
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = MemoryBank(20, 8, momentum=0.4, seed=2)
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    assert torch.equal(restored.memory, bank.memory)
    features, indices = torch.randn(6, 8, generator=gen), torch.tensor([1, 1, 5, 19, 0, 5])
    bank.update(features, indices)
    restored.update(features, indices)
    assert torch.equal(restored.memory, bank.memory)  # resumes exactly
    cast = MemoryBank(20, 8, dtype=torch.bfloat16)
    cast.load_state_dict(bank.state_dict())
    assert cast.dtype == torch.bfloat16 and torch.equal(cast.memory, bank.memory.bfloat16())


@pytest.mark.parametrize("state,exc,words", [
    ({"memory": torch.randn(20, 9)}, ValueError, ["memory", "(20, 8)", "(20, 9)"]),
    ({"memory": torch.zeros(20, 8, dtype=torch.int64)}, TypeError, ["memory", "floating", "int64"]),
], ids=["shape", "dtype"])
def test_bad_state_dict_changes_nothing(state, exc, words):
    bank = MemoryBank(20, 8)
    before = bank.memory.clone()
    with pytest.raises(exc) as info:
        bank.load_state_dict(state)
    for word in words:
        assert word in str(info.value), word
    assert torch.equal(bank.memory, before)


def _gather_worker(rank: int, world: int, steps: int) -> dict:
    bank = MemoryBank(11, 6, momentum=0.3, seed=3)  # identical on every rank: seeded, no collective
    initial = bank.memory.clone()
    batches = []
    for step in range(steps):
        gen = torch.Generator().manual_seed(100 * step + rank)
        features, indices = torch.randn(5, 6, generator=gen), torch.randint(0, 11, (5,), generator=gen)
        indices[0] = 7  # every rank writes row 7: rank 1's row must win on both
        batches.append((features, indices))
        bank.update(features, indices, gather=True)
    bad = torch.tensor([0, 1, 2, 3, 11 if rank == 1 else 4])  # only rank 1 is wrong
    try:
        bank.update(torch.randn(5, 6), bad, gather=True)
        error = None
    except ValueError as exc:
        error = str(exc)
    return {"initial": initial, "batches": batches, "memory": bank.memory, "error": error}


def test_gather_two_processes_gloo():
    steps = 4
    results = run_gloo(_gather_worker, 2, steps)
    assert torch.equal(results[0]["initial"], results[1]["initial"])
    single = MemoryBank(11, 6, momentum=0.3, seed=3)
    truth = single.memory.double()
    for step in range(steps):
        # all_gather order: rank 0's rows, then rank 1's.
        features = torch.cat([results[r]["batches"][step][0] for r in range(2)])
        indices = torch.cat([results[r]["batches"][step][1] for r in range(2)])
        single.update(features, indices)
        truth = update_literal(truth, features, indices, 0.3, True)
    for r in results:
        assert torch.equal(r["memory"], single.memory)  # replicas identical, = one process
        assert r["error"] is not None and "[0, 11)" in r["error"]  # both ranks refuse the batch
    torch.testing.assert_close(single.memory.double(), truth, atol=1e-6, rtol=1e-6)


def test_gather_without_process_group_is_a_plain_update():
    bank, plain = MemoryBank(4, 2), MemoryBank(4, 2)
    features, indices = torch.randn(3, 2), torch.tensor([3, 0, 3])
    bank.update(features, indices, gather=True)
    plain.update(features, indices)
    assert torch.equal(bank.memory, plain.memory)


def test_sample():
    bank = MemoryBank(30, 5)
    indices, rows = bank.sample((4, 7), generator=torch.Generator().manual_seed(0))
    assert indices.shape == (4, 7) and indices.dtype == torch.int64 and rows.shape == (4, 7, 5)
    assert indices.min() >= 0 and indices.max() < 30
    assert torch.equal(rows, bank.memory[indices])
    again, _ = bank.sample((4, 7), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again, indices)
    flat, flat_rows = bank.sample(3)
    assert flat.shape == (3,) and flat_rows.shape == (3, 5)
    # Uniform: each of the 30 rows drawn ~1000 times out of 30,000.
    counts = torch.bincount(bank.sample(30_000, generator=torch.Generator().manual_seed(1))[0], minlength=30)
    assert counts.min() > 800 and counts.max() < 1200
    with pytest.raises(ValueError, match=r"shape\[1\]"):
        bank.sample((4, 0))


def test_bytes_formula_matches_the_buffers():
    # ImageNet-1k's 1,281,167 training images, 128 features in fp16: 327,978,752 bytes of rows.
    rows = 1_281_167 * 128 * 2
    assert rows == 327_978_752
    assert MemoryBank.bytes(1_281_167, 128, torch.float16) == rows + 1_281_168 * 4 + 8
    for dtype in FLOATS:
        bank = MemoryBank(37, 10, dtype=dtype)
        held = sum(b.numel() * b.element_size() for b in bank.buffers())
        assert MemoryBank.bytes(37, 10, dtype) == held
    with pytest.raises(TypeError, match="dtype"):
        MemoryBank.bytes(10, 4, torch.int32)


def test_reference_is_the_path_where_the_kernel_cannot_run(monkeypatch):
    gen = torch.Generator().manual_seed(6)
    kernel, torch_path = MemoryBank(12, 9, seed=1), MemoryBank(12, 9, seed=1)
    monkeypatch.setattr(fastssl.bank, "kernel_runs_on", lambda device: False)
    called = []
    monkeypatch.setattr(fastssl.bank, "memory_bank_update_ref",
                        lambda *a: called.append(1) or memory_bank_update_ref(*a))
    for n in (5, 30, 1):
        features, indices = torch.randn(n, 9, generator=gen), torch.randint(0, 12, (n,), generator=gen)
        torch_path.update(features, indices)
        monkeypatch.setattr(fastssl.bank, "kernel_runs_on", lambda device: True)
        kernel.update(features, indices)
        monkeypatch.setattr(fastssl.bank, "kernel_runs_on", lambda device: False)
    assert len(called) == 3
    torch.testing.assert_close(torch_path.memory, kernel.memory, atol=1e-6, rtol=1e-6)


def test_op_registration_passes_opcheck():
    memory = torch.nn.functional.normalize(torch.randn(10, 6), dim=1)
    scratch = torch.zeros(11, dtype=torch.int32)
    rejected = torch.zeros(1, dtype=torch.int64)
    args = (memory, scratch, rejected, torch.randn(4, 6), torch.tensor([1, 9, 1, 0]), 0.5, True)
    torch.library.opcheck(torch.ops.fastssl.memory_bank_update_.default, args)


def test_update_traces_under_torch_compile_fullgraph():
    bank = MemoryBank(16, 4, momentum=0.5)
    truth = bank.memory.double()

    def step(x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        features = x * 2
        bank.update(features, indices)
        return features

    compiled_step = torch.compile(step, fullgraph=True, backend="aot_eager")
    for seed in range(3):
        indices = torch.randint(0, 16, (6,), generator=torch.Generator().manual_seed(seed))
        features = compiled_step(torch.randn(6, 4), indices)
        truth = update_literal(truth, features, indices, 0.5, True)
    torch.testing.assert_close(bank.memory.double(), truth, atol=1e-6, rtol=1e-6)


def test_extension_carries_the_bank_kernel_for_every_image():
    reported, library, tool = built_extension()

    def listed(flag: str) -> set[str]:
        out = subprocess.run([tool, flag, library.__file__], capture_output=True, text=True).stdout
        # "ELF file    1: memory_bank_update.sm_90.cubin", "PTX file    1: memory_bank_update.sm_100.ptx"
        return {line.split(": ")[-1] for line in out.splitlines() if ": memory_bank_update." in line}

    sass = {f"memory_bank_update.{i}.cubin" for i in reported if i.startswith("sm_")}
    ptx = {f"memory_bank_update.sm_{i[len('compute_'):]}.ptx" for i in reported if i.startswith("compute_")}
    assert listed("--list-elf") == sass and listed("--list-ptx") == ptx and ptx
    for image in (i for i in reported if i.startswith("sm_")):
        out = subprocess.run([tool, "--dump-elf-symbols", "--gpu-architecture", image, library.__file__],
                             capture_output=True, text=True, check=True).stdout
        for kernel in ("claim_kernel", "apply_kernel", "finish_kernel"):
            assert kernel in out, (image, kernel)


def _update_without_host_sync(bank: MemoryBank, batches) -> None:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for features, indices in batches:
            bank.update(features, indices)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
@pytest.mark.parametrize("normalize", [True, False])
def test_cuda_kernel_matches_the_cpu_op_without_host_sync(normalize):
    gen = torch.Generator().manual_seed(0)
    for bank_dtype in FLOATS:
        for feature_dtype in FLOATS:
            gpu = MemoryBank(300, 65, dtype=bank_dtype, device="cuda", normalize=normalize)
            cpu = MemoryBank(300, 65, dtype=bank_dtype, normalize=normalize)
            assert torch.equal(gpu.memory.cpu(), cpu.memory)  # the same seeded draw on every device
            batches = []
            for n in (1, 3, 17, 130, 1000, 40_000):  # 40,000 rows: the grid-stride loops
                features = torch.randn(n, 65, generator=gen, dtype=torch.float64).to(feature_dtype)
                batches.append((features, torch.randint(0, 300, (n,), generator=gen)))
            _update_without_host_sync(gpu, [(f.cuda(), i.cuda()) for f, i in batches])
            for features, indices in batches:
                cpu.update(features, indices)
            # Same formula in both; only fp32 summation order and FMA contraction may differ.
            tol = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}.get(bank_dtype, 1e-5)
            torch.testing.assert_close(gpu.memory.cpu(), cpu.memory, atol=tol, rtol=tol)
            assert not gpu._scratch.any() and gpu.rejected.item() == 0


@pytest.mark.gpu
def test_cuda_duplicates_and_refusal_on_the_device():
    bank = MemoryBank(7, 4, momentum=0.0, device="cuda", dtype=torch.float32, normalize=False)
    before = bank.memory.clone()
    features = torch.arange(24, dtype=torch.float32, device="cuda").view(6, 4)
    for _ in range(3):  # the claims must be released every time
        bank.update(features, torch.tensor([2, 5, 2, 2, 0, 5], device="cuda"))
        assert torch.equal(bank.memory[2], features[3]) and torch.equal(bank.memory[5], features[5])
    bank.memory.copy_(before)
    bad = [(features, torch.tensor([2, 5, 7, 2, 0, 5], device="cuda")),
           (features, torch.tensor([-1, 5, 1, 2, 0, 5], device="cuda"))]
    _update_without_host_sync(bank, bad)  # refused on the device: no raise, no sync
    assert torch.equal(bank.memory, before) and bank.rejected.item() == 2 and not bank._scratch.any()


def test_extension_kernels_keep_to_registers_in_every_image():
    """The compile gate's no-spill rule, applied to the extension's CUDA kernels (the bank's and the
    queue's), which the Triton gate does not compile: in every SASS image, every kernel has no stack
    frame and no local memory (where spilled registers go) and at most 255 registers per thread."""
    reported, library, tool = built_extension()
    out = subprocess.run([tool, "--dump-resource-usage", library.__file__], capture_output=True, text=True,
                         check=True).stdout
    usage, section = {}, {}
    for line in map(str.strip, out.splitlines()):
        if line.startswith("Fatbin "):
            section = {"elf": line.startswith("Fatbin elf")}
        elif line.startswith(("arch = ", "identifier = ")):
            key, value = line.split(" = ")
            section[key] = value.rsplit("/", 1)[-1].removesuffix(".cu")
        elif line.startswith("Function ") and section.get("elf"):
            kernel = line.removeprefix("Function ").rstrip(":")
        elif line.startswith("REG:") and section.get("elf"):
            usage[section["arch"], section["identifier"], kernel] = dict(f.split(":") for f in line.split())
    images = {i for i in reported if i.startswith("sm_")}
    for source in ("memory_bank_update", "queue_push"):
        assert {arch for arch, src, _ in usage if src == source} == images, source
    for (arch, source, kernel), fields in usage.items():
        where = f"{source} {kernel} on {arch}"
        assert fields["STACK"] == "0" and fields["LOCAL"] == "0", f"{where} spills: {fields}"
        assert int(fields["REG"]) <= 255, where
