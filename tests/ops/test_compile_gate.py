"""The compile gate (tests/ops/compile_gate.py): every Triton kernel compiled for sm_80, sm_89,
sm_90 and sm_100 at the configurations its launcher picks, with no spill, within the card's
shared memory and with tensor-core instructions in its matmuls.

Two gate processes (sm_90, which alone compiles the flag grid, and the three other targets; ~1.3
GB of memory apiece at most), run side by side from this one test: the test session runs Triton
under the interpreter while the gate needs the real compiler, and one test that uses two cores
keeps pytest-xdist from queueing the gates behind each other on one worker. The run's summary (one
row per kernel and target) must equal the rows benchmarks/results/compile_gate.jsonl publishes for
the installed triton version. Compiles are cached
beside Triton's cache, so only the first run on a machine pays (about 10 CPU-minutes; then ~10 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import gate_report  # beside this file
import pytest
import torch

GATE = Path(__file__).with_name("compile_gate.py")
ROOT = GATE.parents[2]
GROUPS = ((80, 89, 100), (90,))
TARGETS = tuple(cap for group in GROUPS for cap in group)

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no kernel to compile")
@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build cannot make fake CUDA tensors")
def test_compile_gate(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    procs = {}
    for group in GROUPS:  # output to files: pipes would stall a gate until its turn to be read
        name = "sm_" + "_".join(map(str, group))
        with open(tmp_path / f"{name}.log", "w") as log:
            targets = ",".join(map(str, group))
            cmd = [sys.executable, str(GATE), "--targets", targets, "--json", str(tmp_path / f"{name}.json")]
            procs[name] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    reports, rows, failures, skipped = [], [], [], []
    totals = dict(launches=0, compiles=0)
    for name, proc in procs.items():
        code = proc.wait(timeout=1800)
        log = (tmp_path / f"{name}.log").read_text()
        table = "\n".join(ln for ln in log.splitlines() if ln[:1] != "[")  # without the progress lines
        reports.append(f"--- {name}: exit {code}\n{table}")
        assert code in (0, 1), reports[-1][-5000:]  # 2: the gate could not run
        result = json.loads((tmp_path / f"{name}.json").read_text())
        rows += result["rows"]
        failures += result["failures"]
        skipped += result["skipped"]
        totals = {k: n + result["stats"][k] for k, n in totals.items()}
    print("\n".join(reports))  # the tables: shown with pytest -s, or on failure
    compiled = {int(r["target"][3:]) for r in rows}
    assert {80, 89, 90} <= compiled, skipped  # sm_100 only where the installed Triton targets it
    assert compiled | {cap for cap in TARGETS if any(f"sm_{cap}:" in why for why in skipped)} == set(TARGETS)
    assert not failures, "\n".join(failures)
    assert not any(r["spills"] for r in rows if r["fits"])
    # the published table (benchmarks/RESULTS.md's compile_gate) is what this run gives
    stale = gate_report.published_difference(gate_report.summary(rows, totals), result["stats"]["triton"])
    assert not stale, stale


CAPTURE = r"""
import compile_gate as g
seen = set()
for name, run in g.scenarios():
    if any(k in name for k in ("N=256 K", "N=M=256 D=128", "B=32 crops=2 K=4096", "C=10000", "D=768",
                               "siglip N=256 M=256 D=512", "ibot B=64 L=256 n=5000 K=65536")):
        with g.fake_cuda(g.CARDS[90]) as recorded:
            run()
        seen |= {f"{launch.fn.__module__}.{launch.fn.__name__}" for launch in g.expand(recorded, g.CARDS[90])}
kernels = g.triton_kernels()
missing = [k for k in kernels if k not in seen and not g._inlined(kernels[k], seen)]
print("launched", len(seen), "missing", missing)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no kernel to launch")
@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build cannot make fake CUDA tensors")
def test_gate_scenarios_launch_every_kernel():
    """The gate's scenarios reach every kernel through the launchers (captured on fake CUDA tensors,
    nothing compiled): one scenario per op family and dtype-independent shape, in ~15 s."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(GATE.parent), str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CAPTURE], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "missing []" in out.stdout and "launched 0 " not in out.stdout, out.stdout


CALL_SITES = r"""
import compile_gate as g
import gate_coverage
from gate_call_sites import PAPER_STEPS, method_step
from triton.backends.compiler import GPUTarget

card, target = g.CARDS[90], GPUTarget("cuda", 90, 32)
compiled, signatures = set(), set()
for name, run in g.scenarios():
    with g.fake_cuda(card) as recorded:
        run()
    launches = g.expand(recorded, card)
    compiled |= {g.compile_key(launch, target) for launch in launches}
    signatures |= {gate_coverage.signature(launch.fn, launch.args, launch.kwargs) for launch in launches}
gate_coverage.save(signatures)  # read by the suite's coverage check (tests/conftest.py)
values = {}  # (kernel, flag constexpr) -> the values the gate compiles it with
launched = [(kernel.rsplit(".", 1)[1], parts) for kernel, *parts in map(str.split, signatures)]
for kernel, parts in launched:
    for flag, _, value in (p.partition("=") for p in parts if "=" in p and not p.endswith("=None")):
        values.setdefault((kernel, flag), set()).add(value)
for kernel, parts in launched:  # a flag a launcher leaves out compiles with its default
    given = {p.partition("=")[0] for p in parts}
    for (k, flag), v in values.items():
        if k == kernel and flag not in given:
            v.add("default")
print("flags-with-one-value", sorted(f"{k}.{f}={v}" for (k, f), v in values.items() if len(v) < 2))
for method in PAPER_STEPS:
    with g.fake_cuda(card) as recorded:
        method_step(method)
    launches = g.expand(recorded, card)
    missing = sorted(f"{x.fn.__name__} {g.describe(x)}" for x in launches
                     if g.compile_key(x, target) not in compiled)
    print(method, len(launches), "missing", missing)
"""


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no kernel to launch")
@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build cannot make fake CUDA tensors")
def test_gate_compiles_what_each_method_step_launches():
    """Every kernel configuration (by Triton's cache key, on sm_90) that a method's training step
    launches at its paper configuration is one the gate compiles (captured on fake CUDA tensors,
    nothing compiled): a launcher change that gives the library's own call sites a configuration
    the gate never sees fails here. And every flag constexpr of every kernel is compiled with each
    of its values (DOT_PRECISION with tf32 and tf32x3)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(GATE.parent), str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CALL_SITES], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    # the flag grid: every flag of every kernel compiled with each value it takes (both, for a bool)
    assert lines.pop("flags-with-one-value") == "flags-with-one-value []", out.stdout
    assert {"mocov2", "mocov3", "dino", "mae"} <= set(lines), out.stdout
    for method, line in lines.items():
        assert line.endswith("missing []") and (int(line.split()[1]) > 0) == (method != "rotnet"), line


if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _helper_dot(a, b):
        return tl.dot(a, b)

    @triton.jit
    def _kernel_with_dots(x_ptr, CHUNKED: tl.constexpr):
        r = tl.arange(0, 16)
        a = tl.load(x_ptr + r[:, None] * 16 + r[None, :])
        c = tl.dot(a, a)
        if CHUNKED:
            c = tl.dot(a, c)
        tl.store(x_ptr + r[:, None] * 16 + r[None, :], _helper_dot(a, c))


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_tensor_core_verdict_per_tl_dot_helpers_included():
    """Each tl.dot site is judged by the TTGIR op its location maps to: a helper's dot through its
    call-site location, an FMA-lowered dot (blocked layout) flagged on its own, a site a constexpr
    branch removed reported as not compiled."""
    import inspect

    from gate_dots import dot_verdicts

    src, start = inspect.getsourcelines(_kernel_with_dots.fn)
    path = inspect.getsourcefile(_kernel_with_dots.fn)
    first, helper_start = start + 4, inspect.getsourcelines(_helper_dot.fn)[1]
    call = start + len(src) - 1
    ttgir = "\n".join([
        "%1 = ttng.warp_group_dot %a, %b, %c : tensor<16x16xf16, #x> -> tensor<16x16xf32, #mma> loc(#loc3)",
        "%2 = tt.dot %a, %1, %c : tensor<16x16xf16, #x> -> tensor<16x16xf32, #blocked> loc(#loc5)",
        f'#loc3 = loc("{path}":{first}:12)',
        f'#loc4 = loc("{path}":{helper_start + 2}:11)',
        '#loc5 = loc(callsite(#loc4 at #loc6))',
        f'#loc6 = loc("{path}":{call}:60)',
    ])
    assert dot_verdicts(_kernel_with_dots, ttgir, ptx_tensor_cores=True) == {
        "_kernel_with_dots+4": "tc", "_kernel_with_dots+6": "not compiled", "_helper_dot+2": "fma"}
    # the PTX without a tensor-core instruction: no dot is on tensor cores, whatever the TTGIR says
    without = dot_verdicts(_kernel_with_dots, ttgir, ptx_tensor_cores=False)
    assert set(without.values()) == {"fma", "not compiled"}


def _compiled(kernel, target, regs, smem, fits=True, dots=None):
    """A row as the gate records one compile."""
    return dict(kernel=kernel, target=target, regs=regs, spills=0, smem=smem, fits=fits, dot=dots is not None,
                dots=dots or {})


def test_published_summary_replaces_one_triton_version_and_names_a_difference(tmp_path):
    """The gate's summary: per (kernel, target) the compiles, those kept on the card and the worst
    kept figures; --results replaces the installed version's rows in place and keeps the other
    version's; a changed figure, a missing row or no row of the version is stale, by one line that
    names the command regenerating the rows."""
    rows = [_compiled("_fwd", "sm_90", 200, 1000, dots={"_fwd+3": "tc"}),
            _compiled("_fwd", "sm_90", 255, 300_000, fits=False, dots={"_fwd+3": "tc"}),
            _compiled("_fwd", "sm_80", 90, 500, dots={"_fwd+3": "fma"}),
            _compiled("_merge", "sm_90", 40, 64)]
    summary = gate_report.summary(rows, dict(launches=7, compiles=4))
    common = dict(launches=7, distinct_compiles=4, max_spill_bytes=0)
    assert summary == [
        dict(common, kernel="_fwd", target="sm_90", compiles=2, kept=1, max_registers=200,
             max_smem_bytes=1000, card_limit_bytes=232_448, tensor_cores="all"),
        dict(common, kernel="_fwd", target="sm_80", compiles=1, kept=1, max_registers=90, max_smem_bytes=500,
             card_limit_bytes=166_912, tensor_cores="NOT ALL"),
        dict(common, kernel="_merge", target="sm_90", compiles=1, kept=1, max_registers=40, max_smem_bytes=64,
             card_limit_bytes=232_448, tensor_cores="-")]
    path = tmp_path / "compile_gate.jsonl"
    old = [{"triton": v, "date": "2026-01-01", "kernel": k, "target": "sm_90"}
           for v, k in (("3.8.0", "_a"), ("3.8.0", "_b"), ("3.6.0", "_a"))]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    gate_report.write_results(path, summary, {"triton": "3.8.0", "date": "2026-02-02", "git_sha": "abc"})
    written = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["triton"], r["kernel"], r["date"]) for r in written] == [
        ("3.8.0", "_fwd", "2026-02-02"), ("3.8.0", "_fwd", "2026-02-02"), ("3.8.0", "_merge", "2026-02-02"),
        ("3.6.0", "_a", "2026-01-01")]
    assert gate_report.published_difference(summary, "3.8.0", path) == ""  # dates and SHAs aside
    changed = [dict(summary[0], max_registers=201)] + summary[1:]
    for run, version, words in ((changed, "3.8.0", "_fwd sm_90 in max_registers"),
                                (summary[:2], "3.8.0", "_merge sm_90 published but not compiled"),
                                (summary, "3.9.0", "no rows for triton 3.9.0")):
        stale = gate_report.published_difference(run, version, path)
        assert words in stale and "--results benchmarks/results/compile_gate.jsonl" in stale, stale
        assert "\n" not in stale
