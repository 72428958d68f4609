"""BCP, box constraint propagation (Lee, Lee, Park, NeurIPS 2020, "Lipschitz-Certifiable Training with a Tight
Outer Bound"; sungyoon-lee/bcp ``BCP.py``): certified bounds and training loss for L2 balls.

Up to the final Linear layer ``z = W h + b``, BCP carries a ball ``||h - c||_2 <= r`` and a box
``lo <= h <= hi`` (``robustkern.bounds.lipschitz.propagate_ball`` with ``box=True``). A specification row
``C_s`` (``e_y - e_j`` for a margin) is then bounded over their intersection:

    C_s (W h + b) >= C_s (W c + b) - max { q . d : ||d||_2 <= r, lo - c <= d <= hi - c },   q = -(C_s W).

BCP's code approximates the maximiser by iterative clipping (``BCP_translation``, ``opt_iter`` rounds). Here the
maximum is bounded through its Lagrange dual (``support_ball_box``): for every ``mu >= 0``

    max_d q . d  <=  sum_k max_{l_k <= d_k <= u_k} (q_k d_k - mu d_k^2 / 2)  +  mu r^2 / 2,

each term attained at ``d_k = clip(q_k / mu, l_k, u_k)`` (``mu = 0``: the box corner). This is an upper bound for
any ``mu`` (weak duality), so a certificate does not depend on how well ``mu`` is chosen, and it equals the
maximum at the optimal ``mu`` (strong duality: the problem is convex and, as the box holds the centre, feasible
with ``r > 0``), which is where BCP's iteration converges. The optimal ``mu`` comes in one pass: with
``lam = 1 / mu``, ``||clip(lam q, l, u)||^2`` is a nondecreasing piecewise quadratic in ``lam`` whose breakpoints
are where coordinates saturate; sorting them and summing gives the piece where it crosses ``r^2`` and ``lam``
there in closed form. ``mu`` is held fixed under autograd (the gradient of the optimal value is the partial
derivative at the optimum).

Training loss (``bcp_loss``): the cross-entropy of the worst-case logits, ``robust_cross_entropy`` of the margins'
lower bounds (BCP's ``CE(translated logits)``), unwidened, with power-iteration norm estimates. Verification
(``sound=True``): float64, rigorous norm bounds, every rounding of the final step bounded (``gamma_n`` of the
sums; the computed ``d`` is within ``4u |d|`` of the exact maximiser, which changes each term by at most
``4u (|q d| + mu d^2)``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._numerics import gamma, next_down, next_up, tiny
from .ibp import params
from .lipschitz import _lower, propagate_ball, spec_center, upper_norms
from .module import BoundedModule
from .spec import margin_spec, robust_cross_entropy

__all__ = ["support_ball_box", "optimal_multiplier", "bcp_bounds", "bcp_loss"]

_U64 = 2.0 ** -53


@torch.no_grad()
def optimal_multiplier(q: Tensor, lower: Tensor, upper: Tensor, radius: Tensor) -> Tensor:
    """The Lagrange multiplier ``mu >= 0`` (q's shape without the last dimension) at which the dual bound of
    ``max {q . d : ||d|| <= r, lower <= d <= upper}`` is tight (0 where the box corner lies in the ball);
    ``lower`` is taken as ``min(lower, 0)`` and ``upper`` as ``max(upper, 0)``."""
    lo, hi = lower.clamp(max=0), upper.clamp(min=0)
    bound = torch.where(q > 0, hi, torch.where(q < 0, lo, torch.zeros_like(q)))       # saturation value
    q_safe = torch.where(q == 0, torch.ones_like(q), q)
    lam_sat = torch.where(q == 0, torch.full_like(q, float("inf")), bound / q_safe)   # where each coordinate saturates
    lam_sorted, order = torch.sort(lam_sat, dim=-1)
    b2 = bound.square().gather(-1, order)
    q2 = q.square().gather(-1, order)
    sat = torch.cumsum(b2, -1)                                         # saturated part at each breakpoint
    rest = torch.flip(torch.cumsum(torch.flip(q2, [-1]), -1), [-1]) - q2   # unsaturated part after it
    finite = torch.isfinite(lam_sorted)
    f = sat + torch.where(finite & (rest > 0), lam_sorted.square() * rest, torch.zeros_like(rest))
    r2 = radius.square().unsqueeze(-1)
    count = (f <= r2).sum(-1, keepdim=True)                              # breakpoints inside the ball
    n = q.shape[-1]
    all_in = count.squeeze(-1) >= n
    idx = (count - 1).clamp(min=0)
    s_i = torch.where(count > 0, sat.gather(-1, idx), torch.zeros_like(count, dtype=q.dtype))
    q_tot = q2.sum(-1, keepdim=True)
    r_i = torch.where(count > 0, rest.gather(-1, idx), q_tot)
    lam = torch.sqrt((r2 - s_i).clamp(min=0) / r_i.clamp(min=torch.finfo(q.dtype).tiny)).squeeze(-1)
    mu = torch.where(lam > 0, 1.0 / lam, torch.zeros_like(lam))
    return torch.where(all_in, torch.zeros_like(mu), mu)


def support_ball_box(q: Tensor, lower: Tensor, upper: Tensor, radius: Tensor, mu: Tensor | None = None,
                     sound: bool = False) -> Tensor:
    """An upper bound of ``max {q . d : ||d||_2 <= radius, lower <= d <= upper}`` over the last dimension (the
    dual bound at ``mu``, default ``optimal_multiplier``; module docstring). ``q`` (..., n), ``lower``/``upper``
    broadcastable to it, ``radius`` (...). With ``sound`` (float64 inputs) the rounding of the evaluation is
    bounded and added."""
    if mu is None:
        mu = optimal_multiplier(q, lower, upper, radius)
    mu = mu.detach()
    m = mu.unsqueeze(-1)
    big = torch.finfo(q.dtype).max
    lam = torch.where(m > 0, 1.0 / m.clamp(min=torch.finfo(q.dtype).tiny), torch.full_like(m, big))
    d = torch.minimum(torch.maximum(q * lam, lower), upper)
    terms = q * d - 0.5 * m * d.square()
    value = terms.sum(-1) + 0.5 * mu * radius.square()
    if not sound:
        return value
    n = q.shape[-1]
    mag = (q * d).abs().sum(-1) + mu * d.square().sum(-1) + mu * radius.square()
    slack = mag * (gamma(n + 8, _U64) + 8 * _U64) * (1 + 4 * _U64) + (n + 8) * tiny(q.dtype)
    return next_up(value + next_up(slack + 2 * _U64 * value.abs()))


def bcp_bounds(bm: BoundedModule, x: Tensor, eps, C: Tensor, *, norms: dict | None = None, sound: bool = True,
               x_min: float = 0.0, x_max: float = 1.0) -> Tensor:
    """BCP lower bounds (B, S) of ``C f(x')`` over ``||x' - x||_2 <= eps`` (and ``x_min <= x' <= x_max``).
    ``norms``: per-layer operator norms, estimates for training (``robustkern.bounds.lipschitz.estimated_norms``)
    or ``upper_norms(bm)`` for ``sound=True`` (float64, certified; computed here when None)."""
    if norms is None:
        if not sound:
            raise ValueError("bcp_bounds: training bounds (sound=False) need norms (estimated_norms)")
        norms = upper_norms(bm)
    state, last = propagate_ball(bm, x, eps, norms, box=True, sound=sound, x_min=x_min, x_max=x_max,
                                 stop_before_last=True)
    c, r = state.center, state.radius
    w, b = params(last, c.dtype)
    G, val, err = spec_center(C, w, b, c, sound)
    lo, hi = state.box.end_points(sound)
    lower, upper = (lo - c).unsqueeze(1), (hi - c).unsqueeze(1)
    if sound:
        lower, upper = next_down(lower), next_up(upper)
    q = -G
    mu = optimal_multiplier(q, lower, upper, r.unsqueeze(1).expand(q.shape[:2]))
    h = support_ball_box(q, lower, upper, r.unsqueeze(1), mu, sound)
    if not sound:
        return val - h
    E_G, e_val = err
    reach = torch.maximum(lower.abs(), upper.abs())           # |d| <= reach in the box
    e_dir = (E_G * reach).sum(-1)
    n = G.shape[-1]
    e_dir = next_up(e_dir * (1 + gamma(n + 2, _U64)) + n * tiny(c.dtype))
    return _lower(val, h, next_up(e_val + e_dir))


def bcp_loss(bm: BoundedModule, x: Tensor, y: Tensor, eps, *, norms: dict, x_min: float = 0.0,
             x_max: float = 1.0):
    """BCP's robust loss ``robust_cross_entropy`` of the margins' lower bounds (unwidened, training). Returns
    ``(loss, lb)``."""
    C = margin_spec(y, bm.num_outputs, bm._dtype())
    lb = bcp_bounds(bm, x, eps, C, norms=norms, sound=False, x_min=x_min, x_max=x_max)
    return robust_cross_entropy(lb), lb
