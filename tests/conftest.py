"""Test set-up. Without a GPU, Triton kernels run under the CPU interpreter, which
must be switched on before any fastssl module defines its kernels. Every kernel launch the
interpreter runs is recorded by its signature (tests/ops/gate_coverage.py), and the session fails
when one of them is not a configuration the compile gate compiles."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
# One folder per session, shared with pytest-xdist's workers and any pytest a test starts (they
# inherit the environment); the process that made it checks and removes it.
if "FASTSSL_TEST_LAUNCHES" not in os.environ:
    os.environ["FASTSSL_TEST_LAUNCHES"] = tempfile.mkdtemp(prefix="fastssl-launches-")
    os.environ["FASTSSL_TEST_LAUNCHES_OWNER"] = str(os.getpid())
LAUNCHES = Path(os.environ["FASTSSL_TEST_LAUNCHES"])
sys.path.insert(0, str(Path(__file__).with_name("ops")))


def _record_interpreter_launches():
    """Wrap the interpreter's launch: each new signature is appended to this process's file."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return
    from gate_coverage import signature

    run, seen = InterpretedFunction.run, set()

    def recording_run(self, *args, grid, warmup, **kwargs):
        sig = signature(self, args, kwargs)
        if sig not in seen:
            seen.add(sig)
            with open(LAUNCHES / f"{os.getpid()}.txt", "a") as f:
                f.write(sig + "\n")
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run


if os.environ.get("TRITON_INTERPRET") == "1":
    _record_interpreter_launches()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (runs in benchmarks/gpu_check.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def pytest_sessionfinish(session, exitstatus):
    """In the process that made the folder, once every worker has finished: fail on a launch the
    gate does not compile."""
    if os.environ.get("FASTSSL_TEST_LAUNCHES_OWNER") != str(os.getpid()) or not LAUNCHES.is_dir():
        return
    recorded = {line for f in LAUNCHES.glob("*.txt") for line in f.read_text().splitlines()}
    shutil.rmtree(LAUNCHES, ignore_errors=True)
    if not recorded or torch.version.cuda is None:  # a CPU-only torch cannot run the gate's capture
        return
    from gate_coverage import captured, coverage_failures

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if not captured() and os.environ.get("FASTSSL_GATE_COVERAGE") != "require":
        # a targeted run after a kernel change: capturing the gate's launches takes a minute;
        # `make test` (FASTSSL_GATE_COVERAGE=require) always checks
        if reporter is not None:
            reporter.write_line("compile-gate coverage: not checked (the gate's launches are not captured "
                                "for these sources; FASTSSL_GATE_COVERAGE=require checks anyway)")
        return
    failures = coverage_failures(recorded)
    if reporter is not None:
        reporter.write_line(f"compile-gate coverage: {len(recorded)} kernel configurations launched, "
                            f"{len(failures)} failures")
        for line in failures:
            reporter.write_line(f"  COVERAGE FAIL: {line}", red=True)
    if failures:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def device() -> torch.device:
    """The device a test's tensors live on: CUDA when present, else the CPU
    (where backend='triton' runs under the interpreter)."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def kept_bands(monkeypatch):
    """kept_bands(cap): the InfoNCE kernels' KEEP_P workspace capped at `cap` bytes (so a tiny
    problem runs in several bands) and the device fill left out of the choice (a tiny problem fills
    no GPU); returns a Counter of the KEEP_P launches (bands) per kernel name."""
    from collections import Counter

    from fastssl.ops import _info_nce_launchers, _info_nce_tiles

    bands, launch = Counter(), _info_nce_launchers._launch

    def counted(kernel, tuned, **kw):
        bands[kernel.__name__] += kw["flags"].get("KEEP_P", False)
        launch(kernel, tuned, **kw)

    def cap(nbytes: int) -> Counter:
        monkeypatch.setattr(_info_nce_tiles, "_KEEP_P_BYTES", nbytes)
        monkeypatch.setattr(_info_nce_tiles, "multiprocessor_count", lambda device: None)
        monkeypatch.setattr(_info_nce_launchers, "_launch", counted)
        return bands

    return cap


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)
