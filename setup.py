"""Build robustkern: the Python packages and, when torch is importable here, the robustkern._C extension.

    pip install --no-build-isolation -e .    # builds robustkern._C against the torch already installed
    pip install -e .                         # isolated build: no torch, so no extension; robustkern
                                             # JIT-compiles the CPU kernels on first use (robustkern/_ext.py)

Environment (read at build time):
    ROBUSTKERN_WITH_CUDA=auto|0|1   build the CUDA kernels; auto: torch is a CUDA build and a CUDA toolkit
                                    (CUDA_HOME or nvcc on PATH) is found. The GPU itself is not needed.
    TORCH_CUDA_ARCH_LIST            GPU architectures to compile for (default "9.0": H100 / H200)
    MAX_JOBS                        parallel compile jobs (read by torch's BuildExtension / ninja)
    DEBUG=1                         -O0 -g (nvcc: -O0 -g -lineinfo) instead of -O3
"""
import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def extension_modules():
    """(ext_modules, cmdclass): robustkern._C when torch imports, nothing otherwise."""
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print("robustkern: torch is not importable in the build environment (an isolated build?), so "
              "robustkern._C is not built; the CPU kernels are JIT-compiled on first use. To prebuild: "
              "pip install --no-build-isolation -e .", file=sys.stderr)
        return [], {}

    mode = _flag("ROBUSTKERN_WITH_CUDA", "auto")
    torch_has_cuda = torch.version.cuda is not None
    toolkit = cpp_extension.CUDA_HOME is not None
    if mode == "1" and not (torch_has_cuda and toolkit):
        sys.exit("setup.py: ROBUSTKERN_WITH_CUDA=1 needs a CUDA build of torch (torch.version.cuda is "
                 f"{torch.version.cuda}) and a CUDA toolkit (CUDA_HOME is {cpp_extension.CUDA_HOME})")
    with_cuda = mode == "1" or (mode == "auto" and torch_has_cuda and toolkit)

    debug = os.environ.get("DEBUG", "0") == "1"
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp-simd: honour "#pragma omp simd" (vectorised reductions) without the OpenMP runtime
    extra_compile_args = {"cxx": ["-O0", "-g", "-fopenmp-simd"] if debug else ["-O3", "-fopenmp-simd"]}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        extra_compile_args["nvcc"] = ["-O0", "-g", "-lineinfo"] if debug else ["-O3"]
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    print(f"robustkern: building robustkern._C with CUDA kernels: {'yes' if with_cuda else 'no'} "
          f"(torch {torch.__version__}, CUDA_HOME {cpp_extension.CUDA_HOME})", file=sys.stderr)
    ext = extension(
        name="robustkern._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc", "include")],
        define_macros=[("ROBUSTKERN_WITH_CUDA", "1" if with_cuda else "0")],
        extra_compile_args=extra_compile_args,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = extension_modules()

setup(
    packages=(
        find_packages(include=["robustkern", "robustkern.*"])
        + ["robustkern_cli"]
        + ["robustkern_cli." + p for p in find_packages("python/robustkern_cli")]
        + ["robustkern_cli.configs", "robustkern._csrc"]
    ),
    package_dir={
        "robustkern_cli": "python/robustkern_cli",
        # Data directories served as packages, so installed copies find them with importlib.resources:
        "robustkern_cli.configs": "python/configs",  # experiment recipes (JSON)
        "robustkern._csrc": "csrc",  # C++ sources for the JIT fallback (robustkern/_ext.py)
    },
    package_data={
        "robustkern_cli.configs": ["*.json"],
        "robustkern._csrc": ["*.cpp", "cpu/*.cpp", "cuda/*.cu", "cuda/*.cpp", "cuda/*.h", "include/robustkern/*.h"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
