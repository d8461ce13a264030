"""The C++/CUDA extension behind KeyQueue and the memory bank: the JIT-fallback errors, which
device runs the kernel (the CUDA images' compatibility rules) and the fallback where none fits,
the images the built extension carries (cuobjdump), and the architecture list it is built for."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

import fastssl.queue
from fastssl import _build, _ext
from fastssl.queue import has_kernel_image


def test_jit_fallback_names_what_is_missing(monkeypatch):
    # The prebuilt module "fails to import" and neither ninja nor a compiler is there:
    # the error must say so (never a bare ImportError) and point at the fix.
    monkeypatch.setitem(sys.modules, "fastssl._C", None)
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "is_ninja_available", lambda: False)
    monkeypatch.setenv("CXX", "no-such-compiler-fastssl")
    monkeypatch.setattr(_build, "nvcc", lambda: None)
    with pytest.raises(_ext.ExtensionError) as info:
        _ext.load()
    message = str(info.value)
    assert not isinstance(info.value, ImportError)
    for word in ("fastssl._C", "ninja", "no-such-compiler-fastssl", "C++ compiler", "nvcc", "pip install"):
        assert word in message, word


def test_jit_fallback_names_missing_sources(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fastssl._C", None)
    monkeypatch.setattr(_ext, "_loaded", None)
    monkeypatch.setattr(_build, "CSRC", tmp_path / "csrc")
    with pytest.raises(_ext.ExtensionError, match="sources"):
        _ext.load()


# CUDA's rules: SASS runs within its major version on equal or higher minor (the "a" variants on
# their exact capability only); PTX is JIT-compiled for its capability and anything newer.
PORTABLE_IMAGES = ["sm_80", "sm_86", "sm_89", "sm_90", "sm_100", "compute_100"]


@pytest.mark.parametrize("capability,images,runs", [
    ((8, 0), PORTABLE_IMAGES, True),       # A100
    ((8, 6), PORTABLE_IMAGES, True),       # A10, RTX 3090
    ((8, 7), PORTABLE_IMAGES, True),       # Jetson Orin: sm_86 SASS
    ((8, 9), PORTABLE_IMAGES, True),       # L40S, RTX 4090
    ((9, 0), PORTABLE_IMAGES, True),       # H100
    ((10, 0), PORTABLE_IMAGES, True),      # B200
    ((12, 0), PORTABLE_IMAGES, True),      # RTX 5090: PTX of 10.0, JIT-compiled
    ((7, 5), PORTABLE_IMAGES, False),      # T4: older than every image
    ((8, 0), ["sm_90"], False),            # the old Hopper-only build on an A100
    ((8, 9), ["sm_90"], False),
    ((10, 0), ["sm_90"], False),           # SASS does not cross a major version
    ((8, 9), ["sm_80"], True),
    ((8, 6), ["sm_89"], False),            # nor run on a lower minor
    ((9, 0), ["sm_90a"], True),
    ((10, 0), ["sm_90a", "compute_90a"], False),  # arch-specific: exactly 9.0
    ((10, 0), ["compute_90"], True),
    ((12, 0), ["compute_100f"], False),    # family PTX: major 10 only
    ((10, 3), ["compute_100f"], True),
    ((9, 0), [], False),                   # a CPU-only build
])
def test_kernel_image_decision(capability, images, runs):
    assert has_kernel_image(capability, images) is runs


def test_kernel_image_decision_rejects_bad_names():
    with pytest.raises(ValueError, match="images"):
        has_kernel_image((9, 0), ["sm90"])


def test_device_without_image_warns_once_and_takes_the_torch_path(monkeypatch):
    monkeypatch.setattr(fastssl.queue, "_KERNEL_RUNS_ON", {})
    monkeypatch.setattr(fastssl.queue, "extension_cuda_images", lambda: ("sm_90",))
    capabilities = {0: (8, 0), 1: (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: capabilities[torch.device(d).index])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = fastssl.queue.kernel_runs_on(torch.device("cuda", 0))
        second = fastssl.queue.kernel_runs_on(torch.device("cuda", 0))
        hopper = fastssl.queue.kernel_runs_on(torch.device("cuda", 1))
        cpu = fastssl.queue.kernel_runs_on(torch.device("cpu"))
    assert (first, second, hopper, cpu) == (False, False, True, True)
    assert len(caught) == 1 and issubclass(caught[0].category, RuntimeWarning)
    for word in ("sm_80", "sm_90", "queue_push_ref", "TORCH_CUDA_ARCH_LIST"):
        assert word in str(caught[0].message), word


def _cuobjdump() -> str | None:
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(bundled) if bundled.exists() else shutil.which("cuobjdump")


def built_extension() -> tuple[list[str], object, str]:
    """(the CUDA images the built extension reports, its library module, a cuobjdump), or a skip
    saying which of them this machine lacks."""
    _ext.load()
    reported = fastssl.queue.extension_cuda_images()
    if not reported:
        pytest.skip(f"the extension was built CPU-only ({_ext.load()})")
    library = sys.modules.get("fastssl._C")
    if library is None:
        pytest.skip(f"the extension was JIT-built ({_ext.load()})")
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (neither Triton's bundled one nor on PATH)")
    return reported, library, tool


def test_extension_carries_the_images_it_reports():
    reported, library, tool = built_extension()

    def listed(flag: str) -> set[str]:
        out = subprocess.run([tool, flag, library.__file__], capture_output=True, text=True, check=False)
        # "ELF file    1: queue_push.sm_90.cubin", "PTX file    1: queue_push.sm_100.ptx"
        lines = out.stdout.splitlines()
        return {line.rsplit(".", 2)[-2] for line in lines if line.endswith((".cubin", ".ptx"))}

    sass, ptx = listed("--list-elf"), listed("--list-ptx")
    assert {i for i in reported if i.startswith("sm_")} == sass
    assert {i.replace("compute_", "sm_") for i in reported if i.startswith("compute_")} == ptx
    assert ptx, "no PTX: cards newer than the newest image could not run the kernel"
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        # Built as `make test` builds it (no GPU, no user list): every portable arch nvcc has.
        have = _build.nvcc_archs()
        portable = {f"sm_{a.replace('.', '')}" for a in _build.PORTABLE_CUDA_ARCHS if a in have}
        assert portable <= sass, f"missing {sorted(portable - sass)}"
        assert max(portable, key=lambda s: int(s[3:])) in ptx


def test_portable_arch_list():
    nvcc_13 = ["7.5", "8.0", "8.6", "8.7", "8.8", "8.9", "9.0", "10.0", "11.0", "10.3", "12.0", "12.1"]
    assert _build.portable_arch_list(nvcc_13) == "8.0;8.6;8.9;9.0;10.0+PTX"
    nvcc_11_8 = ["3.5", "5.0", "6.0", "7.0", "7.5", "8.0", "8.6", "8.7", "8.9", "9.0"]
    assert _build.portable_arch_list(nvcc_11_8) == "8.0;8.6;8.9;9.0+PTX"
    with pytest.raises(RuntimeError, match="TORCH_CUDA_ARCH_LIST"):
        _build.portable_arch_list(["5.0", "7.0"])
    if _build.nvcc() is not None:
        assert set(_build.nvcc_archs()) >= {"8.0", "9.0"}


def test_arch_list_choice(monkeypatch):
    monkeypatch.setattr(_build, "nvcc_archs", lambda: ["8.0", "8.6", "8.9", "9.0", "10.0", "12.0"])
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.9")
    assert "set by the user" in _build.set_default_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.9"
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "visible GPU" in _build.set_default_arch_list()
    assert "TORCH_CUDA_ARCH_LIST" not in os.environ  # torch's builder then targets the visible GPUs
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "portable" in _build.set_default_arch_list()
    assert os.environ["TORCH_CUDA_ARCH_LIST"] == "8.0;8.6;8.9;9.0;10.0+PTX"
    if _build.nvcc() is not None:
        images = _build.cuda_images()
        assert sorted(images) == ["compute_100", "sm_100", "sm_80", "sm_86", "sm_89", "sm_90"]
        assert _build.image_define(images).startswith("-DFASTSSL_CUDA_IMAGES=")
