"""CROWN-IBP training with free ReLU lower slopes: Loss Landscape Matters (Lee, Lee, Park, NeurIPS 2021, "Towards
Better Understanding of Training Certifiably Robust Models against Adversarial Examples"; sungyoon-lee/
LossLandscapeMatters ``train.py`` ``Train_calloss_ours``, ``bound_layers.py`` ``BoundReLU.bound_backward``), and
the other relaxations that paper compares.

CROWN-IBP bounds the margins with IBP for the ReLU input bounds and one backward linear relaxation from the
specification; every unstable ReLU (``l < 0 < u``) needs a lower slope ``d`` in [0, 1]. The paper's method
("ours") treats the slopes as free variables, one per neuron and example (shared by the specification rows):

1. ``d`` uniform in [0, 1] (stable neurons: 1 active, 0 inactive), the robust loss ``L(d)`` computed with them;
2. one signed-gradient step ``d <- clip(d - 2 sign(dL/dd), 0, 1)`` (so each slope lands on 0 or 1, or stays
   where the gradient is 0); the multistep variant takes 7 steps of 0.1, each from the gradient at the current
   slopes (``steps``, ``step_size``);
3. the loss recomputed with the stepped slopes (held constant) and back-propagated to the weights.

The loss is CROWN-IBP's: ``lb = beta lb_CROWN-IBP + (1 - beta) lb_IBP``, ``kappa CE(f(x), y) + (1 - kappa)
CE(-[0, lb], y)``; with ``beta`` 0 there is no backward pass and no step (the original steps only when ``beta
>= 1e-5``). The slopes do not change the IBP bounds, so the clean forward and IBP run once: the step and the
final loss reuse them (the original runs the whole loss twice; the numbers are the same).

Relaxations (``relaxation``): "ours" (above); "uniform" and "binary" (random slopes, uniform in [0, 1] or 0/1 with
probability 1/2, no step); "adaptive" (CROWN-IBP's ``1[u > -l]``), "same-slope" (``d`` = the upper slope,
CAP/Fast-Lin), "zero-lb" and "one-lb" (``d`` = 0, 1): the fixed rules of ``robustkern.ops.crown_relu_backward``.
``frozen`` (the paper's ``crown-interval-frozen``): the backward pass goes through the last ``frozen + 1`` layers
only and is concretised over the IBP box before them.

Random slopes are drawn per ReLU in reverse graph order, each of shape (B, 1, *the ReLU's input shape) with
``torch.rand`` / ``torch.randint`` on ``generator`` (the original's ``torch.rand_like`` of its ``(B, 1, ...)``
slope tensor, in its backward order), so a seeded run draws the original's numbers on the same device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .batch_stats import recorded_forward
from .module import BoundedModule
from .spec import margin_spec, robust_cross_entropy
from .training import _mix

__all__ = ["RELAXATIONS", "relu_slope_shapes", "random_slopes", "slope_step", "crown_ibp_slope_loss"]

RELAXATIONS = ("ours", "uniform", "binary", "adaptive", "same-slope", "zero-lb", "one-lb")
_FIXED = {"adaptive": "adaptive", "same-slope": "same-slope", "zero-lb": "zero", "one-lb": "one"}


def relu_slope_shapes(bm: BoundedModule) -> dict[str, tuple]:
    """``{ReLU node name: its input's per-example shape}`` in reverse graph order (the original's
    ``lower_d_list`` order for a sequential model)."""
    shapes = bm.node_shapes()
    return {n.name: tuple(shapes[n.inputs[0]]) for n in reversed(bm.nodes) if n.kind == "relu"}


def random_slopes(bm: BoundedModule, x: Tensor, kind: str = "uniform", generator: torch.Generator | None = None
                  ) -> dict[str, Tensor]:
    """Random lower slopes ``{ReLU node name: (B, 1, *input shape)}`` for a batch like ``x``: "uniform" in
    [0, 1) or "binary" (0 or 1), drawn in reverse graph order (module docstring)."""
    if kind not in ("uniform", "binary"):
        raise ValueError(f"random_slopes: kind must be 'uniform' or 'binary', got {kind!r}")
    out = {}
    for name, shape in relu_slope_shapes(bm).items():
        size = (x.shape[0], 1) + shape
        if kind == "uniform":
            out[name] = torch.rand(size, generator=generator, dtype=bm._dtype(), device=x.device)
        else:
            out[name] = torch.randint(0, 2, size, generator=generator, device=x.device).to(bm._dtype())
    return out


def slope_step(slopes: dict[str, Tensor], grads: dict[str, Tensor | None], step_size: float) -> dict[str, Tensor]:
    """One signed-gradient step ``clip(d - step_size * sign(g), 0, 1)`` per slope tensor (detached); a missing
    gradient (a ReLU the bound does not go through) leaves its slopes as they are."""
    out = {}
    for name, d in slopes.items():
        g = grads.get(name)
        out[name] = d.detach() if g is None else (d.detach() - step_size * g.sign()).clamp(0.0, 1.0)
    return out


def _flat(slopes: dict[str, Tensor]) -> dict[bool, dict[str, Tensor]]:
    """Slopes in the engine's layout: lower side, (B, 1, N)."""
    return {False: {k: v.reshape(v.shape[0], 1, -1) for k, v in slopes.items()}}


def crown_ibp_slope_loss(bm: BoundedModule, x: Tensor, y: Tensor, eps, *, relaxation: str = "ours",
                         steps: int = 1, step_size: float = 2.0, beta: float = 1.0, kappa: float = 0.0,
                         frozen: int | None = None, norm: float = math.inf, x_min: float = 0.0, x_max: float = 1.0,
                         init_slopes: dict[str, Tensor] | None = None, generator: torch.Generator | None = None,
                         reduction: str = "mean"):
    """The CROWN-IBP loss with the ReLU relaxation ``relaxation`` (module docstring). Returns ``(loss, info)``:
    ``natural``, ``robust``, ``lb`` (the mixed margin lower bounds (B, K-1)), ``logits``, and for the random
    relaxations ``slopes`` (the slopes of the final loss, ``{ReLU node name: (B, 1, *shape)}``, detached) and
    ``initial_slopes``, and for "ours" ``loss_before_step`` (the loss at the initial slopes, detached).
    ``init_slopes``: the initial slopes instead of random ones ("ours", "uniform", "binary"). Training quantities:
    the bounds are not widened for rounding (``sound=False``)."""
    if relaxation not in RELAXATIONS:
        raise ValueError(f"crown_ibp_slope_loss: relaxation must be one of {', '.join(RELAXATIONS)}, "
                         f"got {relaxation!r}")
    if not 0.0 <= beta <= 1.0 or not 0.0 <= kappa <= 1.0:
        raise ValueError(f"crown_ibp_slope_loss: beta and kappa must lie in [0, 1], got {beta}, {kappa}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"crown_ibp_slope_loss: steps must be an int >= 0, got {steps!r}")
    if not step_size > 0:
        raise ValueError(f"crown_ibp_slope_loss: step_size must be > 0, got {step_size!r}")
    if frozen is not None and (isinstance(frozen, bool) or not isinstance(frozen, int) or frozen < 0):
        raise ValueError(f"crown_ibp_slope_loss: frozen must be None or an int >= 0, got {frozen!r}")
    logits, stats = recorded_forward(bm.model, bm.nodes, x)
    natural = F.cross_entropy(logits, y, reduction=reduction)
    inp = bm._enter(x, eps, norm, x_min, x_max, margin_spec(y, bm.num_outputs, dtype=bm._dtype()))
    info = {"natural": natural, "logits": logits}
    if beta < 1e-5:
        lb = bm._bounds(inp, "IBP", False, True, False, stats=stats)[0]
        robust = robust_cross_entropy(lb, reduction=reduction)
        info.update(robust=robust, lb=lb)
        return _mix(kappa, natural, robust), info

    relu_lower = _FIXED.get(relaxation, "adaptive")
    slopes = None
    if relaxation in ("ours", "uniform", "binary"):
        if init_slopes is not None:
            slopes = {k: v.to(bm._dtype()) for k, v in init_slopes.items()}
        else:
            slopes = random_slopes(bm, x, "binary" if relaxation == "binary" else "uniform", generator)
        info["initial_slopes"] = {k: v.detach() for k, v in slopes.items()}
    optimise = relaxation == "ours" and steps > 0
    if optimise:
        slopes = {k: v.detach().requires_grad_(True) for k, v in slopes.items()}

    def loss_at(d, intermediate=None):
        out = bm._bounds(inp, "CROWN-IBP", False, True, False, relu_lower, with_ibp=intermediate is None,
                         stats=stats, intermediate=intermediate, slopes=_flat(d) if d else None, frozen=frozen)
        return out[0], (out[2] if intermediate is None else None)

    clb, ilb = loss_at(slopes)
    boxes = bm.node_bounds()

    def mixed(c):
        return c if beta == 1.0 else beta * c + (1 - beta) * ilb

    if optimise:
        loss = _mix(kappa, natural, robust_cross_entropy(mixed(clb), reduction=reduction))
        info["loss_before_step"] = loss.detach()
        for k in range(steps):
            names = list(slopes)
            grads = torch.autograd.grad(loss, [slopes[n] for n in names], retain_graph=True, allow_unused=True)
            slopes = slope_step(slopes, dict(zip(names, grads)), step_size)
            if k < steps - 1:
                slopes = {n: v.requires_grad_(True) for n, v in slopes.items()}
            clb, _ = loss_at(slopes, boxes)
            loss = _mix(kappa, natural, robust_cross_entropy(mixed(clb), reduction=reduction))
    lb = mixed(clb)
    robust = robust_cross_entropy(lb, reduction=reduction)
    if slopes is not None:
        info["slopes"] = {k: v.detach() for k, v in slopes.items()}
    info.update(robust=robust, lb=lb)
    return _mix(kappa, natural, robust), info
