"""Builds the C++/CUDA extension fastssl._C (see csrc/) with torch.utils.cpp_extension.

Install with `pip install --no-build-isolation -e .` so it compiles against the torch
already installed. CUDA sources are built whenever torch has CUDA and nvcc is present,
even without a GPU: TORCH_CUDA_ARCH_LIST then defaults to sm_80, 86, 89, 90 and 100 plus
PTX (see fastssl/_build.py)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = Path(__file__).resolve().parent
# fastssl/_build.py by path: importing the fastssl package needs it installed first.
_spec = importlib.util.spec_from_file_location("fastssl_build", ROOT / "fastssl" / "_build.py")
build = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build)

WITH_CUDA, WHY = build.cuda_build_status()
print(f"fastssl._C: {'CPU + CUDA' if WITH_CUDA else 'CPU only'} ({WHY})")
CXX_FLAGS = list(build.CXX_FLAGS)
if WITH_CUDA:
    print(f"fastssl._C: CUDA architectures from {build.set_default_arch_list()}")
    CXX_FLAGS.append(build.image_define(build.cuda_images()))


class BuildFastssl(BuildExtension):
    """Adds the CUDA include/library fixes; the libcudart.so link goes in the build temp dir."""

    def build_extensions(self):
        if WITH_CUDA:
            includes, libs = build.cuda_extra_dirs(Path(self.build_temp).resolve())
            for ext in self.extensions:
                ext.include_dirs += includes
                ext.library_dirs += libs
        super().build_extensions()


Extension = CUDAExtension if WITH_CUDA else CppExtension
setup(
    ext_modules=[
        Extension(
            "fastssl._C",
            sources=build.sources(WITH_CUDA, relative_to=ROOT),
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": build.NVCC_FLAGS} if WITH_CUDA else CXX_FLAGS,
        )
    ],
    cmdclass={"build_ext": BuildFastssl.with_options(use_ninja=True)},
)
