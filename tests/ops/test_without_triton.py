"""Where triton is not installed (macOS, Windows), fastssl imports, every op runs its PyTorch
reference under backend="auto", and backend="triton" is refused with a message naming triton."""

import os
import subprocess
import sys

WITHOUT_TRITON = r"""
import sys

sys.modules["triton"] = sys.modules["triton.language"] = None  # import triton -> ImportError
import torch
from fastssl import ops
from fastssl.ops.backend import HAS_TRITON
assert not HAS_TRITON and sys.modules["triton"] is None

torch.manual_seed(0)
q, k, queue = torch.randn(5, 8, requires_grad=True), torch.randn(5, 8), torch.randn(7, 8)
loss = ops.info_nce(q, k, queue, temperature=0.2)
torch.testing.assert_close(loss, ops.info_nce_ref(q, k, queue, temperature=0.2))
loss.backward()
assert q.grad is not None and torch.isfinite(q.grad).all()

s, t, c = torch.randn(6, 11), torch.randn(4, 11), torch.zeros(1, 11)
torch.testing.assert_close(ops.dino_loss(s, t, c, n_crops=3, n_global_crops=2),
                           ops.dino_loss_ref(s, t, c, n_crops=3, n_global_crops=2))
x_kept, mask, ids = ops.random_masking(torch.randn(2, 8, 4), 0.5, generator=torch.Generator().manual_seed(0))
assert x_kept.shape == (2, 4, 4) and mask.sum() == 8
assert ops.unshuffle_tokens(x_kept, torch.zeros(4), ids).shape == (2, 8, 4)

for call in (lambda: ops.info_nce(q, k, backend="triton"),
             lambda: ops.dino_loss(s, t, c, n_crops=3, backend="triton"),
             lambda: ops.mae_loss(torch.randn(1, 4, 3), torch.randn(1, 4, 3), torch.ones(1, 4),
                                  backend="triton")):
    try:
        call()
    except RuntimeError as e:
        assert "triton" in str(e), e
    else:
        raise AssertionError("backend='triton' ran without triton")
print("ok")
"""


def test_ops_run_their_reference_without_triton():
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "0"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
