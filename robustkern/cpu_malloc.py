"""Keep freed CPU memory in the process instead of handing it back to the kernel (glibc ``mallopt``).

PyTorch's CPU tensors come from ``malloc``. glibc serves a block above its *mmap threshold* (dynamic, at most
32 MB by default) with a fresh ``mmap`` and gives it back with ``munmap`` when the tensor dies; blocks below it
come from the heap, whose free top is trimmed back to the kernel past the *trim threshold*. Either way, the
next step's tensors land on pages the kernel must fault in and zero again, 4 KB at a time. A training or
certification step allocates the same sizes every iteration, so this is pure overhead: on one core of an AMD
EPYC (benchmarks/bench_flatness_fused.py, DM MNIST medium, batch 128) 10-28 thousand page faults and 15-25%
of the wall time of a double-backprop step went to it, for PyTorch's own double backprop and for robustkern's
alike.

``keep_freed_memory()`` fixes both thresholds (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``) so that blocks up
to ``mmap_threshold`` bytes come from the heap and freed memory stays there for reuse: once the heap has settled
(a few steps; small allocations interleaved with the large ones fragment it at first) no page is faulted in
again. The price is that the process keeps its peak heap (up to ``trim_threshold`` bytes of it free) until it
exits, which suits a training or certification run. It changes the whole process (every
library's allocations), so the library never calls it on import; the ``robustkern`` command does at start-up
unless given ``--no-keep-freed-memory``. The same effect without code:
``GLIBC_TUNABLES=glibc.malloc.mmap_threshold=1073741824:glibc.malloc.trim_threshold=1073741824``.

Only glibc has ``mallopt``; elsewhere (macOS, musl, Windows) the function does nothing and returns False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["keep_freed_memory", "keeps_freed_memory", "DEFAULT_THRESHOLD"]

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30       # 1 GiB
_APPLIED: list[bool] = []   # set once keep_freed_memory() has succeeded in this process


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return None


def keep_freed_memory(mmap_threshold: int = DEFAULT_THRESHOLD, trim_threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds (bytes, each in [0, 2^31)); True if both were accepted. See the
    module docstring for what this changes and what it costs."""
    for name, v in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2 ** 31:
            raise ValueError(f"keep_freed_memory: {name} must be an int in [0, 2^31), got {v!r}")
    libc = _libc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = libc.mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1 and ok
    if ok and not _APPLIED:
        _APPLIED.append(True)
    return bool(ok)


def keeps_freed_memory() -> bool:
    """Whether ``keep_freed_memory()`` has been applied in this process (kernel choices that depend on the
    allocator read this: see ``robustkern.flatness.grad_norm``)."""
    return bool(_APPLIED)
