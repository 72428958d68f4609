"""Loads the compiled kernels (the C++ kernels of the ``torch.ops.robustkern`` ops) on first use:

1. ``prebuilt``: the ``robustkern._C`` library built by ``pip install --no-build-isolation -e .``;
2. ``jit``: else the CPU sources in ``csrc/`` compiled with ``torch.utils.cpp_extension.load`` (about a
   minute on 2 cores, once; cached under ``~/.cache/robustkern``). ``ROBUSTKERN_JIT=0`` turns this off;
3. absent: else one warning saying why and how to fix it; callers then run the PyTorch reference.

Nothing happens at import time; ``load()`` does the work once per process and caches the outcome.
"""
from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import warnings
from pathlib import Path

__all__ = ["load", "available", "has_cuda_kernels", "status"]

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_outcome: tuple[str, str] | None = None  # (how, detail): how in {"prebuilt", "jit", "absent"}

_BUILD = "build it with `pip install --no-build-isolation -e .` in the robustkern checkout (needs a C++ compiler)"


def _advice() -> str:
    """How to get the compiled kernels, for the reason they are absent: the JIT build is on by default, so
    only a user who switched it off is told to switch it on."""
    if os.environ.get("ROBUSTKERN_JIT", "1") == "0":
        return f"{_BUILD}, or unset ROBUSTKERN_JIT (=0 turns the JIT build off)"
    return f"{_BUILD}, or install what the JIT build needs (a C++ compiler and ninja: pip install ninja)"


def load() -> bool:
    """Load the compiled kernels if possible (once); True when the C++ ops of ``torch.ops.robustkern`` are usable."""
    global _outcome
    if _outcome is None:
        with _lock:
            if _outcome is None:
                _outcome = _load()
                if _outcome[0] == "absent":
                    warnings.warn(f"robustkern: compiled kernels unavailable ({_outcome[1]}); the PyTorch "
                                  f"reference runs instead. To fix: {_advice()}.", RuntimeWarning, stacklevel=2)
    return _outcome[0] != "absent"


def available() -> bool:
    """Whether the compiled kernels are loaded (loads them on first call)."""
    return load()


def has_cuda_kernels() -> bool:
    """Whether the loaded extension includes the CUDA kernels (False when it is absent)."""
    if not load():
        return False
    import torch

    return "cuda" in torch.ops.robustkern.build_info().split(",")


def status() -> str:
    """One line: ``prebuilt``, ``jit``, or the reason the compiled kernels are absent."""
    load()
    how, detail = _outcome
    return how if how != "absent" else detail


def _load() -> tuple[str, str]:
    try:
        importlib.import_module("robustkern._C")
        return "prebuilt", ""
    except ImportError as e:  # not built (ModuleNotFoundError), or built against another torch / Python
        prebuilt = ("robustkern._C is not built" if isinstance(e, ModuleNotFoundError) and e.name == "robustkern._C"
                    else f"robustkern._C failed to load: {_first_line(e)}")
    if os.environ.get("ROBUSTKERN_JIT", "1") == "0":
        return "absent", f"{prebuilt}, and ROBUSTKERN_JIT=0 disables the JIT build"
    try:
        _jit_compile()
        return "jit", ""
    except Exception as e:  # noqa: BLE001 -- any failure of the optional JIT build means "absent"
        return "absent", f"{prebuilt}, and the JIT build failed: {_first_line(e)}"


def _source_dir() -> Path:
    """csrc/: inside an installed package (robustkern/_csrc) or beside it in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / "ops.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"the C++ sources (csrc/ops.cpp) are neither in {here / '_csrc'} nor in "
                            f"{here.parent / 'csrc'}")


def _build_dir() -> Path:
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    path = cache / "robustkern" / f"jit-{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _jit_compile() -> None:
    """Compile csrc/*.cpp + csrc/cpu/*.cpp into a library that registers the ops (CPU kernels only)."""
    from torch.utils import cpp_extension

    src = _source_dir()
    sources = sorted(str(p) for p in src.glob("*.cpp")) + sorted(str(p) for p in (src / "cpu").glob("*.cpp"))
    build_dir = _build_dir()
    _log.info("robustkern: JIT-compiling the CPU kernels into %s (first use only)", build_dir)
    cpp_extension.load(
        name="robustkern_jit",
        sources=sources,
        extra_include_paths=[str(src / "include")],
        extra_cflags=["-O3", "-fopenmp-simd"],
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
