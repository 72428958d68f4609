"""Where precision enters a bound computation, written once.

A sound bound is about the network in exact real arithmetic: every parameter and buffer taken as the real
number it stores, the input set taken exactly as given. The computation runs in a working precision (the
model's float32 or float64), so every value that enters it in another precision, or is derived from the
parameters by a formula, enters as an enclosure:

* the input set. ``x`` in a wider dtype is rounded to the working dtype and the radius grows by the rounding
  error in the ball's own norm (``||x - x_w||_inf`` or ``||x - x_w||_2``): the ball around ``x_w`` contains
  the given one (triangle inequality). ``eps`` is rounded up, ``x_min`` down and ``x_max`` up, never inwards.
* the specification ``C``. Backward (CROWN) passes run in float64 and take ``C`` exactly; interval propagation
  uses ``C_w = fl(C)`` and widens by ``|C - C_w|`` times the magnitude of the logits.
* per-channel coefficients of BatchNorm and input normalisation, ``y = s z + t``. They are enclosed in float64
  intervals with outward rounding (``sqrt``, ``/``, ``*``, ``+`` are correctly rounded in IEEE 754, so one
  ``nextafter`` step per operation encloses the exact result), then given to the working precision as a
  centre and a radius ``(s_w, t_w, ds, dt)`` with ``|s - s_w| <= ds`` and ``|t - t_w| <= dt``. Propagation
  widens by ``ds |z| + dt`` (interval propagation: added to the radius after the fused epilogue, which is valid
  through a ReLU because it is monotone and 1-Lipschitz; backward passes: a term of the error accumulator).
* training-mode BatchNorm statistics: see ``robustkern.bounds.batch_stats``.

The engine then runs inside ``robustkern._numerics.ieee_products`` (IEEE products, autocast off).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .._numerics import FLOAT_DTYPES, gamma, next_down, next_up, round_down, round_up, tiny, unit_roundoff
from ..graph import BoundNode, normalize_params

__all__ = ["BoundInput", "enter", "check_spec", "Coefficients", "WideWeights", "layer_weights", "grow", "magnitude",
           "spec_rounding"]


@dataclass
class BoundInput:
    """The input set of a bound computation after entry: ``x`` as given (its dtype; BatchNorm statistics are
    computed from it), ``xw`` its working-precision centre, ``eps`` (B,) in the working dtype covering the
    rounding of ``x``, ``x_min``/``x_max`` representable in the working dtype (outward), ``C`` as given."""

    x: Tensor
    xw: Tensor
    eps: Tensor
    norm: float
    x_min: float
    x_max: float
    C: Tensor | None
    dtype: torch.dtype


def _scalar_outward(v: float, dtype: torch.dtype, up: bool) -> float:
    if not math.isfinite(v):
        return float(v)
    t = torch.tensor(v, dtype=torch.float64)
    return float(round_up(t, dtype) if up else round_down(t, dtype))


def enter(x: Tensor, eps, norm: float, x_min: float, x_max: float, C: Tensor | None, dtype: torch.dtype,
          check_values: bool = True) -> BoundInput:
    """Validate the arguments of a bound computation and bring them into ``dtype`` by the rules above. ``eps``:
    a float or a (B,) tensor of any float dtype."""
    if not isinstance(x, Tensor):
        raise TypeError("compute_bounds: x must be a tensor")
    if not x.is_floating_point():
        raise TypeError(f"compute_bounds: x must be floating point, got {x.dtype}")
    if x.dtype not in FLOAT_DTYPES:
        x = x.to(torch.float32)         # float16/bfloat16 values are exact in float32
    x_min, x_max = float(x_min), float(x_max)
    if not x_min <= x_max:
        raise ValueError(f"compute_bounds: x_min ({x_min}) must be <= x_max ({x_max})")
    if isinstance(eps, (int, float)) and not eps >= 0:
        raise ValueError(f"compute_bounds: eps must be >= 0 and not NaN, got {eps}")
    if check_values and bool(torch.isnan(x).any()):
        raise ValueError("compute_bounds: x contains NaN")
    if check_values and x.numel() and (float(x.min()) < x_min or float(x.max()) > x_max):
        raise ValueError(f"compute_bounds: x must lie in [x_min, x_max] = [{x_min}, {x_max}], got values in "
                         f"[{float(x.min())}, {float(x.max())}]")
    if isinstance(eps, Tensor) and not eps.is_floating_point():
        eps = eps.to(torch.float64)
    e64 = torch.as_tensor(eps, dtype=torch.float64 if not isinstance(eps, Tensor) else None, device=x.device)
    if e64.dim() == 0:
        e64 = e64.expand(x.shape[0])
    if e64.shape != (x.shape[0],):
        raise ValueError(f"compute_bounds: eps must be a float or a ({x.shape[0]},) tensor, got shape "
                         f"{tuple(e64.shape)}")
    if check_values and (bool(torch.isnan(e64).any()) or bool((e64 < 0).any())):
        raise ValueError(f"compute_bounds: eps must be >= 0 and not NaN, got {eps if e64.numel() == 1 else e64}")
    norm = float(norm)
    if norm not in (math.inf, 2.0):
        raise ValueError(f"compute_bounds: norm must be inf or 2, got {norm}")
    xw = x.to(dtype)
    wide = torch.finfo(x.dtype).bits > torch.finfo(dtype).bits
    if wide or torch.finfo(e64.dtype).bits > torch.finfo(dtype).bits:
        e = e64.to(torch.float64)
        if wide:  # the ball around xw of radius eps + ||x - xw|| contains the ball around x
            d = (x - xw.to(x.dtype)).abs().flatten(1)
            if norm == 2:
                n = d.shape[1]
                grow_by = next_up(torch.sqrt(next_up(d.square().sum(1) * (1 + gamma(n + 1, unit_roundoff(d.dtype)))
                                                     + n * tiny(d.dtype))))
            else:
                grow_by = d.amax(1) if d.shape[1] else d.new_zeros(d.shape[0])
            e = next_up(e + grow_by.to(torch.float64))
        eps_w = round_up(e, dtype)
    else:
        eps_w = e64.to(dtype)
    return BoundInput(x, xw, eps_w.contiguous(), norm, _scalar_outward(x_min, dtype, False),
                      _scalar_outward(x_max, dtype, True), C, dtype)


def check_spec(C, batch: int, num_outputs: int, check_values: bool = True) -> Tensor:
    want = (batch, "n_spec", num_outputs)
    if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] != batch or C.shape[2] != num_outputs:
        got = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
        raise ValueError(f"compute_bounds: C must have shape {want}, got {got}")
    if not C.is_floating_point():
        C = C.to(torch.float64)
    if C.dtype not in FLOAT_DTYPES:
        C = C.to(torch.float32)
    if check_values and bool(torch.isnan(C).any()):
        raise ValueError("compute_bounds: C contains NaN")
    return C


def spec_rounding(C: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """``(C_w, |C - C_w|)`` (the second None when ``C`` is exact in ``dtype``), the bound rounded up."""
    Cw = C.to(dtype)
    if torch.finfo(C.dtype).bits <= torch.finfo(dtype).bits:
        return Cw, None
    return Cw, round_up((C - Cw.to(C.dtype)).abs(), dtype)


def grow(rad: Tensor, extra: Tensor) -> Tensor:
    """``rad + extra`` rounded up: ``(rad + extra)(1 + 4u) + tiny >= rad + extra`` for non-negative terms."""
    u = unit_roundoff(rad.dtype)
    return (rad + extra) * (1 + 4 * u) + tiny(rad.dtype)


def magnitude(mid: Tensor, rad: Tensor) -> Tensor:
    """An upper bound of ``|z|`` over the box ``|z - mid| <= rad``."""
    u = unit_roundoff(mid.dtype)
    return (mid.abs() + rad) * (1 + 4 * u) + tiny(mid.dtype)


# ------------------------------------------------------------------------------------------------ intervals
# Closed intervals (lo, hi) of float64 tensors; every result is rounded outwards by one ulp, which encloses the
# exact result of an operation that IEEE 754 rounds correctly (+, -, *, /, sqrt).
def _iv_add(a, b):
    return next_down(a[0] + b[0]), next_up(a[1] + b[1])


def _iv_neg(a):
    return -a[1], -a[0]


def _iv_mul(a, b):
    p = torch.stack([a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]])
    return next_down(p.amin(0)), next_up(p.amax(0))


def _iv_inv_sqrt(a):
    """``1 / sqrt(a)`` for ``a > 0`` (decreasing): [1/up(sqrt(hi)), 1/down(sqrt(lo))] rounded outwards."""
    lo = next_down(1.0 / next_up(torch.sqrt(a[1])))
    hi = next_up(1.0 / next_down(torch.sqrt(a[0].clamp(min=0.0))).clamp(min=0.0))
    return lo, torch.where(torch.isnan(hi), torch.full_like(hi, math.inf), hi)


def _point(t: Tensor):
    t = t.detach().to(torch.float64)
    return t, t


class WideWeights:
    """Wider copies (float64) of a float32 model's parameters for its sound bounds, kept across calls while the
    parameters hold the same values. A copy is made when a parameter's version counter (bumped by every in-place
    change, e.g. an optimizer step) was the same at the previous call, i.e. in certification, not in training, and
    kept with a float32 snapshot of the values; it serves a later call only if the version is unchanged *and* the
    values equal the snapshot (``torch.equal``: a pass over the float32 values, cheaper than the conversion's write of
    twice their bytes), so a change the version does not see (through ``.data``) is caught. The copies cost the
    parameters' bytes three times over; ``BoundedModule(..., keep_wide_weights=False)`` keeps none."""

    def __init__(self, keep: bool = True):
        self.keep = keep
        self._entries: dict = {}

    def get(self, name: str, t: Tensor, dtype: torch.dtype) -> Tensor:
        """``t`` (the parameter ``name``) in ``dtype``: the kept copy where it is valid, else a new conversion."""
        if not self.keep or (torch.is_grad_enabled() and t.requires_grad):
            return t.to(dtype)
        key, version = (name, dtype), t._version
        entry = self._entries.get(key)
        if entry is not None and entry[0] == version and entry[1] is not None and entry[1].shape == t.shape and \
                entry[1].device == t.device and torch.equal(entry[1], t.detach()):
            return entry[2]
        wide = t.detach().to(dtype)
        steady = entry is not None and entry[0] == version
        self._entries[key] = (version, t.detach().clone(), wide) if steady else (version, None, None)
        return wide


def layer_weights(node: BoundNode, dtype: torch.dtype, wide: WideWeights | None = None
                  ) -> tuple[Tensor, Tensor | None]:
    """The weight and bias of a Linear/Conv2d node in ``dtype``: no copy when they already are, else a conversion
    (``wide``'s kept copy where it is valid)."""
    w, b = node.module.weight, node.module.bias
    if w.dtype == dtype:
        return w, b
    if wide is None:
        return w.to(dtype), (b.to(dtype) if b is not None else None)
    return wide.get(node.name + ".weight", w, dtype), (wide.get(node.name + ".bias", b, dtype) if b is not None
                                                        else None)


class Coefficients:
    """The per-channel affine maps ``y = s z + t`` of the BatchNorm and normalisation nodes of one bound
    computation, in any working dtype: ``get(node, dtype)`` returns ``(s_w, t_w, ds, dt)``, ``ds``/``dt``
    None unless ``sound``. BatchNorm uses ``stats[name]`` when its statistics are the batch's (training mode,
    or no running statistics): ``(mean, var)`` point values (working precision, with autograd) or, for sound
    bounds, ``(mean_lo, mean_hi, var_lo, var_hi)`` float64 enclosures (``robustkern.bounds.batch_stats``).
    The centres carry the gradient of the plain formula (the enclosure's rounding is not differentiated)."""

    def __init__(self, stats: dict | None, sound: bool, wide: WideWeights | None = None):
        self.stats = stats if stats is not None else {}
        self.sound = sound
        self.wide = wide
        self._cache: dict = {}

    def weights(self, node: BoundNode, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
        """``layer_weights`` of a Linear/Conv2d node, converted once per bound computation: the interval pass and
        the backward passes share them (a float32 model's sound bounds run in float64, where a wide layer's
        conversion is a pass over twice its weight's bytes)."""
        key = ("weights", node.name, dtype)
        if key not in self._cache:
            self._cache[key] = layer_weights(node, dtype, self.wide)
        return self._cache[key]

    def get(self, node: BoundNode, dtype: torch.dtype, device=None, input_box=None):
        key = (node.name, dtype)
        if key not in self._cache:
            self._cache[key] = self._compute(node, dtype, device)
        return self._cache[key]

    def _compute(self, node: BoundNode, dtype, device):
        m = node.module
        if node.kind == "normalize":
            mean, std = normalize_params(m)
            dev = device if device is not None else mean.device
            mean, std = mean.to(dev), std.to(dev)
            point = (1.0 / std, -mean / std)
            enclosure = (lambda: self._normalize_interval(mean, std)) if self.sound else None
        else:
            mean, var, mv_iv = self._bn_stats(node)
            scale = torch.rsqrt(var.to(torch.float64) + m.eps)
            if m.weight is not None:
                scale = scale * m.weight.to(torch.float64)
            shift = -mean.to(torch.float64) * scale
            if m.bias is not None:
                shift = shift + m.bias.to(torch.float64)
            point = (scale, shift)
            enclosure = (lambda: self._bn_interval(m, *mv_iv)) if self.sound else None
        if enclosure is None:
            return point[0].to(dtype), point[1].to(dtype), None, None
        with torch.no_grad():
            (s_lo, s_hi), (t_lo, t_hi) = enclosure()
        out = []
        for p, lo, hi in ((point[0], s_lo, s_hi), (point[1], t_lo, t_hi)):
            mid = ((lo + hi) * 0.5).to(dtype)
            m64 = mid.to(torch.float64)
            rad = round_up(next_up(torch.maximum(hi - m64, m64 - lo)), dtype)
            pw = p.to(dtype)
            out.append((pw + (mid - pw).detach(), rad))
        return out[0][0], out[1][0], out[0][1], out[1][1]

    def _bn_stats(self, node: BoundNode):
        m = node.module
        if m.training or m.running_mean is None:
            if node.name not in self.stats:
                raise RuntimeError(f"robustkern.bounds: BatchNorm '{node.path}' uses batch statistics but none "
                                   f"were computed for it")
            st = self.stats[node.name]
            if len(st) == 4:
                mean_lo, mean_hi, var_lo, var_hi = st
                return (mean_lo + mean_hi) * 0.5, (var_lo + var_hi) * 0.5, ((mean_lo, mean_hi), (var_lo, var_hi))
            mean, var = st
            return mean, var, (_point(mean), _point(var))
        return m.running_mean, m.running_var, (_point(m.running_mean), _point(m.running_var))

    @staticmethod
    def _bn_interval(m, mean, var):
        eps = torch.tensor(float(m.eps), dtype=torch.float64, device=var[0].device)
        inv = _iv_inv_sqrt(_iv_add(var, (eps, eps)))
        scale = _iv_mul(inv, _point(m.weight)) if m.weight is not None else inv
        shift = _iv_neg(_iv_mul(mean, scale))
        if m.bias is not None:
            shift = _iv_add(shift, _point(m.bias))
        return scale, shift

    @staticmethod
    def _normalize_interval(mean, std):
        one = torch.ones_like(std)
        inv = (next_down(one / std), next_up(one / std))
        lo, hi = (inv[0], inv[1]) if bool((std > 0).all()) else (torch.minimum(*inv), torch.maximum(*inv))
        scale = (lo, hi)
        return scale, _iv_neg(_iv_mul(_point(mean), scale))
