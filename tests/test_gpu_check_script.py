"""The GPU script's kernel cases run on the CPU under the interpreter: the script a GPU session
runs once must not fail on its own logic."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastssl.ops.backend import HAS_TRITON

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton")
def test_kernel_cases_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-m", "fastssl.bench.kernel_cases", "--device", "cpu"],
                         capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    done = [line.split(":")[0] for line in out.stdout.splitlines() if line.endswith(": ok")]
    assert done == ["info_nce_queue", "info_nce_in_batch", "dino_loss", "ibot_patch_loss", "multilabel",
                    "mae", "siglip", "queue_push"]


def test_gpu_check_script_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_check.sh")]).returncode == 0
