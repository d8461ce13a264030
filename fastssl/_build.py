"""How fastssl._C is built: source lists and compiler flags shared by setup.py (which
loads this file by path, before fastssl is importable) and the JIT fallback in _ext.py.

CUDA sources are compiled whenever torch is a CUDA build and nvcc is found, GPU or
not. Which architectures: TORCH_CUDA_ARCH_LIST when the user sets it; else the visible GPUs'
(torch's own choice); else, with no GPU to detect, PORTABLE_CUDA_ARCHS (those the installed
nvcc can target) plus PTX of the newest, which later cards JIT-compile. The list is compiled
into the library (torch.ops.fastssl.cuda_images) so KeyQueue and MemoryBank can tell, before launching,
whether a device can run the kernels. Two gaps of a minimal CUDA toolkit are filled from the
pip-installed CUDA runtime (site-packages/nvidia/cu<major>): headers such as cusparse.h that
ATen's CUDA headers include, and an unversioned libcudart.so for torch's `-lcudart`.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"

# No -std: torch's extension builder picks the standard its headers need (C++20 since 2.10).
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = ["-O3", "-lineinfo"]
# With no GPU to detect: A100 (8.0), A10/A40/RTX 30xx (8.6), L40S/L4/RTX 40xx (8.9),
# H100/H200 (9.0), B200 (10.0). SASS of 8.0 also runs on 8.7; PTX of the newest covers the rest.
PORTABLE_CUDA_ARCHS = ("8.0", "8.6", "8.9", "9.0", "10.0")


def sources(with_cuda: bool, relative_to: Path | None = None) -> list[str]:
    """C++ sources (csrc/*.cpp, csrc/cpu/*.cpp), plus csrc/cuda/*.{cu,cpp} when with_cuda.
    Paths are relative to `relative_to` when given (setup.py wants repo-relative paths)."""
    files = sorted(CSRC.glob("*.cpp")) + sorted((CSRC / "cpu").glob("*.cpp"))
    if with_cuda:
        files += sorted((CSRC / "cuda").glob("*.cu")) + sorted((CSRC / "cuda").glob("*.cpp"))
    return [str(f.relative_to(relative_to) if relative_to else f) for f in files]


def nvcc() -> str | None:
    """Path of the nvcc torch's extension builder would use (CUDA_HOME/bin/nvcc), or None."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return None
    path = Path(CUDA_HOME) / "bin" / "nvcc"
    return str(path) if path.exists() else None


def cuda_build_status() -> tuple[bool, str]:
    """(whether to compile the CUDA sources, why) for the torch and toolkit found."""
    import torch

    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if nvcc() is None:
        return False, "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    return True, f"torch CUDA {torch.version.cuda}, nvcc at {nvcc()}"


def nvcc_archs() -> list[str]:
    """Real architectures the installed nvcc can target, as "X.Y" (from `nvcc --list-gpu-code`)."""
    try:
        out = subprocess.run([nvcc(), "--list-gpu-code"], capture_output=True, text=True, timeout=60,
                             check=True).stdout
    except (OSError, subprocess.SubprocessError, TypeError):
        return []
    return [f"{int(m[:-1])}.{m[-1]}" for m in re.findall(r"^sm_(\d+)$", out, flags=re.MULTILINE)]


def portable_arch_list(supported: list[str]) -> str:
    """TORCH_CUDA_ARCH_LIST for no GPU: PORTABLE_CUDA_ARCHS that `supported` has, PTX of the last."""
    archs = [a for a in PORTABLE_CUDA_ARCHS if a in supported]
    if not archs:
        raise RuntimeError(f"nvcc supports none of {', '.join(PORTABLE_CUDA_ARCHS)} (it lists "
                           f"{', '.join(supported) or 'nothing'}); set TORCH_CUDA_ARCH_LIST")
    return ";".join(archs) + "+PTX"


def set_default_arch_list() -> str:
    """Leave a user's TORCH_CUDA_ARCH_LIST and a visible GPU (torch detects it) alone; with no
    GPU set the portable list. Returns where the architectures come from, for the build log."""
    import torch

    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (set by the user)"
    if torch.cuda.is_available():
        return "the visible GPUs' architectures"
    os.environ["TORCH_CUDA_ARCH_LIST"] = portable_arch_list(nvcc_archs())
    return f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']} (no GPU visible: portable default)"


def cuda_images() -> list[str]:
    """The images nvcc will embed, named as cuobjdump names them ("sm_80", "compute_100"), from
    the -gencode flags torch's extension builder derives (call after set_default_arch_list)."""
    from torch.utils.cpp_extension import _get_cuda_arch_flags

    return [m for flag in _get_cuda_arch_flags() for m in re.findall(r"code=((?:sm|compute)_\w+)", flag)]


def image_define(images: list[str]) -> str:
    """The C++ define that compiles `images` into the library (read by torch.ops.fastssl.cuda_images)."""
    return f"-DFASTSSL_CUDA_IMAGES={','.join(images)}"


def _pip_cuda_dir() -> Path | None:
    import torch

    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations or torch.version.cuda is None:
        return None
    major = torch.version.cuda.split(".")[0]
    for location in spec.submodule_search_locations:
        candidate = Path(location) / f"cu{major}"
        if candidate.is_dir():
            return candidate
    return None


def _nvcc_include_dirs() -> list[str]:
    """The include dirs nvcc itself uses (from `nvcc --dryrun`): where CUDA_HOME is guessed
    from a wrapper script (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local), the host compiler
    would not otherwise see the toolkit's cuda_runtime.h."""
    try:
        out = subprocess.run(
            [nvcc(), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
            capture_output=True, text=True, timeout=60, check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    match = re.search(r'^#\$ INCLUDES="(.*)"', out.stderr + out.stdout, flags=re.MULTILINE)
    if not match:
        return []
    return [os.path.normpath(d) for d in re.findall(r"-I(\S+)", match.group(1).replace('"', ""))]


def cuda_extra_dirs(scratch: Path) -> tuple[list[str], list[str]]:
    """(include dirs, library dirs) to add so the CUDA sources compile and link against a
    minimal toolkit. The libcudart.so symlink is created under `scratch` (a build folder)."""
    from torch.utils.cpp_extension import CUDA_HOME

    home = Path(CUDA_HOME) if CUDA_HOME else None
    includes, libs = [], []
    if home is None or not (home / "include" / "cuda_runtime.h").exists():
        includes += _nvcc_include_dirs()
    pip = _pip_cuda_dir()
    if pip is None:
        return includes, libs
    toolkit_dirs = [*includes, *([str(home / "include")] if home else [])]
    toolkit_has_cusparse = any((Path(d) / "cusparse.h").exists() for d in toolkit_dirs)
    if not toolkit_has_cusparse and (pip / "include" / "cusparse.h").exists():
        includes.append(str(pip / "include"))
    has_cudart = home is not None and any((home / d / "libcudart.so").exists() for d in ("lib64", "lib"))
    versioned = sorted((pip / "lib").glob("libcudart.so.*"))
    if not has_cudart and versioned:
        lib_dir = scratch / "cudart"
        lib_dir.mkdir(parents=True, exist_ok=True)
        link = lib_dir / "libcudart.so"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(versioned[0])
        libs.append(str(lib_dir))
    return includes, libs


def missing_tools(with_cuda: bool) -> list[str]:
    """What a build needs and this machine lacks: the C++ compiler, ninja, nvcc."""
    from torch.utils.cpp_extension import is_ninja_available

    missing = []
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        missing.append(f"a C++ compiler ({cxx!r} not on PATH; install g++ or set CXX)")
    if not is_ninja_available():
        missing.append("ninja (pip install ninja)")
    if with_cuda and nvcc() is None:
        missing.append("nvcc (install the CUDA toolkit or set CUDA_HOME)")
    return missing
