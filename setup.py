"""Build robustkern: the Python packages and, when torch is importable here, the robustkern._C extension.

    pip install --no-build-isolation -e .    # builds robustkern._C against the torch already installed
    pip install -e .                         # isolated build: no torch, so no extension; robustkern
                                             # JIT-compiles the CPU kernels on first use (robustkern/_ext.py)

What is compiled, and with which flags, is defined once in robustkern/_build_spec.py (the JIT build reads the
same file). The build needs ninja (`pip install ninja`; declared in pyproject.toml, which an isolated build
installs): ninja compiles the files in parallel and keeps the objects in build/temp.<platform>-<python>/ of the
checkout, also for pip's editable builds (which would otherwise compile in a fresh temporary folder), so a
re-install compiles only the sources (or headers) that changed. pip shows the compiler's progress, one line
per file ("[3/8 12.0s] c++ ..."), with `pip install -v`.

Environment (read at build time):
    ROBUSTKERN_WITH_CUDA=auto|0|1   build the CUDA kernels; auto (default): torch is a CUDA build and a CUDA
                                    toolkit (CUDA_HOME or nvcc on PATH) is found. The GPU itself is not needed.
    TORCH_CUDA_ARCH_LIST            GPU architectures to compile for (default "9.0": H100 / H200)
    MAX_JOBS                        parallel compile jobs (read by torch's BuildExtension / ninja; default:
                                    the number of CPUs + 2)
    DEBUG=1                         -O0 -g (nvcc: -O0 -g -lineinfo) instead of -O3 without debug information
"""
import importlib.util
import os
import sys
import sysconfig

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_spec():
    """robustkern/_build_spec.py by its path: importing the package would import torch and the whole library."""
    spec = importlib.util.spec_from_file_location("robustkern_build_spec",
                                                  os.path.join(ROOT, "robustkern", "_build_spec.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD_SPEC = _load_build_spec()


def object_dir() -> str:
    """Where the compiled objects stay between builds: setuptools' default build_temp, inside the checkout."""
    return os.path.join(ROOT, "build", f"temp.{sysconfig.get_platform()}-{sys.implementation.cache_tag}")


def _flag(name, default):
    value = os.environ.get(name, default).strip().lower()
    if value not in ("auto", "0", "1"):
        sys.exit(f"setup.py: {name} must be auto, 0 or 1, got {value!r}")
    return value


def _build_ext_class(build_extension):
    """torch's BuildExtension (ninja) with its objects kept in object_dir() and a status line per file."""

    class BuildExt(build_extension):
        def finalize_options(self):
            given = self.build_temp  # --build-temp; else the build command's, a fresh folder in pip's builds
            super().finalize_options()
            if given is None:
                self.build_temp = object_dir()

        def build_extensions(self):
            os.environ.setdefault("NINJA_STATUS", "[%f/%t %es] ")  # ninja's prefix: files done/total, seconds
            files = sum(len(e.sources) for e in self.extensions)
            print(f"robustkern: building robustkern._C from {files} source files with ninja; objects in "
                  f"{self.build_temp}, reused while their sources are unchanged", file=sys.stderr, flush=True)
            super().build_extensions()

    return BuildExt


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
    if not cpp_extension.is_ninja_available():
        sys.exit("setup.py: building robustkern._C needs ninja: pip install ninja, then run the same command again")

    mode = _flag("ROBUSTKERN_WITH_CUDA", "auto")
    torch_has_cuda = torch.version.cuda is not None
    toolkit = cpp_extension.CUDA_HOME is not None
    if mode == "1" and not (torch_has_cuda and toolkit):
        sys.exit("setup.py: ROBUSTKERN_WITH_CUDA=1 needs a CUDA build of torch (torch.version.cuda is "
                 f"{torch.version.cuda}) and a CUDA toolkit (CUDA_HOME is {cpp_extension.CUDA_HOME})")
    with_cuda = mode == "1" or (mode == "auto" and torch_has_cuda and toolkit)

    debug = os.environ.get("DEBUG", "0") == "1"
    csrc = os.path.join(ROOT, "csrc")
    sources = [os.path.relpath(p, ROOT) for p in BUILD_SPEC.sources(csrc, cuda=with_cuda)]
    extra_compile_args = {"cxx": BUILD_SPEC.cxx_flags(debug)}
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        extra_compile_args["nvcc"] = BUILD_SPEC.nvcc_flags(debug)
    extension = cpp_extension.CUDAExtension if with_cuda else cpp_extension.CppExtension
    print(f"robustkern: building robustkern._C with CUDA kernels: {'yes' if with_cuda else 'no'} "
          f"(torch {torch.__version__}, CUDA_HOME {cpp_extension.CUDA_HOME})", file=sys.stderr)
    ext = extension(
        name="robustkern._C",
        sources=sources,
        include_dirs=[os.path.join(csrc, BUILD_SPEC.INCLUDE_DIR)],
        define_macros=BUILD_SPEC.define_macros(with_cuda),
        extra_compile_args=extra_compile_args,
    )
    return [ext], {"build_ext": _build_ext_class(cpp_extension.BuildExtension)}


if __name__ == "__main__":  # setuptools' build backend runs this file as __main__
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
            "robustkern._csrc": BUILD_SPEC.package_data(),
        },
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )
