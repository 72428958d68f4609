"""Element-wise interval kernels (Triton): ``interval_affine`` (per-channel affine map, then optionally ReLU,
on a box) and ``interval_input_box`` (the clipped L-inf ball as a box), and the device and host helpers the
GEMM kernels of ``robustkern.kernels.interval`` share. The math is ``robustkern.reference.interval``'s
(Gowal et al. 2018, IBP; the rounding-error widening that makes the boxes sound in floating point)."""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._numerics import unit_roundoff

__all__ = ["interval_affine", "interval_input_box"]

Tensor = torch.Tensor
_FLOATS = (torch.float32, torch.float64)


# ================================================================================================ device code
@triton.jit
def _relu_nan(x):
    """max(x, 0) that keeps NaN as NaN (tl.maximum may drop it)."""
    return tl.where(x < 0, 0.0, x)


@triton.jit
def _box_affine_relu(m, r, a, c, four_u, tiny,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, SOUND: tl.constexpr):
    """The reference's ``_epilogue``: ``y = a * x + c`` on the box (``mid' = a mid + c``, ``rad' = |a| rad``,
    widened by ``4u (|a mid| + |a| rad + |c|) + tiny``), then ReLU by the end points (``lo = relu(mid - rad)``,
    ``hi = relu(mid + rad)``, ``mid' = (hi + lo)/2``, ``rad' = (hi - lo)/2``, widened by
    ``4u (|mid| + rad) + tiny``)."""
    if HAS_SCALE or HAS_SHIFT:
        if HAS_SCALE:
            am = m * a
            r1 = r * tl.abs(a)
        else:
            am = m
            r1 = r
        if HAS_SHIFT:
            m1 = am + c
        else:
            m1 = am
        if SOUND:
            mag = tl.abs(am) + r1
            if HAS_SHIFT:
                mag = mag + tl.abs(c)
            r1 = r1 + four_u * mag + tiny
        m = m1
        r = r1
    if RELU:
        lo = _relu_nan(m - r)
        hi = _relu_nan(m + r)
        m2 = (hi + lo) * 0.5
        r2 = (hi - lo) * 0.5
        if SOUND:
            r2 = r2 + four_u * (tl.abs(m) + r) + tiny
        m = m2
        r = r2
    return m, r


@triton.jit
def _interval_affine_kernel(
    mid_ptr, rad_ptr, scale_ptr, shift_ptr, out_mid_ptr, out_rad_ptr,
    numel, C, S,
    four_u_: tl.float64, tiny_: tl.float64,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr, SOUND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Element-wise ``relu?(scale[c] * x + shift[c])`` on a contiguous (B, C, S) box."""
    DT = mid_ptr.dtype.element_ty
    four_u = tl.full((), four_u_, DT)
    tiny = tl.full((), tiny_, DT)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    m = tl.load(mid_ptr + offs, mask=mask, other=0.0)
    r = tl.load(rad_ptr + offs, mask=mask, other=0.0)
    ch = (offs // S) % C
    a = 0.0
    c = 0.0
    if HAS_SCALE:
        a = tl.load(scale_ptr + ch, mask=mask, other=0.0)
    if HAS_SHIFT:
        c = tl.load(shift_ptr + ch, mask=mask, other=0.0)
    m, r = _box_affine_relu(m, r, a, c, four_u, tiny, HAS_SCALE, HAS_SHIFT, RELU, SOUND)
    tl.store(out_mid_ptr + offs, m, mask=mask)
    tl.store(out_rad_ptr + offs, r, mask=mask)


@triton.jit
def _interval_input_box_kernel(
    x_ptr, eps_ptr, mid_ptr, rad_ptr,
    numel, P,
    x_min_: tl.float64, x_max_: tl.float64, four_u_: tl.float64, tiny_: tl.float64,
    SOUND: tl.constexpr, BLOCK: tl.constexpr,
):
    """``lo = max(x - eps[b], x_min)``, ``hi = min(x + eps[b], x_max)``, ``mid = (lo + hi)/2``,
    ``rad = (hi - lo)/2`` (+ ``4u (|mid| + rad) + tiny`` when sound) on a contiguous (B, P) input."""
    DT = x_ptr.dtype.element_ty
    x_min = tl.full((), x_min_, DT)
    x_max = tl.full((), x_max_, DT)
    four_u = tl.full((), four_u_, DT)
    tiny = tl.full((), tiny_, DT)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    e = tl.load(eps_ptr + offs // P, mask=mask, other=0.0)
    lo = x - e
    lo = tl.where(lo < x_min, x_min, lo)  # torch.clamp: NaN stays NaN
    hi = x + e
    hi = tl.where(hi > x_max, x_max, hi)
    mid = (lo + hi) * 0.5
    rad = (hi - lo) * 0.5
    if SOUND:
        rad = rad + four_u * (tl.abs(mid) + rad) + tiny
    tl.store(mid_ptr + offs, mid, mask=mask)
    tl.store(rad_ptr + offs, rad, mask=mask)



_ELEMENTWISE_BLOCK = 1024


# ================================================================================================ host helpers
def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _check_float(op: str, **tensors) -> torch.dtype:
    dtype = None
    for name, t in tensors.items():
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}, expected {dtype}")
    return dtype


def _vec(v: Optional[Tensor], dtype, n: int, name: str, op: str) -> Optional[Tensor]:
    """A per-channel vector as a contiguous (n,) tensor of ``dtype`` (None stays None)."""
    if v is None:
        return None
    if v.numel() != n:
        raise ValueError(f"{op}: {name} must have {n} elements, got shape {tuple(v.shape)}")
    return v.reshape(n).to(dtype).contiguous()



def interval_affine(mid: Tensor, rad: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                    relu: bool = False, sound: bool = True) -> Tuple[Tensor, Tensor]:
    """Per-channel affine map ``y = scale * x + shift`` (channel dim 1 of (B, C, *spatial) or (B, C): a folded
    BatchNorm, input normalisation), then optionally ReLU, on a box, in one element-wise pass:

        mid' = a mid + c,  rad' = |a| rad + 4u(|a mid| + |a| rad + |c|) + tiny
        lo, hi = relu(mid' - rad'), relu(mid' + rad')
        mid'' = (hi + lo)/2,  rad'' = (hi - lo)/2 + 4u(|mid'| + rad') + tiny

    (widening only when ``sound``; IBP through monotone element-wise functions, Gowal et al. 2018).
    Returns ``(mid_out, rad_out)``; with no scale, shift or relu the inputs themselves, as the reference.
    """
    op = "interval_affine"
    dtype = _check_float(op, mid=mid, rad=rad)
    if mid.shape != rad.shape:
        raise ValueError(f"{op}: mid and rad must have the same shape, got {tuple(mid.shape)}, {tuple(rad.shape)}")
    if scale is None and shift is None and not relu:
        return mid, rad
    if mid.dim() < 2 and (scale is not None or shift is not None):
        raise ValueError(f"{op}: a per-channel affine map needs (B, C, ...) input, got {tuple(mid.shape)}")
    C = mid.shape[1] if mid.dim() >= 2 else 1
    scale = _vec(scale, dtype, C, "scale", op)
    shift = _vec(shift, dtype, C, "shift", op)
    m = mid.contiguous()
    r = rad.contiguous()
    out_mid = torch.empty_like(m)
    out_rad = torch.empty_like(r)
    numel = m.numel()
    if numel == 0:
        return out_mid, out_rad
    S = numel // (mid.shape[0] * C) if mid.dim() >= 2 else 1
    u = unit_roundoff(dtype)
    dummy = m
    with _device_guard(mid):
        _interval_affine_kernel[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
            m, r, scale if scale is not None else dummy, shift if shift is not None else dummy,
            out_mid, out_rad, numel, C, S, 4 * u, torch.finfo(dtype).tiny,
            HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, RELU=bool(relu), SOUND=bool(sound),
            BLOCK=_ELEMENTWISE_BLOCK,
        )
    return out_mid, out_rad


def interval_input_box(x: Tensor, eps: Tensor, x_min: float, x_max: float,
                       sound: bool = True) -> Tuple[Tensor, Tensor]:
    """The L-inf ball of radius ``eps[b]`` around each example ``x[b]``, clipped to ``[x_min, x_max]``, as a
    box (the IBP input set, Gowal et al. 2018):

        lo = max(x - eps, x_min),  hi = min(x + eps, x_max)
        mid = (lo + hi)/2,  rad = (hi - lo)/2 [+ 4u(|mid| + rad) + tiny]

    ``x`` (B, ...); ``eps`` (B,). Returns ``(mid, rad)`` (contiguous, shape of ``x``).
    """
    op = "interval_input_box"
    dtype = _check_float(op, x=x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (B, ...), got a scalar")
    B = x.shape[0]
    if eps.numel() != B:
        raise ValueError(f"{op}: eps must have one value per example ({B}), got shape {tuple(eps.shape)}")
    xc = x.contiguous()
    e = eps.reshape(B).to(device=x.device, dtype=dtype).contiguous()
    mid = torch.empty_like(xc)
    rad = torch.empty_like(xc)
    numel = xc.numel()
    if numel == 0:
        return mid, rad
    u = unit_roundoff(dtype)
    with _device_guard(x):
        _interval_input_box_kernel[(triton.cdiv(numel, _ELEMENTWISE_BLOCK),)](
            xc, e, mid, rad, numel, numel // B, float(x_min), float(x_max), 4 * u, torch.finfo(dtype).tiny,
            SOUND=bool(sound), BLOCK=_ELEMENTWISE_BLOCK,
        )
    return mid, rad
