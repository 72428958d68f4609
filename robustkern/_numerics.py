"""Floating-point facts that kernels, references and algorithms share: unit roundoff, Higham's gamma_n,
directed rounding to a dtype, and the precision every product inside a bound runs at.

Rounding model (IEEE 754, round to nearest): ``fl(a op b) = (a op b)(1 + d) + e`` with ``|d| <= u`` and
``|e| <= u * tiny`` (gradual underflow), for ``+ - * /`` and ``sqrt``; a sum of ``n`` products in any order
is within ``gamma_n * sum |a_i b_i|`` of the exact sum, ``gamma_n = n u / (1 - n u)`` (Higham, "Accuracy and
Stability of Numerical Algorithms", 2nd ed., Lemma 3.1 and Eq. 3.5), plus ``n * tiny`` for underflow.
One ``nextafter`` step away from a value rounded to nearest moves it past the exact result, which is how the
directed roundings below are made.
"""
from __future__ import annotations

import contextlib
import math

import torch
from torch import Tensor

__all__ = ["L2_DIV_EPS", "unit_roundoff", "gamma", "tiny", "next_down", "next_up", "round_down", "round_up",
           "round_box_outward", "wide_accumulation", "ieee_products", "ieee_products_held", "FLOAT_DTYPES"]

FLOAT_DTYPES = (torch.float32, torch.float64)

# The L2 projected-gradient step divides the gradient by ``||g||_2 + L2_DIV_EPS`` (as torchattacks and the
# published PGD code do), in every implementation of ``robustkern::pgd_step``.
L2_DIV_EPS = 1e-10


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = 2^-p of a floating dtype (2^-24 for float32, 2^-53 for float64)."""
    return torch.finfo(dtype).eps / 2.0


def gamma(k: int, u: float) -> float:
    """gamma_k = k u / (1 - k u) (Higham, Lemma 3.1)."""
    ku = k * u
    if ku >= 0.5:
        raise ValueError(f"reduction depth {k} too large for a rounding-error bound at u={u}")
    return ku / (1.0 - ku)


def tiny(dtype: torch.dtype) -> float:
    """The smallest normal number of ``dtype``: ``n * tiny`` covers the underflow of ``n`` roundings."""
    return torch.finfo(dtype).tiny


def next_down(t: Tensor) -> Tensor:
    """The next representable value below each element (a lower bound of an exact value rounded to ``t``)."""
    return torch.nextafter(t, torch.full_like(t, -math.inf))


def next_up(t: Tensor) -> Tensor:
    """The next representable value above each element."""
    return torch.nextafter(t, torch.full_like(t, math.inf))


def round_down(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The largest value of ``dtype`` that is <= each element of ``t`` (``t`` taken as exact)."""
    w = t.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return w
    return torch.where(w.to(t.dtype) > t, next_down(w), w)


def round_up(t: Tensor, dtype: torch.dtype) -> Tensor:
    """The smallest value of ``dtype`` that is >= each element of ``t`` (``t`` taken as exact)."""
    w = t.to(dtype)
    if torch.finfo(dtype).bits >= torch.finfo(t.dtype).bits:
        return w
    return torch.where(w.to(t.dtype) < t, next_up(w), w)


def round_box_outward(mid: Tensor, rad: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """A box ``(mid', rad')`` of ``dtype`` that contains the box ``|z - mid| <= rad`` of a wider dtype (both taken
    as exact): ``mid' = mid`` rounded to nearest, ``rad' >= rad + |mid - mid'|`` (the sum moved one ulp of the
    wide dtype up, then rounded up to ``dtype``); by the triangle inequality ``|z - mid'| <= rad'``. ``rad'``
    exceeds ``rad`` by at most about two ulps of ``dtype`` of ``|mid| + rad``. NaN stays NaN."""
    m = mid.to(dtype)
    d = (mid - m.to(mid.dtype)).abs()
    return m, round_up(next_up(rad + d), dtype)


def wide_accumulation(fn, tensors):
    """A float32 GEMM box op with ``sound=True`` by float64 accumulation: ``fn(*tensors64, sound=True)`` on the
    float64 values of ``tensors`` (exact; None stays None) returns ``(mid, rad, pre_mid, pre_rad)`` sound in
    float64, and each box (the pre-epilogue one is empty without an epilogue) is rounded outwards to float32
    (``round_box_outward``). Products of float32 numbers are exact in float64, so the float64 result's own
    widening is ~1e-13 relative and the float32 box is the exact one up to a few float32 ulps
    (``robustkern.reference.interval``)."""
    wide = [t.to(torch.float64) if t is not None else None for t in tensors]
    m, r, pm, pr = fn(*wide, sound=True)
    return (*round_box_outward(m, r, torch.float32), *round_box_outward(pm, pr, torch.float32))


# The op-level float32 precision settings that decide whether a float32 product may use TF32 (CUDA: cuBLAS
# matmuls, cuDNN convolutions) or bf16 (CPU: oneDNN matmuls and convolutions), as (backend, op) pairs of
# torch.backends' fp32_precision. An op-level "ieee" takes precedence over its backend's and the global setting,
# which the user may have lowered (torch.set_float32_matmul_precision, fp32_precision, allow_tf32).
_KNOBS = (("mkldnn", "matmul"), ("mkldnn", "conv"), ("cuda", "matmul"), ("cuda", "conv"))


_DEVICE_OF_KNOB = {"mkldnn": "cpu", "cuda": "cuda"}
_ALL_DEVICES = ("cpu", "cuda")


class _IEEEProducts:
    """The context manager behind ``ieee_products``: re-entrant; a context inside one that already holds its
    devices' settings at IEEE changes nothing (a few attribute reads)."""

    __slots__ = ("_devices", "_saved", "_stack", "_outer")
    _held: frozenset = frozenset()          # device types whose settings an enclosing context holds at IEEE

    def __init__(self, devices=_ALL_DEVICES):
        self._devices = devices

    def __enter__(self):
        cls = type(self)
        self._outer = held = cls._held
        self._saved, self._stack = (), None
        todo = [d for d in self._devices if d not in held]
        if not todo:
            return self
        cls._held = held.union(todo)
        for device in todo:
            if torch.is_autocast_enabled(device):
                if self._stack is None:
                    self._stack = contextlib.ExitStack()
                self._stack.enter_context(torch.autocast(device, enabled=False))
        get, set_ = torch._C._get_fp32_precision_getter, torch._C._set_fp32_precision_setter
        saved = []
        for backend, op in _KNOBS:
            if _DEVICE_OF_KNOB[backend] in todo:
                v = get(backend, op)
                if v != "ieee":
                    saved.append((backend, op, v))
                    set_(backend, op, "ieee")
        self._saved = saved
        return self

    def __exit__(self, *exc):
        set_ = torch._C._set_fp32_precision_setter
        for backend, op, v in self._saved:
            set_(backend, op, v)
        if self._stack is not None:
            self._stack.close()
        type(self)._held = self._outer
        return False


def ieee_products(device_type: str | None = None):
    """A context inside which every float32 matmul and convolution runs in IEEE float32 (no TF32 on CUDA, no
    bf16 on CPUs with bf16 matrix units) and autocast is off, whatever the user set, on every device, or on
    ``device_type`` ("cpu" or "cuda") only when given; the user's settings are restored after. The
    rounding-error bounds of sound bound computations assume exactly this. Inside a context that already holds
    the device's settings, a new one changes nothing."""
    return _IEEEProducts((device_type,) if device_type in _ALL_DEVICES else _ALL_DEVICES)


def ieee_products_held(device_type: str) -> bool:
    """Whether an enclosing ``ieee_products`` context holds ``device_type``'s settings at IEEE."""
    return device_type in _IEEEProducts._held
