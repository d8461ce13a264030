"""Fused ops: Triton kernels with a pure-PyTorch reference (`*_ref`) each."""
