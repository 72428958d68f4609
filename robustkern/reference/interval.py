"""Pure-PyTorch ground truth for the interval (IBP) ops. Float64-capable; same signatures as
``robustkern.ops.interval``.

Representation. A box is a pair ``(mid, rad)`` with ``rad >= 0``: the set of real vectors ``z`` with
``|z - mid| <= rad`` element-wise. Interval bound propagation (Gowal et al. 2018, "On the Effectiveness of
Interval Bound Propagation for Training Verifiably Robust Models") maps a box through an affine layer as

    mid' = W mid + b,        rad' = |W| rad,

and through a monotone element-wise function ``f`` (ReLU) by its end points ``f(mid - rad), f(mid + rad)``.

Soundness in floating point (``sound=True``). The formulas above hold for real numbers; computed in
floating point the centre is off by rounding and the box may miss points it should contain. Every op here
therefore returns a radius widened by an a-priori bound on its own rounding error, so that the returned
*real* box ``[mid' - rad', mid' + rad']`` contains the image of the *real* input box. The bounds used are the
classical ones for recursive sums and dot products (Higham, "Accuracy and Stability of Numerical Algorithms",
2nd ed., Lemma 3.1 and Eq. 3.5): with unit roundoff ``u`` and ``gamma_k = k u / (1 - k u)``, a dot product of
length ``k`` computed in any order, with or without fused multiply-adds, satisfies
``|fl(sum a_i b_i) - sum a_i b_i| <= gamma_k sum |a_i b_i|``. The widening for a GEMM of depth ``K`` is

    e    = gamma_{K+2}
    s    = rad + 2 e |mid|                      (element-wise, before the product)
    rad' = (s |W|^T) (1 + 3 e) + 2 e |b| + K * tiny

which covers the centre's error ``gamma_{K+1}(|W||mid| + |b|)``, the radius product's own error and the
roundings of the two element-wise steps (the factors 2 and 3 leave a margin of about ``K u``); ``tiny`` (the
smallest normal number) covers gradual underflow. Element-wise ops widen by ``4 u`` times the magnitudes
involved. This is how float64 boxes are widened: relative ``O(K u)`` with ``u = 2^-53``, ~1e-13 at most.

Float32 boxes (``sound=True``) are not widened this way: at ``u = 2^-24`` the a-priori term
``2 gamma_{K+2} |W| |mid|`` is ~1e-4 of ``|W| |mid|`` for a 3x3x64 convolution, which is itself often far larger
than the bound ``|W mid| + |W| rad`` (cancellation), and it compounds through the layers (1e-2 on a 7-layer
CNN). Instead the GEMM and its epilogue run in float64 on the float32 numbers, widened as above, and the result
is rounded outwards to float32 (``robustkern._numerics.wide_accumulation``):

* a product of two float32 numbers (24-bit significands) is exact in float64 (53 bits), so the float64 dot
  product's only errors are its additions, ``gamma_{K+1}(2^-53)(|W||mid| + |b|)`` for the centre and
  ``gamma_K(2^-53) |W| rad`` for the radius, whose terms are non-negative, so that its error is relative to
  itself; both hold for any summation order (Higham, Lemma 3.1 and Eq. 3.5), so for any BLAS / cuDNN / Triton
  blocking, and the float64 widening above covers them;
* rounding ``(mid64, rad64)`` to float32 keeps ``mid32 = fl32(mid64)`` and sets
  ``rad32 >= rad64 + |mid64 - mid32|`` (rounded up), which contains the float64 box.

So the float32 box is wider than the exact interval image by the float32 rounding of its two end points (a
few ulps of ``|mid| + rad``) plus ~1e-13 relative: the sound bound is as tight as float32 can represent (the
interval-arithmetic practice of evaluating in higher precision and rounding outwards once; Rump, "Verification
methods: rigorous results using floating-point arithmetic", Acta Numerica 2010, Sec. 2-3). It assumes IEEE
products (no TF32, no Winograd/FFT convolutions); ``robustkern.ops`` enforces that.

The backward passes treat the widening terms as constants (they are ``O(u)`` of the bound).
NaN propagates: ReLU of NaN is NaN (never 0, which would be unsound).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._numerics import gamma, unit_roundoff, wide_accumulation

__all__ = [
    "unit_roundoff",
    "gamma",
    "interval_linear",
    "interval_conv2d",
    "interval_affine",
    "interval_input_box",
    "relu_nan",
]


def relu_nan(x: torch.Tensor) -> torch.Tensor:
    """max(x, 0) that keeps NaN as NaN."""
    return torch.where(x < 0, torch.zeros_like(x), x)


def _channel_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A per-channel vector (C,) viewed to broadcast against (B, C, *spatial) with ``ndim`` dims."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _epilogue(mid, rad, scale, shift, relu: bool, sound: bool):
    """Per-channel affine y = scale * x + shift (channel dim 1), then optionally ReLU, on a box."""
    u = unit_roundoff(mid.dtype)
    tiny = torch.finfo(mid.dtype).tiny
    if scale is None and shift is None and not relu:
        return mid, rad
    if scale is not None or shift is not None:
        a = _channel_view(scale, mid.dim()) if scale is not None else None
        c = _channel_view(shift, mid.dim()) if shift is not None else None
        am = mid * a if a is not None else mid
        m1 = am + c if c is not None else am
        r1 = rad * a.abs() if a is not None else rad
        if sound:
            mag = am.abs() + r1
            if c is not None:
                mag = mag + c.abs()
            r1 = r1 + 4 * u * mag + tiny
        mid, rad = m1, r1
    if relu:
        lo = relu_nan(mid - rad)
        hi = relu_nan(mid + rad)
        m2 = (hi + lo) * 0.5
        r2 = (hi - lo) * 0.5
        if sound:
            r2 = r2 + 4 * u * (mid.abs() + rad) + tiny
        mid, rad = m2, r2
    return mid, rad


def _gemm_widen(mid, rad, K: int, sound: bool):
    """The pre-product radius ``s = rad + 2 e |mid|`` and the constants ``e``, ``1 + 3e``."""
    if not sound:
        return rad, 0.0, 1.0
    e = gamma(K + 2, unit_roundoff(mid.dtype))
    return rad + (2 * e) * mid.abs(), e, 1.0 + 3 * e


def interval_linear(mid, rad, weight, bias=None, scale=None, shift=None, relu=False, sound=True):
    """Interval image of ``x -> W x + b`` (then the optional per-feature epilogue
    ``y -> relu?(scale * y + shift)``).

    Shapes: ``mid, rad`` (B, K); ``weight`` (N, K), or (B, N, K) for per-example weights (a specification
    matrix folded into the last layer); ``bias`` (N,) or (B, N); ``scale, shift`` (N,).
    Returns ``(mid_out, rad_out, pre_mid, pre_rad)``: the box after the epilogue and the box after the
    GEMM alone (the latter two are empty tensors when there is no epilogue).
    """
    if sound and mid.dtype == torch.float32:
        return wide_accumulation(lambda *t, sound: interval_linear(*t, relu=relu, sound=sound),
                                  (mid, rad, weight, bias, scale, shift))
    K = mid.shape[-1]
    s, e, grow = _gemm_widen(mid, rad, K, sound)
    if weight.dim() == 2:
        m = F.linear(mid, weight, bias)
        r = F.linear(s, weight.abs())
    else:
        m = torch.bmm(weight, mid.unsqueeze(-1)).squeeze(-1)
        if bias is not None:
            m = m + bias
        r = torch.bmm(weight.abs(), s.unsqueeze(-1)).squeeze(-1)
    if sound:
        r = r * grow + K * torch.finfo(mid.dtype).tiny
        if bias is not None:
            r = r + (2 * e) * bias.abs()
    return _with_epilogue(m, r, scale, shift, relu, sound)


def interval_conv2d(mid, rad, weight, bias=None, stride=(1, 1), padding=(0, 0), dilation=(1, 1),
                    groups=1, scale=None, shift=None, relu=False, sound=True):
    """Interval image of a 2-D convolution (then the optional per-channel epilogue, e.g. a folded
    BatchNorm and ReLU). ``mid, rad`` (B, C, H, W); ``weight`` (O, C/groups, kh, kw); ``bias`` (O,).
    Returns ``(mid_out, rad_out, pre_mid, pre_rad)`` as ``interval_linear``.
    """
    if sound and mid.dtype == torch.float32:
        return wide_accumulation(
            lambda m_, r_, w_, b_, a_, c_, sound: interval_conv2d(m_, r_, w_, b_, stride, padding, dilation, groups,
                                                                 a_, c_, relu, sound),
            (mid, rad, weight, bias, scale, shift))
    K = weight.shape[1] * weight.shape[2] * weight.shape[3]
    s, e, grow = _gemm_widen(mid, rad, K, sound)
    m = F.conv2d(mid, weight, bias, stride, padding, dilation, groups)
    r = F.conv2d(s, weight.abs(), None, stride, padding, dilation, groups)
    if sound:
        r = r * grow + K * torch.finfo(mid.dtype).tiny
        if bias is not None:
            r = r + (2 * e) * _channel_view(bias.abs(), r.dim())
    return _with_epilogue(m, r, scale, shift, relu, sound)


def _with_epilogue(m, r, scale, shift, relu, sound):
    if scale is None and shift is None and not relu:
        empty = m.new_empty(0)
        return m, r, empty, empty.clone()
    mo, ro = _epilogue(m, r, scale, shift, relu, sound)
    return mo, ro, m, r


def interval_affine(mid, rad, scale=None, shift=None, relu=False, sound=True):
    """Per-channel affine map ``y = scale * x + shift`` (channel dim 1; BatchNorm folded, input
    normalisation ``(x - mean) / std``), then optionally ReLU, on a box. ``scale``/``shift`` (C,) or None.
    Returns ``(mid_out, rad_out)``."""
    return _epilogue(mid, rad, scale, shift, relu, sound)


def interval_input_box(x, eps, x_min: float, x_max: float, sound=True):
    """The L-inf ball of radius ``eps`` around ``x``, clipped to ``[x_min, x_max]``, as a box:
    ``lo = max(x - eps, x_min)``, ``hi = min(x + eps, x_max)``, ``mid = (lo + hi)/2``, ``rad = (hi - lo)/2``.
    ``x`` (B, ...); ``eps`` (B,) per example. Returns ``(mid, rad)``."""
    e = eps.reshape((-1,) + (1,) * (x.dim() - 1))
    lo = torch.clamp(x - e, min=x_min)
    hi = torch.clamp(x + e, max=x_max)
    mid = (lo + hi) * 0.5
    rad = (hi - lo) * 0.5
    if sound:
        rad = rad + 4 * unit_roundoff(x.dtype) * (mid.abs() + rad) + torch.finfo(x.dtype).tiny
    return mid, rad
