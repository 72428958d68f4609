"""Loss fusion: an upper bound of the robust cross-entropy from a one-row backward pass.

Loss fusion (Xu et al. 2020, "Automatic Perturbation Analysis for Scalable Certified Robustness and Beyond",
NeurIPS, Sec. 3.3 / App. "loss fusion"; auto_LiRPA ``CrossEntropyWrapper`` + ``bound_opts={"loss_fusion":
True}``, ``examples/vision/cifar_training.py``) bounds the loss itself instead of the ``K - 1`` margins. For
logits ``z = f(x')`` and label ``y`` the cross-entropy is

    CE(z, y) = log S(m),     S(m) = 1 + sum_{j != y} exp(m_j),     m_j = z_j - z_y,

and ``max_{x' in ball} CE`` is bounded from above as follows (all steps hold for every ``x'`` in the ball).

1. Margin intervals. IBP with the margin specification folded into the last linear layer gives
   ``l_j <= m_j <= u_j`` (``robustkern.bounds.ibp``; auto_LiRPA's ``_IBP_loss_fusion`` folds the same way).
2. Shift. ``M = max(0, max_j u_j)`` (detached; auto_LiRPA's ``BoundExp.max_input``):
   ``CE = M + log S_M`` with ``S_M = exp(-M) + sum_j exp(m_j - M)``, every term in (0, 1].
   The final bound does not depend on ``M`` in real arithmetic (every term below scales by ``exp(-M)``);
   ``M`` only keeps ``exp`` from overflowing.
3. exp relaxation (upper side only). ``t -> exp(t - M)`` is convex, so on ``[l_j, u_j]`` it lies below its
   chord. For ANY slope ``k_j`` the line ``g_j(m) = k_j m + d_j`` with
       ``d_j = max(exp(l_j - M) - k_j l_j, exp(u_j - M) - k_j u_j)``
   is >= ``exp(m - M)`` on the whole interval: ``g_j - exp(. - M)`` is concave, so its minimum over the
   interval is at an end point, where it is >= 0 by the choice of ``d_j``. The chord slope
   ``k_j = (exp(u_j - M) - exp(l_j - M)) / (u_j - l_j)`` (``exp(l_j - M)`` when ``u_j = l_j``) makes both
   end points tight, i.e. ``g_j`` is the chord (auto_LiRPA's ``BoundExp`` upper relaxation in its
   loss-fusion branch). Writing ``d_j`` from the end points, instead of ``exp(l) - k l`` alone, keeps the
   line valid for a rounded ``k_j`` (see floating point below).
   The lower tangent of exp is not needed: only an upper bound of the loss is.
4. One backward pass. ``S_M <= exp(-M) + sum_j d_j + sum_j k_j m_j`` and ``sum_j k_j m_j = a^T z`` with the
   single specification row ``a = sum_j k_j (e_j - e_y)`` (``a_j = k_j``, ``a_y = -sum_j k_j``; ``k_j >= 0``).
   Its upper bound ``U >= max a^T f(x')`` comes from one CROWN-IBP (or CROWN) backward pass of
   ``robustkern.bounds.crown`` started from ``a``: one row instead of ``K - 1``, which is the speed-up.
5. log needs no linear relaxation: it is increasing and applied to the scalar bound, so
   ``CE <= M + log(exp(-M) + sum_j d_j + U)``. This is never looser than relaxing log by a tangent at any
   point ``s0`` (concavity: ``log(s) <= log(s0) + (s - s0) / s0``, with equality at ``s = s0``), which is
   what auto_LiRPA does too (its wrapper ends at the sum; ``log(ub) + max_input`` is taken outside).

``method="IBP"`` skips step 3-4: ``S_M <= exp(-M) + sum_j exp(u_j - M)``, which equals
``robust_cross_entropy`` of the IBP margin lower bounds ``-u``.

Relations (tested): the bound is >= CE at every point of the ball; at ``eps = 0`` it equals the clean CE
(the intervals are points, the chord is exact); for a model whose logits are affine in the input (one
Linear layer) the backward bound of ``a^T z`` is exact, so the fused CROWN-IBP bound lies between the exact
robust CE and the IBP robust CE (the chord at ``u_j`` equals ``exp(u_j - M)`` and ``max sum k_j m_j <=
sum k_j u_j``). For deeper models it is not ordered against the plain CROWN-IBP robust CE (which bounds every
margin by its own backward pass): the exp chord on the IBP interval is looser than the exp at the CROWN-IBP
margin bound, and a single joint row can be tighter than ``K - 1`` separate ones.

Floating point (``sound=True``). The margin intervals are the widened IBP boxes; step 3 runs in float64 with
``exp`` rounded up (relative ``8u + 2u|t|`` for the argument's rounding) and ``d_j`` rounded up
(``gamma_2``); the slopes are rounded to multiples of ``2^(e - 40)`` (``e`` the exponent of the largest
slope), so that ``a_y = -sum_j k_j`` is computed exactly and the row ``a`` is exactly the sum of the
relaxations' slopes (any slope is valid, step 3); ``U`` is ``robustkern.bounds.crown``'s sound upper bound
(its guarantee: see that module); the final sum, ``log`` and ``+ M`` are widened by ``gamma`` terms and the
result is rounded up to the working precision. ``sound=False`` (training) computes in the working precision.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._numerics import gamma, ieee_products, round_up, unit_roundoff
from .crown import crown_bounds
from .ibp import Box, propagate
from .module import BoundedModule, canonical_method
from .spec import margin_spec

__all__ = ["exp_chord_upper", "fused_robust_ce_upper", "fused_sum_bounds"]


def _exp_up(t: Tensor, sound: bool) -> Tensor:
    """``exp(t)``, rounded up when ``sound`` (float64 ``exp`` is within 1 ulp; the argument ``t = e - M`` was
    itself rounded by at most ``u |t|``, which moves ``exp`` by a factor ``exp(u |t|)``)."""
    v = torch.exp(t)
    if sound:
        u = unit_roundoff(t.dtype)
        v = v * (1 + 8 * u) * (1 + 2 * u * t.abs().clamp(max=1e6))
    return v


def exp_chord_upper(lower: Tensor, upper: Tensor, shift: Tensor | float = 0.0, sound: bool = False
                    ) -> tuple[Tensor, Tensor]:
    """``(k, d)`` with ``exp(m - shift) <= k m + d`` for every ``m`` in ``[lower, upper]`` (element-wise), the
    chord of the convex function (step 3 of the module docstring). ``d`` is computed from both end points, so
    the line stays valid for a rounded ``k``; with ``sound`` ``k`` is rounded (see ``_round_slopes``) and ``d``
    rounded up. An infinite or NaN end point gives ``k = 0`` and ``d = exp(upper - shift)`` (``+inf`` when
    ``upper`` is not finite)."""
    lo, hi = lower - shift, upper - shift
    e_lo, e_hi = _exp_up(lo, sound), _exp_up(hi, sound)
    width = hi - lo
    k = torch.where(width > 0, (e_hi - e_lo) / torch.where(width > 0, width, torch.ones_like(width)), e_lo)
    finite = torch.isfinite(lower) & torch.isfinite(upper)
    k = torch.where(finite, k.clamp(min=0), torch.zeros_like(k))
    if sound:
        k = _round_slopes(k)
    d_lo, d_hi = e_lo - k * lower, e_hi - k * upper
    if sound:
        g2 = gamma(2, unit_roundoff(k.dtype))
        d_lo = d_lo + g2 * (e_lo + (k * lower).abs())
        d_hi = d_hi + g2 * (e_hi + (k * upper).abs())
    d = torch.maximum(d_lo, d_hi)
    inf = torch.full_like(d, math.inf)
    d = torch.where(finite, d, torch.where(torch.isfinite(upper) | (upper < 0), _exp_up(hi, sound), inf))
    return k, d


def _round_slopes(k: Tensor) -> Tensor:
    """Round the non-negative slopes (B, J) of each row to multiples of ``q = 2^(e - 40)``, ``e`` the exponent
    of the row's largest slope: then every sum of up to ``2^12`` of them is exact in float64 (53 bits), so the
    specification row ``a`` below is the exact sum of the relaxations. Gradients pass straight through."""
    kmax = k.amax(dim=1, keepdim=True)
    _, e = torch.frexp(torch.where(kmax > 0, kmax, torch.ones_like(kmax)))
    q = torch.ldexp(torch.ones_like(kmax), (e - 40).to(torch.int32))
    kr = torch.round(k / q) * q
    return k + (kr - k).detach()


def _check_labels(y, B: int, K: int):
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != B:
        got = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"fused_robust_ce_upper: y must be a ({B},) tensor of labels, got {got}")
    if y.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.bool):
        raise TypeError(f"fused_robust_ce_upper: y must hold integer class labels, got {y.dtype}")
    if K > 4096:
        raise ValueError(f"fused_robust_ce_upper: at most 4096 classes are supported, got {K}")


def _fused_sum_bounds(bm: BoundedModule, x: Tensor, y: Tensor, eps, norm: float = math.inf, *,
                      x_min: float = 0.0, x_max: float = 1.0, crown: bool = True, ibp: bool = True,
                      method: str = "CROWN-IBP", sound: bool = True, relu_lower: str = "adaptive",
                      crown_batch_size: int | None = None, check_values: bool = True, stats: dict | None = None):
    """Upper bounds of the shifted sum ``S_M = exp(-M) + sum_{j != y} exp(z_j - z_y - M)`` over the ball:
    returns ``(s_backward, s_ibp, M)`` (each (B,); a side not requested is None), computed in float64 when
    ``sound`` else in the model's precision. ``M`` (B,) is detached. ``CE <= M + log(s)`` for either bound and
    for any convex combination of the two (as auto_LiRPA mixes them in ``cifar_training.py``). ``method``:
    "CROWN-IBP" or "CROWN" for the backward bound (the exp chord's interval comes from IBP either way).
    ``stats``: batch statistics the caller recorded in the same call (``batch_stats.recorded_forward``)."""
    method = canonical_method(method)
    if crown and method == "IBP":
        raise ValueError("fused_sum_bounds: the backward bound needs method 'CROWN-IBP' or 'CROWN'")
    inp = bm._enter(x, eps, norm, x_min, x_max, None, check_values)
    xs, eps_t, norm = inp.xw, inp.eps, inp.norm
    B, K = xs.shape[0], bm.num_outputs
    _check_labels(y, B, K)
    C = margin_spec(y, K, dtype=xs.dtype)                   # rows e_y - e_j: C z = -m
    coeffs = bm._coefficients(inp.x, sound, stats)
    box, bounds = propagate(bm.nodes, bm.groups, xs, eps_t, norm, inp.x_min, inp.x_max, C, sound, coeffs)
    lo_c, hi_c = Box(box.mid.flatten(1), box.rad.flatten(1)).end_points(sound)
    cdtype = torch.float64 if sound else xs.dtype
    nan = torch.isnan(lo_c) | torch.isnan(hi_c)
    l_m = torch.where(nan, torch.full_like(hi_c, -math.inf), -hi_c).to(cdtype)   # l_j <= m_j <= u_j
    u_m = torch.where(nan, torch.full_like(lo_c, math.inf), -lo_c).to(cdtype)
    M = torch.clamp(u_m.detach().nan_to_num(0.0, posinf=0.0, neginf=0.0).amax(dim=1), min=0.0)
    e0 = _exp_up(-M, sound)
    s_ibp = s_back = None
    if ibp:
        terms = _exp_up(u_m - M.unsqueeze(1), sound)
        s_ibp = e0 + terms.sum(1)
        if sound:
            s_ibp = s_ibp * (1 + gamma(K + 1, unit_roundoff(cdtype)))
    if crown:
        k, d = exp_chord_upper(l_m, u_m, M.unsqueeze(1), sound)           # (B, K-1) each
        a = -(k.unsqueeze(1) @ C.to(cdtype))                              # (B, 1, K): a^T z = k^T m
        _, U = crown_bounds(bm.nodes, bm.node_shapes(), bounds, a, K, method, bound_lower=False, bound_upper=True,
                            sound=sound, coeffs=coeffs, norm=norm, x=xs, eps=eps_t, relu_lower=relu_lower,
                            crown_batch_size=crown_batch_size)
        U = U[:, 0].to(cdtype)
        s_back = e0 + d.sum(1) + U
        if sound:
            mag = e0 + d.abs().sum(1) + U.abs()
            s_back = s_back + gamma(K + 1, unit_roundoff(cdtype)) * mag
        s_back = torch.where(torch.isnan(s_back), torch.full_like(s_back, math.inf), s_back)
    return s_back, s_ibp, M



def fused_sum_bounds(bm: BoundedModule, x: Tensor, *args, **kwargs):
    with ieee_products():  # IEEE products, autocast off: TF32 or bf16 would break the rounding-error bounds
        return _fused_sum_bounds(bm, x, *args, **kwargs)


fused_sum_bounds.__doc__ = _fused_sum_bounds.__doc__ + (
    "\n\n    Every product runs in IEEE float32/float64 with autocast off.")

def log_bound(s: Tensor, M: Tensor, sound: bool, work: torch.dtype) -> Tensor:
    """``M + log(s)`` rounded up to ``work`` when ``sound`` (``log`` within 1 ulp, the sum by ``gamma_2``)."""
    s = s.clamp(min=torch.finfo(s.dtype).tiny)
    v = torch.log(s)
    if sound:
        u = unit_roundoff(v.dtype)
        v = v + 4 * u * v.abs()
        v = v + M + gamma(2, u) * (v.abs() + M) + torch.finfo(v.dtype).tiny
        return round_up(v, work)
    return (v + M).to(work)


def fused_robust_ce_upper(bm: BoundedModule, x: Tensor, y: Tensor, eps, norm: float = math.inf,
                          method: str = "CROWN-IBP", *, x_min: float = 0.0, x_max: float = 1.0, sound: bool = True,
                          relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                          reduction: str = "none", check_values: bool = True) -> Tensor:
    """An upper bound of ``max CE(f(x'), y)`` over ``||x' - x|| <= eps`` (``norm`` inf or 2) and
    ``x_min <= x' <= x_max``, per example (``reduction="none"``, (B,)) or its mean/sum, by loss fusion (see the
    module docstring): IBP margin intervals, the exp chord, one backward pass from a single specification row.
    ``method``: "CROWN-IBP" (default), "CROWN" (CROWN intermediate bounds for the ReLUs) or "IBP" (no backward
    pass; equals ``robust_cross_entropy`` of the IBP margin bounds). ``sound=True`` (default) makes it a bound
    on the real-valued network (see the module docstring); training uses ``sound=False``. Differentiable
    w.r.t. the model's parameters (``M`` is detached; the bound does not depend on it)."""
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"fused_robust_ce_upper: reduction must be 'none', 'mean' or 'sum', got {reduction!r}")
    name = canonical_method(method)
    s_back, s_ibp, M = fused_sum_bounds(bm, x, y, eps, norm, x_min=x_min, x_max=x_max, crown=name != "IBP",
                                        ibp=name == "IBP", method=name if name != "IBP" else "CROWN-IBP",
                                        sound=sound, relu_lower=relu_lower, crown_batch_size=crown_batch_size,
                                        check_values=check_values)
    out = log_bound(s_ibp if name == "IBP" else s_back, M, sound, bm._dtype())
    if reduction == "mean":
        return out.mean()
    return out.sum() if reduction == "sum" else out
