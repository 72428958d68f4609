"""The norms a config may name for its perturbation sets, as the numbers the library takes."""
from __future__ import annotations

import math
from typing import Any

from .errors import ConfigError

__all__ = ["NORMS", "parse_norm"]

NORMS = {"inf": math.inf, "linf": math.inf, "l_inf": math.inf, "2": 2.0, "2.0": 2.0, "l2": 2.0, "l_2": 2.0}


def parse_norm(path: str, value: Any) -> float:
    """A config's norm (``inf``, ``linf``, ``l_inf``; ``2``, ``l2``, ``l_2``) as ``math.inf`` or ``2.0``; ``path``
    names the key in the one-line error for any other value."""
    norm = NORMS.get(str(value).strip().lower())
    if norm is None:
        raise ConfigError(f"{path} must be 'inf' or '2', got {value!r}")
    return norm
