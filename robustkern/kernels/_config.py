"""Launch-configuration helpers shared by the Triton kernels.

Everything here is evaluated at call time, never at import time: importing ``robustkern.kernels.*`` must not
touch a device or a driver (see DESIGN.md, "Exposure").
"""
from __future__ import annotations

import os

__all__ = ["is_interpreting", "autotune_configs"]

_FALSE = ("", "0", "false", "off", "no")


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``), read now."""
    try:
        import triton

        return bool(triton.knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton without knobs
        return os.environ.get("TRITON_INTERPRET", "0").strip().lower() not in _FALSE


def autotune_configs(configs):
    """The autotuning candidates to use now: all of them on a GPU, only the first under the interpreter
    (which cannot benchmark: ``@triton.autotune`` with several configs fails with "0 active drivers").
    List the config that is best for small problems first."""
    configs = list(configs)
    return configs[:1] if is_interpreting() else configs
