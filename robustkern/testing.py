"""Helpers for tests of robustkern's ops (ours and users'): tolerances per dtype, the backends present on
this machine, and checks of floating-point soundness."""
from __future__ import annotations

import contextlib


import torch

from . import _backend

__all__ = ["TOLERANCES", "tolerance", "backends_for", "backend_params", "backend", "assert_box_contains",
           "interpreting", "portable_simd"]

# (atol, rtol) for comparing an implementation with the reference in the same dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-9),
    torch.float32: (2e-5, 2e-5),
}


def tolerance(dtype: torch.dtype) -> dict:
    atol, rtol = TOLERANCES[dtype]
    return {"atol": atol, "rtol": rtol}


def backends_for(device: str = "cpu", include_interpreter: bool | None = None) -> list[str]:
    """The explicit backends that can run on ``device`` here. The Triton interpreter counts on CPU only when
    ``TRITON_INTERPRET=1`` (or ``include_interpreter``)."""
    out = []
    for b in ("reference", "cpp", "cuda", "triton"):
        if b == "triton" and device == "cpu" and include_interpreter is False:
            continue
        if _backend.available(b, device):
            out.append(b)
    return out


def backend_params(device: str = "cpu"):
    """``pytest.param``s for each backend of ``backends_for(device)``, the interpreted Triton one marked
    ``triton`` (tests should keep its shapes tiny)."""
    import pytest

    params = []
    for b in backends_for(device):
        marks = [pytest.mark.triton] if b == "triton" and device == "cpu" else []
        params.append(pytest.param(b, marks=marks, id=b))
    return params


backend = _backend.use_backend  # ``with backend("cpp"): ...`` in tests


def assert_box_contains(lower: torch.Tensor, upper: torch.Tensor, inner_lower: torch.Tensor,
                        inner_upper: torch.Tensor, what: str = "box") -> None:
    """``[lower, upper]`` contains ``[inner_lower, inner_upper]`` element-wise (compared in float64)."""
    lo, hi = lower.double(), upper.double()
    ilo, ihi = inner_lower.double(), inner_upper.double()
    bad = (lo > ilo) | (hi < ihi)
    if bool(bad.any()):
        i = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())} entries escape; first at {i}: [{lo[tuple(i)]}, "
                             f"{hi[tuple(i)]}] does not contain [{ilo[tuple(i)]}, {ihi[tuple(i)]}]")


@contextlib.contextmanager
def portable_simd(enabled: bool = True):
    """Inside: the C++ CPU kernels run their portable code paths instead of the AVX2 ones (or, with
    ``enabled=False``, the AVX2 ones where the CPU has them), to compare the two on one machine."""
    from .ops import cpu_options

    before, _ = cpu_options(portable_simd=enabled)
    try:
        yield
    finally:
        cpu_options(portable_simd=before)


def interpreting() -> bool:
    """Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``), read as the kernels read it."""
    from .kernels._config import is_interpreting
    return is_interpreting()
