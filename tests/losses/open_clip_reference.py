"""open_clip's loss module (the `open-clip-torch` dev dependency), the oracle of the drop-in
ClipLoss / SigLipLoss tests. Its loss.py imports only torch: it is loaded by itself, without the
package's __init__ (models, tokenizers, hub clients)."""

import importlib.util
from pathlib import Path

import pytest
import torch


def open_clip_loss():
    """The open_clip.loss module, or a skip when open-clip-torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open-clip-torch is not installed (pip install -e '.[dev]')")
    path = Path(spec.submodule_search_locations[0]) / "loss.py"
    module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def assert_same_output_dict(ours, official, *args):
    """forward(*args, output_dict=True) of both modules: the one key open_clip gives, the same loss."""
    out, want = ours(*args, output_dict=True), official(*args, output_dict=True)
    assert out.keys() == want.keys() == {"contrastive_loss"}
    torch.testing.assert_close(out["contrastive_loss"], want["contrastive_loss"], rtol=1e-12, atol=1e-12)
