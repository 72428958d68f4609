"""Reference for Loss Landscape Matters' training step (Lee, Lee, Park, NeurIPS 2021; sungyoon-lee/
LossLandscapeMatters ``train.py`` ``Train_calloss`` and ``Train_calloss_ours``, ``bound_layers.py``
``BoundReLU.bound_backward`` and ``BoundSequential.backward_range(_frozen)``): a plain-PyTorch transcription on
``robustkern.reference.published.crown_ibp``'s CROWN-IBP transcription, written independently of robustkern's
bound propagation (no robustkern op), for ``nn.Sequential`` models of Linear, Conv2d, ReLU and flatten layers.

What the original computes (bound_type ``crown-interval`` or ``crown-interval-frozen``, method
``robust_natural``, L-inf):

* ``Train_calloss``: the clean cross-entropy ``regular_ce``; IBP with the margin specification ``C`` (rows
  ``e_y - e_j``, ``j != y``) -> ``ilb``; CROWN-IBP's backward pass from ``C`` (through all layers, or the last
  ``frozen + 1``) with the ReLU lower slopes ``lower_d_list2`` -> ``clb``; ``lb = beta clb + (1 - beta) ilb``
  scattered into a (B, 10) tensor with 0 at the label, ``robust_ce = CE(-lb, y)``,
  ``loss = (1 - kappa) robust_ce + kappa regular_ce``.
* The ReLU step with given slopes ``lower_d`` (B, 1, *shape): entries of neurons with ``l > 0`` set to 1 and
  with ``u < 0`` set to 0, then ``A' = d_u A- + lower_d A+`` (lower side), intercept ``sum A- b_u``.
* ``Train_calloss_ours`` (one step): ``g = dL/d lower_d`` for each ReLU's slopes, ``lower_d <- clamp(lower_d -
  2 sign(g), 0, 1)`` (detached), and the loss recomputed with the stepped slopes. Multistep: 7 steps of 0.1,
  each from the gradient of the loss at the current slopes.

``slope_step_reference(model, x, y, x_L, x_U, slopes, ...)`` takes the initial slopes (what the original draws
with ``torch.rand_like``) as ``{layer index: (B, 1, *input shape)}`` and returns the stepped slopes, the loss
before and after the step, and the gradients of the step(s).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .crown_ibp import BoundSequentialReference

__all__ = ["SlopeBoundSequentialReference", "train_calloss_reference", "slope_step_reference"]


class SlopeBoundSequentialReference(BoundSequentialReference):
    """CROWN-IBP's transcription with Loss Landscape Matters' given slopes: ``self.slopes`` maps a ReLU's layer
    index to its lower slopes (B, 1, *input shape), masked as the original masks them."""

    def __init__(self, model: nn.Sequential, bound_opts: dict | None = None):
        super().__init__(model, bound_opts)
        self.slopes: dict[int, Tensor] = {}

    def _relu_slopes(self, i: int):
        d_up, b_up, d_lo = super()._relu_slopes(i)
        if i in self.slopes:
            lo, up = self.relu_bounds[i]
            d_lo = self.slopes[i]
            d_lo = torch.where(lo.unsqueeze(1) > 0, torch.ones_like(d_lo), d_lo)
            d_lo = torch.where(up.unsqueeze(1) < 0, torch.zeros_like(d_lo), d_lo)
        return d_up, b_up, d_lo


def _margin_spec(y: Tensor, classes: int, dtype) -> Tensor:
    c = torch.eye(classes, dtype=dtype)[y].unsqueeze(1) - torch.eye(classes, dtype=dtype).unsqueeze(0)
    keep = ~(y.unsqueeze(1) == torch.arange(classes).unsqueeze(0))
    return c[keep].view(y.shape[0], classes - 1, classes)


def train_calloss_reference(ref: SlopeBoundSequentialReference, x: Tensor, y: Tensor, x_L: Tensor, x_U: Tensor,
                            eps: float, beta: float = 1.0, kappa: float = 0.0, frozen: int | None = None):
    """The original's ``Train_calloss`` (module docstring) with the slopes in ``ref.slopes``: ``(loss, robust_ce,
    lb)`` with ``lb`` the mixed margin lower bounds (B, K-1) before the scatter."""
    out = ref.forward(x)
    classes = out.shape[1]
    regular_ce = F.cross_entropy(out, y)
    C = _margin_spec(y, classes, x.dtype)
    _, ilb, *_ = ref.interval_range(math.inf, x_U, x_L, eps, C)
    first = 0 if frozen is None else max(len(ref.layers) - int(frozen) - 1, 0)
    clb = ref.backward_range(math.inf, x_U, x_L, eps, C, upper=False, lower=True, first=first)[2]
    lb = clb * beta + ilb * (1 - beta)
    sa = torch.tensor([[j if j < i else j + 1 for j in range(classes - 1)] for i in range(classes)])
    full = torch.zeros(x.shape[0], classes, dtype=lb.dtype).scatter(1, sa[y], lb)
    robust_ce = F.cross_entropy(-full, y)
    return (1 - kappa) * robust_ce + kappa * regular_ce, robust_ce, lb


def slope_step_reference(model: nn.Sequential, x: Tensor, y: Tensor, x_L: Tensor, x_U: Tensor, eps: float,
                         slopes: dict[int, Tensor], *, multistep: bool = False, beta: float = 1.0,
                         kappa: float = 0.0, frozen: int | None = None) -> dict:
    """``Train_calloss_ours`` from the initial ``slopes``: ``{"slopes": stepped slopes, "loss_before",
    "loss_after", "lb_after", "grads": the gradient of each step ({layer index: tensor}, a list)}``."""
    ref = SlopeBoundSequentialReference(model)
    current = {i: d.detach().clone().requires_grad_(True) for i, d in slopes.items()}
    ref.slopes = current
    loss, _, _ = train_calloss_reference(ref, x, y, x_L, x_U, eps, beta, kappa, frozen)
    before = loss.detach()
    steps, size = (7, 0.1) if multistep else (1, 2.0)
    grads = []
    for k in range(steps):
        if k >= 1:
            ref.slopes = current
            loss, _, _ = train_calloss_reference(ref, x, y, x_L, x_U, eps, beta, kappa, frozen)
        keys = list(current)
        g = torch.autograd.grad(loss, [current[i] for i in keys], allow_unused=True)
        g = {i: (torch.zeros_like(current[i]) if gi is None else gi) for i, gi in zip(keys, g)}
        grads.append(g)
        current = {i: torch.clamp(current[i] - g[i].sign() * size, min=0, max=1).detach() for i in keys}
        if k < steps - 1:
            current = {i: v.requires_grad_(True) for i, v in current.items()}
    ref.slopes = current
    loss, _, lb = train_calloss_reference(ref, x, y, x_L, x_U, eps, beta, kappa, frozen)
    return {"slopes": current, "loss_before": before, "loss_after": loss.detach(), "lb_after": lb.detach(),
            "grads": grads}
