"""Loads the compiled kernels (the C++ kernels of the ``torch.ops.robustkern`` ops) on first use:

1. ``prebuilt``: the ``robustkern._C`` library built by ``pip install --no-build-isolation -e .``;
2. ``jit``: else the CPU sources in ``csrc/`` compiled with ``torch.utils.cpp_extension.load``, with the
   sources and flags of setup.py (``robustkern/_build_spec.py``): once, announced by one line on stderr, and
   cached under ``~/.cache/robustkern`` (``$XDG_CACHE_HOME``). ``ROBUSTKERN_JIT=0`` turns this off;
3. absent: else one warning saying why and how to fix it; callers then run the PyTorch reference.

Nothing happens at import time; ``load()`` does the work once per process and caches the outcome.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import sys
import threading
import warnings
from pathlib import Path

from robustkern import _build_spec

__all__ = ["load", "available", "has_cuda_kernels", "status"]

_lock = threading.Lock()
_outcome: tuple[str, str] | None = None  # (how, detail): how in {"prebuilt", "jit", "absent"}

_JIT_NAME = "robustkern_jit"
# How long the JIT build takes, as measured by benchmarks/bench_build.py (benchmarks/RESULTS.md, "Build").
_JIT_DURATION = "usually about 1 minute on 2 CPU cores"

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
    """One folder per torch, Python and set of flags, so that a changed flag compiles afresh (and says so)."""
    import torch

    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    flags = hashlib.sha256(" ".join(_build_spec.jit_cflags()).encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{flags}".replace("+", "_")
    path = cache / "robustkern" / f"jit-{tag}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _up_to_date(library: Path, inputs: list[Path]) -> bool:
    """Whether ``library`` exists and is newer than every input (ninja would then have nothing to do)."""
    if not library.is_file():
        return False
    built = library.stat().st_mtime
    return all(p.stat().st_mtime <= built for p in inputs)


def _jit_compile() -> None:
    """Compile the CPU build's sources (robustkern/_build_spec.py) into a library that registers the ops."""
    from torch.utils import cpp_extension

    src = _source_dir()
    sources = _build_spec.sources(src, cuda=False)
    build_dir = _build_dir()
    cpp_extension.verify_ninja_availability()  # RuntimeError (-> "absent", with the advice) before announcing
    if not _up_to_date(build_dir / f"{_JIT_NAME}.so", sources + _build_spec.headers(src)):
        print(f"robustkern: compiling the C++ CPU kernels on first use, {_JIT_DURATION}; cached in {build_dir} "
              f"(`pip install --no-build-isolation -e .` prebuilds them)", file=sys.stderr, flush=True)
    cpp_extension.load(
        name=_JIT_NAME,
        sources=[str(p) for p in sources],
        extra_include_paths=[str(src / _build_spec.INCLUDE_DIR)],
        extra_cflags=_build_spec.jit_cflags(),
        build_directory=str(build_dir),
        is_python_module=False,
        verbose=False,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
