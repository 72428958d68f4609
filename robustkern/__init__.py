"""robustkern: fused kernels for robust-ML training and certification.

Layers (each imports only those under it): kernels (``csrc/``, ``robustkern.kernels``) -> ops
(``robustkern.ops``) -> algorithms (``robustkern.bounds``, ...) -> the application (``robustkern_cli``).
"""
from __future__ import annotations

from . import nn, ops, reference  # noqa: E402
from ._backend import BackendUnavailable, use_backend  # noqa: E402
from ._info import __version__, info  # noqa: E402

__all__ = ["__version__", "info", "use_backend", "BackendUnavailable", "nn", "ops", "reference", "bounds",
           "attacks", "smoothing", "flatness"]
_LAZY = ("bounds", "attacks", "smoothing", "flatness")


def __getattr__(name):  # lazy: these import torch.fx, scipy, ...
    if name in _LAZY:
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'robustkern' has no attribute {name!r}")
