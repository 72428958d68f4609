"""What the compiled extension ``robustkern._C`` is built from, defined once: its sources, headers, include
folder, macros and compiler flags. ``setup.py`` (the ahead-of-time build; it loads this file by its path) and
``robustkern/_ext.py`` (the JIT build on first use, CPU kernels only) both read it, so the two builds compile the
same sources with the same flags; ``CMakeLists.txt`` globs the same folders (``tests/test_build.py`` checks all
three).

Plain Python without torch or robustkern imports: setup.py reads it where neither is importable.
"""
from __future__ import annotations

from pathlib import Path

# Source globs, relative to csrc/: the op schemas (ops.cpp), the device-independent drivers (interval.cpp) and
# the CPU kernels; CUDA builds add the kernels (.cu, free of torch headers) and their torch glue (.cpp).
CPU_SOURCES = ("*.cpp", "cpu/*.cpp")
CUDA_SOURCES = ("cuda/*.cu", "cuda/*.cpp")
HEADERS = ("include/robustkern/*.h", "cuda/*.h")
INCLUDE_DIR = "include"

# -O3: the kernels' loops are written for GCC's vectoriser. -fopenmp-simd: honour "#pragma omp simd"
# (vectorised reductions) without the OpenMP runtime. -g0: Python's own CFLAGS carry -g, and the debug
# information of ATen's templates more than doubles the compile time (benchmarks/bench_build.py).
CXX_FLAGS = ("-O3", "-g0", "-fopenmp-simd")
CXX_FLAGS_DEBUG = ("-O0", "-g", "-fopenmp-simd")
NVCC_FLAGS = ("-O3",)
NVCC_FLAGS_DEBUG = ("-O0", "-g", "-lineinfo")

# Only the method operators of at::Tensor come with ATen/core/Tensor.h; a free function (at::empty, at::mm)
# needs its own <ATen/ops/NAME.h>. Including all of ATen (<ATen/ATen.h>, <torch/extension.h>) is then a compile
# error, which keeps each translation unit to the headers it uses (a large part of the compile time).
MACROS = (("TORCH_ASSERT_ONLY_METHOD_OPERATORS", "1"),)


def _glob(csrc: Path, patterns) -> list[Path]:
    return [p for pattern in patterns for p in sorted(Path(csrc).glob(pattern))]


def sources(csrc: Path, cuda: bool) -> list[Path]:
    """The translation units under ``csrc``: the CPU build's, plus the CUDA ones when ``cuda``."""
    return _glob(csrc, CPU_SOURCES + (CUDA_SOURCES if cuda else ()))


def headers(csrc: Path) -> list[Path]:
    """The headers under ``csrc``: a change to one rebuilds the extension."""
    return _glob(csrc, HEADERS)


def package_data() -> list[str]:
    """Every source and header glob, for shipping csrc/ inside the package (the JIT build's sources)."""
    return list(CPU_SOURCES + CUDA_SOURCES + HEADERS)


def define_macros(cuda: bool) -> list[tuple[str, str]]:
    """Preprocessor macros as (name, value); ROBUSTKERN_WITH_CUDA tells ops.cpp's build_info what is compiled in."""
    return [*MACROS, ("ROBUSTKERN_WITH_CUDA", "1" if cuda else "0")]


def cxx_flags(debug: bool = False) -> list[str]:
    """Host compiler flags (g++/clang++), without the macros."""
    return list(CXX_FLAGS_DEBUG if debug else CXX_FLAGS)


def nvcc_flags(debug: bool = False) -> list[str]:
    """nvcc flags for the .cu files, without the macros."""
    return list(NVCC_FLAGS_DEBUG if debug else NVCC_FLAGS)


def jit_cflags() -> list[str]:
    """The JIT build's flags (CPU kernels, release): the host flags followed by the macros as -D options."""
    return cxx_flags() + [f"-D{name}={value}" for name, value in define_macros(cuda=False)]
