"""CAP, the convex outer adversarial polytope (Wong & Kolter 2018, "Provable defenses against adversarial
examples via the convex outer adversarial polytope"; Wong, Schmidt, Metzen, Kolter 2018, "Scaling provable
adversarial defenses"; locuslab/convex_adversarial): the dual-network bound and its robust loss, for L-inf and
L2 balls.

Relation to robustkern's CROWN. For ReLU networks the dual network of Wong & Kolter is the linear relaxation
whose ReLU lower line has the slope of the upper line: an unstable ReLU ``l < z < u`` is replaced by
``d z + t``, ``d = u / (u - l)``, ``0 <= t <= -d l`` (the parallelogram between ``d z`` and ``d (z - l)``), the
same relaxation for both bounds. Its bound on ``C f`` is ``BoundedModule.compute_bounds(method="CROWN",
relu_lower="same-slope")``: a backward pass from ``C`` with, for every ReLU, input bounds from the same
relaxation of the layers before it. robustkern's CROWN also intersects those intermediate bounds with IBP's and
concretises over the ball clipped to ``[x_min, x_max]``, both of which can only tighten CAP's bound (CAP's L2
ball is not clipped); it is sound in floating point with ``sound=True`` (float64 backward passes, rounding
bounded). That is ``cap_bounds(projections=0)``, the bound CAP verifies with; unwidened and unclipped it equals
convex_adversarial's ``DualNetwork`` bound wherever the IBP intersection does not bite (tested against the
transcription ``robustkern.reference.published.convex_adversarial``).

Random projections (``projections=k``, training at scale; Wong et al. 2018 Section 3.2). The intermediate
bounds are computed forwards: the linearised network (each unstable ReLU ``z -> d z + t``, ``t`` at its centre
``-d l / 2``) carries the centre ``h``, and a pre-activation's deviation from ``h`` is bounded by
``eps ||A_row||_* + sum_i sum_u |M_u| (-d_u l_u / 2)`` (``A`` the linear map from the input, ``M_u`` from the
relaxation offset ``t_u``, each ReLU layer ``i`` of the past). Instead of propagating identity matrices, ``k``
random directions are propagated and the norms estimated: for L2 inputs ``||A_row||_2 ~ ||A_row R||_2 / sqrt(k)``
with Gaussian ``R`` (convex_adversarial ``L2BallProj``), for L-inf inputs ``||A_row||_1 ~ median_k |A_row R|``
with standard Cauchy ``R`` (``InfBallProj``: the median of ``|Cauchy|`` is 1), and each ReLU layer's
``sum_u |M_u| c_u`` likewise by the median over ``k`` Cauchy directions scaled by ``c`` (``DualReLUProj``). A
term whose dimension is at most ``k`` is propagated exactly (identity directions). The original does so for the
input when its dimension is at most ``k`` too, and for a ReLU layer when the batch has at most ``k`` unstable units
in all; it also draws the input directions once per batch (``(1, k, ...)``), where they are drawn here per
example: the same law for each example's estimate. The final bound is the exact backward pass from ``C`` given
those estimated intermediate bounds. The estimate is random and not a bound: it is for training only
(``sound=True`` with projections is an error).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import UnsupportedLayerError
from .crown import crown_bounds
from .ibp import Box, params
from .lipschitz import chain_nodes
from .module import BoundedModule
from .precision import enter
from .spec import margin_spec, robust_cross_entropy
from ..ops import interval_input_box

__all__ = ["cap_bounds", "cap_loss", "projected_relu_bounds"]


def _relaxation(lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """``(d, c)``: the same-slope ReLU relaxation ``z -> d z + t``, ``0 <= t <= c`` (the guard of robustkern's
    CROWN relaxation, so the backward pass sees the same slopes)."""
    lm = lower.clamp(max=0)
    up = torch.maximum(upper.clamp(min=0), lm + 1e-8)
    d = up / (up - lm)
    return d, -lm * d


def _directions(shape: tuple, k: int, kind: str, like: Tensor, generator) -> tuple[Tensor, bool]:
    """``(R, exact)``: (B, k', *shape) directions, the identity when the dimension is at most ``k`` (exact),
    else ``k`` Gaussian (``kind="normal"``) or standard Cauchy (``"cauchy"``) draws per example."""
    B, n = like.shape[0], math.prod(shape)
    if n <= k:
        eye = torch.eye(n, dtype=like.dtype, device=like.device).reshape(1, n, *shape)
        return eye.expand(B, n, *shape), True
    R = torch.empty((B, k) + tuple(shape), dtype=like.dtype, device=like.device)
    if kind == "normal":
        R.normal_(generator=generator)
    else:   # standard Cauchy by its inverse CDF, tan(pi (U - 1/2)): the law of cauchy_, several times faster on CPU
        R.uniform_(generator=generator).sub_(0.5).mul_(math.pi).tan_()
    return R, False


def _l1_estimate(P: Tensor, exact: bool) -> Tensor:
    """``sum |row|`` (exact directions) or its Cauchy median estimate, over dim 1 of (B, k, ...)."""
    return P.abs().sum(1) if exact else P.abs().median(1).values


def projected_relu_bounds(bm: BoundedModule, x: Tensor, eps: Tensor, norm: float, projections: int,
                          generator: torch.Generator | None = None) -> dict[str, tuple[Tensor, Tensor]]:
    """Estimated bounds ``{ReLU input node: (lower, upper)}`` (B, *shape) of every pre-activation, by the
    forward random-projection scheme of the module docstring with ``projections`` directions per term.
    ``x`` and ``eps`` (B,) in the working precision; no rounding control (training)."""
    chain = chain_nodes(bm.nodes)
    shapes = bm.node_shapes()
    coeffs = bm._coefficients(x, False)
    B = x.shape[0]
    h = x
    kind = "normal" if norm == 2 else "cauchy"
    P, p_exact = _directions(tuple(x.shape[1:]), projections, kind, x, generator)
    offsets: list[tuple[Tensor, bool]] = []          # per past ReLU layer: propagated Cauchy directions x c/2
    bounds: dict = {}

    def each(fn, t: Tensor) -> Tensor:               # apply a per-example map to (B, k, ...) directions
        out = fn(t.reshape((-1,) + tuple(t.shape[2:])))
        return out.reshape((B, t.shape[1]) + tuple(out.shape[1:]))

    for node in chain:
        kind_n = node.kind
        if kind_n in ("linear", "conv2d"):
            w, b = params(node, x.dtype)
            if kind_n == "linear":
                lin = (lambda t, w=w: F.linear(t, w))
            else:
                m = node.module
                lin = (lambda t, w=w, m=m: F.conv2d(t, w, None, m.stride, m.padding, m.dilation, m.groups))
            h = lin(h)
            if b is not None:
                h = h + b.reshape((1, -1) + (1,) * (h.dim() - 2))
            P = each(lin, P)
            offsets = [(each(lin, T), ex) for T, ex in offsets]
        elif kind_n in ("batchnorm", "normalize"):
            s, t = coeffs.get(node, x.dtype, x.device)[:2]
            shape = (1, -1) + (1,) * (h.dim() - 2)
            h = h * s.reshape(shape) + t.reshape(shape)
            sk = s.reshape((1,) + shape)
            P = P * sk
            offsets = [(T * sk, ex) for T, ex in offsets]
        elif kind_n == "relu":
            spread = eps.reshape((-1,) + (1,) * (h.dim() - 1)) * (
                P.norm(dim=1) / (1.0 if p_exact else math.sqrt(P.shape[1])) if norm == 2 else _l1_estimate(P, p_exact))
            for T, ex in offsets:
                spread = spread + _l1_estimate(T, ex)
            lower, upper = h - spread, h + spread
            bounds[node.inputs[0]] = (lower, upper)
            d, c = _relaxation(lower, upper)
            h = d * h + 0.5 * c
            dk = d.unsqueeze(1)
            P = P * dk
            offsets = [(T * dk, ex) for T, ex in offsets]
            R, exact = _directions(tuple(h.shape[1:]), projections, "cauchy", h, generator)
            offsets.append((R * (0.5 * c).unsqueeze(1), exact))
        elif kind_n == "reshape":
            out_shape = tuple(shapes[node.name])
            h = h.reshape((B,) + out_shape)
            P = P.reshape((B, P.shape[1]) + out_shape)
            offsets = [(T.reshape((B, T.shape[1]) + out_shape), ex) for T, ex in offsets]
        elif kind_n != "identity":  # pragma: no cover - chain_nodes admits only the kinds above
            raise UnsupportedLayerError(kind_n)
    return bounds


def cap_bounds(bm: BoundedModule, x: Tensor, eps, C: Tensor, *, norm: float = 2.0, sound: bool = True,
               projections: int = 0, x_min: float = 0.0, x_max: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """CAP lower bounds (B, S) of ``C f(x')`` over the L-p ball (``norm`` 2 or inf) of radius ``eps``.
    ``projections=0``: the dual-network bound itself (CROWN with same-slope ReLU relaxations; with ``sound`` a
    certificate); ``projections=k``: the random-projection estimate for training (module docstring)."""
    if projections < 0:
        raise ValueError(f"cap_bounds: projections must be >= 0, got {projections}")
    if projections == 0:
        lb, _ = bm.compute_bounds(x, eps, norm=norm, method="CROWN", C=C, x_min=x_min, x_max=x_max, sound=sound,
                                  bound_upper=False, relu_lower="same-slope")
        return lb
    if sound:
        raise ValueError("cap_bounds: the random-projection estimate is not a bound; use projections=0 for a "
                         "certificate (sound=True)")
    inp = enter(x, eps, norm, x_min, x_max, None, bm._dtype())
    bounds = projected_relu_bounds(bm, inp.xw, inp.eps, inp.norm, projections, generator)
    boxes = {bm.nodes[0].name: Box(*interval_input_box(inp.xw, inp.eps, inp.x_min, inp.x_max, sound=False))}
    for name, (lo, hi) in bounds.items():
        boxes[name] = Box((lo + hi) * 0.5, (hi - lo) * 0.5)
    lb, _ = crown_bounds(bm.nodes, bm.node_shapes(), boxes, C, bm.num_outputs, "CROWN-IBP", bound_lower=True,
                         bound_upper=False, sound=False, coeffs=bm._coefficients(inp.x, False), norm=inp.norm,
                         x=inp.xw, eps=inp.eps, relu_lower="same-slope")
    return lb


def cap_loss(bm: BoundedModule, x: Tensor, y: Tensor, eps, *, norm: float = 2.0, projections: int = 0,
             x_min: float = 0.0, x_max: float = 1.0, generator: torch.Generator | None = None):
    """CAP's robust loss (convex_adversarial ``robust_loss``): the cross-entropy of ``-[0, lb]`` for the
    margins' lower bounds ``lb``, exact (``projections=0``) or estimated. Returns ``(loss, lb)``; unwidened."""
    C = margin_spec(y, bm.num_outputs, bm._dtype())
    lb = cap_bounds(bm, x, eps, C, norm=norm, sound=False, projections=projections, x_min=x_min, x_max=x_max,
                    generator=generator)
    return robust_cross_entropy(lb), lb
