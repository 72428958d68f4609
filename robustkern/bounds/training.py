"""CROWN-IBP training loss, epsilon / beta schedules and verified accuracy.

CROWN-IBP (Zhang et al. 2020, "Towards Stable and Efficient Training of Verifiably Robust Neural Networks"):
the margin lower bound mixes the CROWN-IBP and IBP bounds, ``lb = beta * lb_crown_ibp + (1 - beta) * lb_ibp``,
with ``beta`` going from 1 to 0 while eps ramps up (``crown_ibp_beta``), and the loss is
``kappa * CE(f(x), y) + (1 - kappa) * CE(-[0, lb], 0)``.

Loss fusion (``loss_fusion=True``; Xu et al. 2020, auto_LiRPA's ``CrossEntropyWrapper`` with
``bound_opts={"loss_fusion": True}``): the robust CE is bounded directly from one backward specification row
(``robustkern.bounds.loss_fusion``) instead of the ``K - 1`` margins. With a shift ``M``, the CROWN-IBP and IBP
upper bounds ``S_c, S_i`` of ``exp(-M) + sum_{j != y} exp(z_j - z_y - M)`` are mixed as auto_LiRPA's
``examples/vision/cifar_training.py`` does (``ub = cub * factor + iub * (1 - factor)``, then
``mean(log(ub) + max_input)``):

    robust = M + log(beta * S_c + (1 - beta) * S_i)

a bound on the robust CE for every beta (a convex combination of two upper bounds of the same sum). This
mixes in the sum, not in the margins as the default path does, and by concavity of log it is >= ``beta * L_c
+ (1 - beta) * L_i`` of the two losses. ``info["lb"]`` is None (no margin bounds exist) and
``info["fused_ub"]`` holds the per-example bounds. Differences from auto_LiRPA: ``M = max(0, max_j u_j)``
(auto_LiRPA's ``max_input`` also includes the label's own 0 margin, so it is the same), the clean forward
always runs first (auto_LiRPA skips ``regular_ce`` in training), ``kappa`` mixes in the clean CE like the
default path (auto_LiRPA's example uses the robust loss alone there), and ``beta == 0`` skips the backward
pass entirely (auto_LiRPA skips it only below ``factor < 1e-50``).
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .batch_stats import recorded_forward
from .loss_fusion import fused_sum_bounds, log_bound
from .module import BoundedModule, canonical_method
from .spec import margin_spec, robust_cross_entropy

__all__ = ["crown_ibp_loss", "crown_ibp_beta", "smoothed_eps", "linear_eps", "verified_accuracy"]


def smoothed_eps(step: int, start: int, length: int, eps: float, mid: float = 0.25, beta: float = 4.0) -> float:
    """The "smoothed" epsilon ramp of DeepMind's IBP code (Gowal et al. 2018, ``smooth_schedule``), which
    auto_LiRPA's ``SmoothedScheduler`` and CROWN-IBP's "smoothed" schedule use, over the steps ``start`` to
    ``start + length``: 0 up to ``start``; then ``a (step - start)^beta`` up to the switch step
    ``start + m``, ``m = int(length * mid)``; then linear from there to ``eps`` at ``start + length``; ``eps``
    after. ``a = eps / ((length - m) beta m^(beta-1) + m^beta)`` makes the slope continuous at the switch.
    With ``m = 0`` (fewer than ``1 / mid`` steps) the ramp is linear from ``start``. ``beta >= 2``,
    ``0 <= mid <= 1``. auto_LiRPA's batch ``b`` (from 1) of epoch length ``L`` is
    ``smoothed_eps(b - 1, (start_epoch - 1) * L, length_epochs * L, max_eps, mid, beta)``."""
    if not beta >= 2.0:
        raise ValueError(f"smoothed_eps: beta must be >= 2, got {beta}")
    if not 0.0 <= mid <= 1.0:
        raise ValueError(f"smoothed_eps: mid must lie in [0, 1], got {mid}")
    if step <= start:
        return 0.0
    if length <= 0 or step >= start + length:
        return float(eps)
    m = int(length * mid)
    mid_value = 0.0
    if m > 0:
        p = float(m) ** (beta - 1.0)
        a = eps / ((length - m) * beta * p + m * p)
        if step - start < m:
            return float(a * float(step - start) ** beta)
        mid_value = a * float(m) ** beta
    return float(min(mid_value + (eps - mid_value) * (step - start - m) / (length - m), eps))


def crown_ibp_beta(eps_now: float, eps_max: float, final_beta: float = 0.0) -> float:
    """CROWN-IBP's beta: 1 at eps 0, ``final_beta`` at ``eps_max`` (linear in eps), as
    ``factor = (max_eps - eps) / max_eps`` in auto_LiRPA's examples."""
    if eps_max <= 0:
        return 1.0
    f = min(max(eps_now / eps_max, 0.0), 1.0)
    return float((1 - f) * 1.0 + f * final_beta)


def linear_eps(step: int, start: int, length: int, eps: float) -> float:
    """The linear epsilon ramp of DeepMind's IBP code (Gowal et al. 2018, ``linear_schedule``), which
    CROWN-IBP's "linear" schedule and auto_LiRPA's ``LinearScheduler`` use: 0 up to ``start``, then linear to
    ``eps`` at ``start + length``, ``eps`` after; ``eps`` at every step when ``length <= 0`` (a ramp with no
    length has ended before it starts, as DeepMind's ``init_step == final_step``)."""
    if length <= 0:
        return float(eps)
    return float(eps * min(max((step - start) / length, 0.0), 1.0))


def crown_ibp_loss(bm: BoundedModule, x: Tensor, y: Tensor, eps, *, beta: float = 1.0, kappa: float = 0.0,
                   norm: float = math.inf, x_min: float = 0.0, x_max: float = 1.0, loss_fusion: bool = False,
                   sound: bool = False, relu_lower: str = "adaptive", reduction: str = "mean"):
    """The CROWN-IBP training loss. Returns ``(loss, info)`` with ``info`` holding ``natural`` (clean CE),
    ``robust`` (robust CE), ``lb`` (mixed margin lower bounds (B, K-1)) and ``logits``. The clean forward
    runs first (training-mode BatchNorm bounds then use the clean batch's statistics). ``sound=False`` by
    default: training needs no rounding-error widening. ``beta = 0`` is plain IBP, ``beta = 1`` plain
    CROWN-IBP. ``loss_fusion=True``: the robust CE is bounded directly from one backward specification row
    (see the module docstring); then ``info["lb"]`` is None and ``info["fused_ub"]`` holds the per-example
    robust CE bounds."""
    if not 0.0 <= beta <= 1.0 or not 0.0 <= kappa <= 1.0:
        raise ValueError(f"crown_ibp_loss: beta and kappa must lie in [0, 1], got {beta}, {kappa}")
    if sound:       # sound bounds enclose the exact batch statistics themselves
        logits, stats = bm(x), None
    else:           # the clean forward's own batch statistics, recorded in this call
        logits, stats = recorded_forward(bm.model, bm.nodes, x)
    natural = F.cross_entropy(logits, y, reduction=reduction)
    if loss_fusion:
        s_c, s_i, M = fused_sum_bounds(bm, x, y, eps, norm, x_min=x_min, x_max=x_max, crown=beta > 0.0,
                                       ibp=beta < 1.0, sound=sound, relu_lower=relu_lower, stats=stats)
        s = s_i if beta == 0.0 else s_c if beta == 1.0 else beta * s_c + (1 - beta) * s_i
        fused = log_bound(s, M, sound, logits.dtype)
        robust = fused.mean() if reduction == "mean" else fused.sum() if reduction == "sum" else fused
        loss = _mix(kappa, natural, robust)
        return loss, {"natural": natural, "robust": robust, "lb": None, "fused_ub": fused, "logits": logits}
    inp = bm._enter(x, eps, norm, x_min, x_max, margin_spec(y, bm.num_outputs, dtype=bm._dtype()))
    if beta == 0.0:
        lb = bm._bounds(inp, "IBP", sound, True, False, stats=stats)[0]
    else:
        out = bm._bounds(inp, "CROWN-IBP", sound, True, False, relu_lower, with_ibp=True, stats=stats)
        lb = out[0] if beta == 1.0 else beta * out[0] + (1 - beta) * out[2]
    robust = robust_cross_entropy(lb, reduction=reduction)
    loss = _mix(kappa, natural, robust)
    return loss, {"natural": natural, "robust": robust, "lb": lb, "logits": logits}


def _mix(kappa: float, natural: Tensor, robust: Tensor) -> Tensor:
    """``kappa * natural + (1 - kappa) * robust``; at the end weights the other term is left out, so that the
    backward pass does not run through a computation weighted by 0 (the clean forward, for kappa = 0)."""
    if kappa == 0.0:
        return robust
    if kappa == 1.0:
        return natural
    return kappa * natural + (1 - kappa) * robust


def verified_accuracy(model: nn.Module, x: Tensor, y: Tensor, eps, norm: float = math.inf,
                      methods=("IBP", "CROWN-IBP", "CROWN"), dtype: torch.dtype | None = None, *,
                      x_min: float = 0.0, x_max: float = 1.0, return_mask: bool = False,
                      crown_batch_size: int | None = None):
    """The fraction of examples whose label is verified: some method in ``methods`` proves every margin
    ``z_y - z_j`` (j != y) positive over the ball (sound bounds, eval-mode model). Methods run in order, each
    only on the examples not verified yet. ``dtype=torch.float64`` runs on a float64 copy of the model.
    With ``return_mask`` also the (B,) boolean mask."""
    names = [canonical_method(m) for m in methods]
    if dtype is not None and dtype not in (torch.float32, torch.float64):
        raise ValueError(f"verified_accuracy: dtype must be float32 or float64, got {dtype}")
    m = model
    if dtype is not None and next(model.parameters()).dtype != dtype:
        m = copy.deepcopy(model).to(dtype)
    was = m.training
    m.eval()
    try:
        xd = x                    # entered by compute_bounds exactly (a float64 x is not rounded to the model's dtype)
        m_dtype = next(m.parameters()).dtype
        bm = BoundedModule(m, xd)
        eps_t = torch.as_tensor(eps, dtype=None if isinstance(eps, torch.Tensor) else torch.float64,
                                device=xd.device)   # a Python float stays exact: compute_bounds rounds it up
        eps_t = eps_t.expand(x.shape[0]) if eps_t.dim() == 0 else eps_t
        verified = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        for name in names:
            todo = (~verified).nonzero().flatten()
            if todo.numel() == 0:
                break
            C = margin_spec(y[todo], bm.num_outputs, dtype=m_dtype)
            with torch.no_grad():
                lb, _ = bm.compute_bounds(xd[todo], eps_t[todo], norm=norm, method=name, C=C, x_min=x_min,
                                          x_max=x_max, sound=True, bound_upper=False,
                                          crown_batch_size=crown_batch_size)
            verified[todo[(lb > 0).all(1)]] = True
    finally:
        m.train(was)
    acc = float(verified.float().mean()) if x.shape[0] else 0.0
    return (acc, verified) if return_mask else acc
