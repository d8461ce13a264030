"""Fused ops: Triton kernels with a pure-PyTorch reference (`*_ref`) each."""
from fastssl.ops.info_nce import info_nce, info_nce_ref  # noqa: F401
