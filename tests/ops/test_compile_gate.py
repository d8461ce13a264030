"""The compile gate (tests/ops/compile_gate.py): every Triton kernel compiled for sm_80, sm_89,
sm_90 and sm_100 at the configurations its launcher picks, with no spill, within the card's
shared memory and with tensor-core instructions in its matmuls.

One gate process per target, run side by side from this one test: the test session runs Triton
under the interpreter while the gate needs the real compiler, and one test that uses the
machine's cores keeps pytest-xdist from queueing the four gates behind each other on one
worker. Compiles are cached beside Triton's cache, so only the first run on a machine pays."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

GATE = Path(__file__).with_name("compile_gate.py")
ROOT = GATE.parents[2]
TARGETS = (80, 89, 90, 100)

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
    for cap in TARGETS:  # output to files: pipes would stall a gate until its turn to be read
        with open(tmp_path / f"sm_{cap}.log", "w") as log:
            out = tmp_path / f"sm_{cap}.json"
            cmd = [sys.executable, str(GATE), "--targets", str(cap), "--json", str(out)]
            procs[cap] = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    reports, results = [], {}
    for cap, proc in procs.items():
        code = proc.wait(timeout=1800)
        log = (tmp_path / f"sm_{cap}.log").read_text()
        table = "\n".join(ln for ln in log.splitlines() if ln[:1] != "[")  # without the progress lines
        reports.append(f"--- sm_{cap}: exit {code}\n{table}")
        if code in (0, 1):
            results[cap] = json.loads((tmp_path / f"sm_{cap}.json").read_text())
    text = "\n".join(reports)
    print(text)  # the tables: shown with pytest -s, or on failure
    assert sorted(results) == list(TARGETS), text
    ran = {cap: r for cap, r in results.items() if not r["skipped"]}
    assert {80, 89, 90} <= set(ran), text  # sm_100 only where the installed Triton targets it
    for cap, r in ran.items():
        assert r["rows"] and not r["failures"], f"sm_{cap}: " + "\n".join(r["failures"])
        assert not any(row["spills"] for row in r["rows"] if row["fits"]), text
