"""Loads fastssl's C++/CUDA ops (torch.ops.fastssl.*, csrc/).

`load()` imports the prebuilt `fastssl._C` (built by `pip install --no-build-isolation -e .`).
If that fails it JIT-builds the same sources with torch.utils.cpp_extension.load (ninja),
with the flags of fastssl/_build.py; if the build cannot run or fails, ExtensionError says
what is missing (C++ compiler, ninja, nvcc, the sources). Which of the two was loaded is
logged and returned.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path

log = logging.getLogger(__name__)

_loaded: str | None = None


class ExtensionError(RuntimeError):
    """fastssl._C is not built and could not be JIT-built; the message says why."""


def load() -> str:
    """Make torch.ops.fastssl.* available; return how ("prebuilt fastssl._C ..." or
    "JIT build in <dir> ..."). Idempotent. Raises ExtensionError when nothing works."""
    global _loaded
    if _loaded is not None:
        return _loaded
    try:
        module = importlib.import_module("fastssl._C")
        _loaded = f"prebuilt fastssl._C ({module.__file__})"
        log.info("fastssl ops: %s", _loaded)
    except ImportError as exc:
        log.warning("fastssl._C is not importable (%s); JIT-building it (a minute or two, once)", exc)
        _loaded = _jit_build(exc)
        log.warning("fastssl ops: %s", _loaded)
    return _loaded


def _build_directory() -> Path:
    import torch

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    return root / f"fastssl_C-{tag}"


def _jit_build(import_error: ImportError) -> str:
    from torch.utils import cpp_extension

    from fastssl import _build

    why_prebuilt = f"fastssl._C could not be imported ({import_error})"
    fix = "Build it with `pip install --no-build-isolation -e .` from a source checkout."
    with_cuda, cuda_why = _build.cuda_build_status()
    sources = _build.sources(with_cuda)
    if not sources or not all(Path(s).exists() for s in sources):
        raise ExtensionError(
            f"{why_prebuilt}, and the C++ sources to JIT-build it are not under {_build.CSRC}. {fix}"
        ) from import_error
    missing = _build.missing_tools(with_cuda)
    if missing:
        raise ExtensionError(
            f"{why_prebuilt}, and the JIT build cannot run: missing {'; '.join(missing)} "
            f"(CUDA sources {'included' if with_cuda else 'skipped'}: {cuda_why}). {fix}"
        ) from import_error
    build_dir = _build_directory()
    build_dir.mkdir(parents=True, exist_ok=True)
    includes, libs, cxx_flags = [], [], list(_build.CXX_FLAGS)
    if with_cuda:
        log.warning("fastssl ops: CUDA architectures from %s", _build.set_default_arch_list())
        includes, libs = _build.cuda_extra_dirs(build_dir)
        cxx_flags.append(_build.image_define(_build.cuda_images()))
    try:
        cpp_extension.load(
            name="fastssl_C",
            sources=sources,
            extra_cflags=cxx_flags,
            extra_cuda_cflags=_build.NVCC_FLAGS,
            extra_include_paths=includes,
            extra_ldflags=[f"-L{d}" for d in libs],
            build_directory=str(build_dir),
            with_cuda=with_cuda,
            is_python_module=False,  # the .so only registers torch.ops.fastssl.*
        )
    except Exception as exc:  # compiler/linker failures arrive as RuntimeError/OSError
        detail = str(exc).strip().splitlines()
        raise ExtensionError(
            f"{why_prebuilt}, and the JIT build in {build_dir} failed "
            f"({'CPU + CUDA' if with_cuda else 'CPU only'}: {cuda_why}): "
            f"{' | '.join(detail[-5:])}. {fix}"
        ) from exc
    return f"JIT build in {build_dir} ({'CPU + CUDA' if with_cuda else 'CPU only'}: {cuda_why})"

