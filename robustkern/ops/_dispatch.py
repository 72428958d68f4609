"""Run one op on the backend that ``robustkern._backend.select`` picks, for every op family."""
from __future__ import annotations

import importlib

import torch

from .. import _backend


def run(family: str, name: str, device: torch.device, *args):
    """Call op ``name`` of ``family`` (the module name under ``robustkern.kernels`` and
    ``robustkern.reference``; ``torch.ops.robustkern_ext.<name>`` for the compiled kernels) on the backend
    selected for ``device`` (a compiled backend without a kernel for ``name`` is skipped by ``auto`` and an
    error when requested). The reference runs on CUDA with TF32 off."""
    backend = _backend.select(device, op=name)
    if backend == "triton":
        return getattr(importlib.import_module(f"robustkern.kernels.{family}"), name)(*args)
    if backend in ("cpp", "cuda"):
        return getattr(torch.ops.robustkern_ext, name)(*args)
    fn = getattr(importlib.import_module(f"robustkern.reference.{family}"), name)
    if device.type == "cuda":
        with _backend.ieee_fp32():
            return fn(*args)
    return fn(*args)


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
