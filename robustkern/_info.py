"""``robustkern.info()``: versions and which backends are active (also ``python -m robustkern``)."""
from __future__ import annotations

import importlib.metadata
import os
import platform
import sys

import torch

from . import _backend, _ext

__version__ = "0.1.0"   # the package version (pyproject.toml has the same)

__all__ = ["info"]


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def info(file=None) -> dict:
    """Print (to ``file``, default stdout; ``file=False`` prints nothing) and return a dict of versions, the
    compiled extension's state and the backend each device gets under the current settings."""
    cuda = torch.cuda.is_available()
    report = {
        "robustkern": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "scipy": _version("scipy"),
        "extension": _ext.status() if _ext.load() else f"absent ({_ext.status()})",
        "extension CUDA kernels": _ext.has_cuda_kernels() if _ext.available() else False,
        "CUDA device": torch.cuda.get_device_name() if cuda else "none",
        "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "0"),
        "requested backend": _backend.requested_backend(),
        "backend for CPU tensors": _safe_select("cpu"),
        "backend for CUDA tensors": _safe_select("cuda") if cuda else "n/a (no CUDA device)",
    }
    for b in ("triton", "cpp", "cuda", "reference"):
        report[f"available: {b}"] = sorted(d for d in ("cpu", "cuda") if _backend.available(b, d))
    if file is not False:
        out = file or sys.stdout
        width = max(len(k) for k in report)
        for k, v in report.items():
            print(f"{k:<{width}}  {v}", file=out)
    return report


def _safe_select(device: str) -> str:
    try:
        return _backend.select(device)
    except _backend.BackendUnavailable as e:
        return f"error: {e}"
