"""Run one op on the backend that ``robustkern._backend.select`` picks, for every op family."""
from __future__ import annotations

import importlib

import torch

from .. import _backend
from .._numerics import ieee_products


def run(family: str, name: str, device: torch.device, *args):
    """Call op ``name`` of ``family`` (the module name under ``robustkern.kernels`` and
    ``robustkern.reference``; ``torch.ops.robustkern_ext.<name>`` for the compiled kernels) on the backend
    selected for ``device`` (a compiled backend without a kernel for ``name`` is skipped by ``auto`` and an
    error when requested). The ops of the bound families (``interval``, ``crown``) run with IEEE float32
    products and autocast off (``robustkern._numerics.ieee_products``): their rounding-error bounds assume it."""
    backend = _backend.select(device, op=name)
    if family in _BOUND_FAMILIES:
        with ieee_products():
            return _call(backend, family, name, args)
    return _call(backend, family, name, args)


_BOUND_FAMILIES = frozenset({"interval", "crown"})


def _call(backend: str, family: str, name: str, args):
    if backend == "triton":
        return getattr(importlib.import_module(f"robustkern.kernels.{family}"), name)(*args)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.robustkern_ext, name)(*args)
    return getattr(importlib.import_module(f"robustkern.reference.{family}"), name)(*args)


def fresh(outs, inputs):
    """Custom ops must not return an input, or one storage twice; copy any output that would."""
    seen = {t.untyped_storage().data_ptr() for t in inputs if t is not None and t.numel()}
    result = []
    for o in outs:
        ptr = o.untyped_storage().data_ptr() if o.numel() else None
        if ptr is not None and ptr in seen:
            o = o.clone()
            ptr = o.untyped_storage().data_ptr()
        seen.add(ptr)
        result.append(o)
    return tuple(result)
