"""Two "nodes" without a scheduler: two torchrun processes on this machine (--nnodes 2
--nproc-per-node 1, c10d rendezvous on 127.0.0.1), each starting one rank, train a tiny DINO
exactly as one process does on the same global batch: the mean of the ranks' losses and the
parameters after two steps."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two torchrun agents and two ranks importing torch and timm on two cores
def test_two_torchrun_nodes_equal_one_process(tmp_path):
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                        "OMP_NUM_THREADS": "1"}
    script = str(HERE / "torchrun_tiny.py")
    one = subprocess.run([sys.executable, script, str(tmp_path / "one")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    port = _free_port()
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "fastssl-test",
                               script, str(tmp_path / "two")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    logs = [node.communicate(timeout=600)[0] for node in nodes]
    assert all(node.returncode == 0 for node in nodes), "\n".join(log[-2000:] for log in logs)
    single = torch.load(tmp_path / "one" / "rank0.pt", weights_only=False)
    ranks = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert [(r["world"], r["local_world"]) for r in ranks] == [(2, 1), (2, 1)]  # one rank per node
    for step in range(2):
        mean = sum(r["losses"][step] for r in ranks) / 2
        assert abs(mean - single["losses"][step]) < 1e-5 * max(1.0, abs(single["losses"][step])), step
    for key, value in single["state"].items():
        for r in ranks:
            torch.testing.assert_close(r["state"][key], value, rtol=1e-5, atol=1e-6, msg=key)
