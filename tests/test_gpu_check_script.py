"""The GPU script (benchmarks/gpu_check.sh) checked on the CPU: a 15-minute loan runs it once, so
it must not fail on its own logic. Its dry run walks every step, runs each step's Python entry in
its dry form and checks the steps' time limits; the kernel cases run under the interpreter."""

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from fastssl.ops.backend import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
# in the order of value the script must keep
STEPS = ["env", "build", "gpu-tests", "kernel-tests", "sync-debug", "bench-info_nce", "bench-dino",
         "bench-contrastive", "bench-mae", "bench-queue", "bench-train", "memcheck", "ncu"]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_cases_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "fastssl.bench.kernel_cases", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    done = [line.split(":")[0] for line in out.stdout.splitlines() if line.endswith(": ok")]
    assert done == ["info_nce_queue", "info_nce_in_batch", "dino_loss", "ibot_patch_loss", "ibot_targets",
                    "multilabel", "mae", "siglip", "clip", "queue_push", "bank_update"]


def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0


def test_dry_run_walks_every_step_within_the_budget(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    out = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path)], capture_output=True, text=True,
                         env=env, timeout=900, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    status = [line for line in out.stdout.splitlines() if " dry-run rc=" in line]
    assert [line.split()[0] for line in status] == STEPS
    assert all(" rc=0 " in line for line in status), status
    total, limit = map(int, re.search(r"add up to (\d+)s of (\d+)s \(ok\)", out.stdout).groups())
    assert total <= limit < 600  # one device call runs at most 10 minutes
    # what a device call brings back: at most 8 files, here 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.tar.gz", "log.txt", "summary.md"]
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        assert {"./summary.md", "./log.txt", "./status.txt"} <= set(tar.getnames())


def test_gpu_test_paths_hold_every_gpu_test():
    paths = re.search(r'^GPU_TESTS="([^"]+)"', SCRIPT.read_text(), re.M).group(1).split()
    marked = {p.relative_to(ROOT).as_posix() for p in (ROOT / "tests").rglob("test_*.py")
              if re.search(r"^@pytest\.mark\.gpu$", p.read_text(), re.M)}
    assert marked, "no @pytest.mark.gpu test found"
    missed = [f for f in marked if not any(f == p or f.startswith(p + "/") for p in paths)]
    assert not missed, f"gpu_check.sh's GPU_TESTS misses {missed}"


def test_dry_steps_fail_a_step_that_selects_nothing_or_refuses_its_arguments(tmp_path):
    """The one-interpreter runner of the dry forms: rc 5 for a pytest selection that collects
    nothing, the module's own exit code for arguments it refuses, and the next step still runs."""
    py = sys.executable
    steps = [("none", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu and not gpu",
                       "tests/test_layers.py", "--collect-only"]),
             ("bad", [py, "-m", "fastssl.bench.kernel_cases", "--size", "huge", "--dry-run"]),
             ("good", [py, "-m", "fastssl.bench.kernel_cases", "--size", "small", "--dry-run"])]
    record = b"".join(f"{name}\0{len(cmd)}\0".encode() + b"".join(a.encode() + b"\0" for a in cmd)
                      for name, cmd in steps)
    (tmp_path / "steps").write_bytes(record)
    out = subprocess.run([py, "-m", "fastssl.bench.dry_steps", str(tmp_path / "steps")], capture_output=True,
                         text=True, timeout=300, cwd=ROOT)
    rcs = {line.split()[0]: line.split()[2] for line in out.stdout.splitlines()}
    assert rcs == {"none": "rc=5", "bad": "rc=2", "good": "rc=0"}, out.stdout + out.stderr[-2000:]
    assert out.returncode == 1
