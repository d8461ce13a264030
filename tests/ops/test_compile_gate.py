"""The compile gate (tests/ops/compile_gate.py) for each target card, in its own process: the
test session runs Triton under the interpreter, the gate needs the real compiler. One case per
target so that pytest-xdist spreads them over its workers; compiles are cached beside Triton's
cache, so only the first run on a machine pays for them."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GATE = Path(__file__).with_name("compile_gate.py")
ROOT = GATE.parents[2]

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed: no kernel to compile")
@pytest.mark.skipif(torch.version.cuda is None, reason="a CPU-only torch build cannot make fake CUDA tensors")
@pytest.mark.parametrize("cap", [80, 89, 90, 100], ids=lambda c: f"sm_{c}")
def test_compile_gate(cap, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, str(GATE), "--targets", str(cap), "--json", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    report = proc.stdout[-20000:] + proc.stderr[-5000:]
    assert proc.returncode == 0, report
    result = json.loads(out.read_text())
    print(report)
    if result["skipped"]:
        pytest.skip(result["skipped"][0])
    assert result["rows"], report
    kept = [r for r in result["rows"] if r["fits"]]
    assert all(r["ok"] for r in result["rows"]) and not any(r["spills"] for r in kept), report
