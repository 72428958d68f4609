"""Argument normalisation shared by every floor (kernels, ops, bounds): written once so that each argument
gets the same rule and the same one-line error wherever it enters."""
from __future__ import annotations

from typing import Sequence, Tuple, Union

__all__ = ["pair"]


def pair(v: Union[int, Sequence[int]], name: str, fn: str) -> Tuple[int, int]:
    """``(v, v)`` for an int, ``(a, b)`` for a pair, ``(a, a)`` for a 1-sequence (torch's convention for
    ``stride``, ``padding``, ``dilation``, ``kernel_size``); anything else is a ``ValueError`` naming ``fn``
    and ``name``."""
    if isinstance(v, str) or v is None:
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v!r}")
    if isinstance(v, int):
        return v, v
    v = tuple(int(x) for x in v)
    if len(v) == 1:
        return v[0], v[0]
    if len(v) != 2:
        raise ValueError(f"{fn}: {name} must be an int or a pair of ints, got {v}")
    return v
