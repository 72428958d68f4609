"""GradAlign (Andriushchenko & Flammarion, "Understanding and Improving Fast Adversarial Training", NeurIPS 2020;
tml-epfl/understanding-fast-adv-training ``train.py``, ``utils.get_input_grad``) and the gradient-norm
regulariser of the weights by finite differences, F-GR (Karakida, Takase, Hayase, Osawa, "Understanding
Gradient Regularization in Deep Learning: Efficient Finite-Difference Computation and Implicit Bias", ICML 2023).

GradAlign. With ``g_1 = grad_x CE(f(x), y)`` (no graph) and ``g_2 = grad_x CE(f(x + eta), y)``,
``eta ~ U[-eps, eps]^d`` (not clipped to [0, 1], as upstream), ``g_2`` with its graph:

    penalty = lam * (1 - mean_i cos(g_1i, g_2i))

the mean over the examples whose two gradients are both non-zero (upstream drops the others). Training through
it is a double backprop through ``g_2`` only.

F-GR. Gradient regularisation of the weights is ``L(theta) + (gamma / 2) ||grad_theta L||^2``, whose gradient is
``grad L + gamma H grad L``. F-GR replaces ``H grad L`` by the forward difference
``(grad L(theta + h grad L) - grad L(theta)) / h`` (an ascent step then a descent step; ``grad L`` in the shift
held fixed), which needs two first-order backward passes and no second derivative. ``fgr_penalty`` returns a
surrogate whose ``.backward()`` gives exactly that gradient:

    surrogate = (1 - gamma / h) L(theta) + (gamma / h) L(theta + h sg(grad L(theta)))

(``sg``: stop-gradient; ``d/dtheta L(theta + c) = grad L(theta + c)``). Its value is not the regulariser; the
function also returns ``L`` and ``||grad L||^2``. ``method="double_backprop"`` returns
``L + (gamma / 2) ||grad L||^2`` itself (exact gradient by double backprop). F-GR is a different regulariser from
the exact one in ReLU networks, not an approximation of it: the Hessian-vector product of a piecewise-linear
network changes discontinuously when the shift flips ReLUs, and at practical ``h`` (1e-4 .. 0.1) the F-GR
direction differs from ``H grad L`` by 1.3x to 40x its norm (robustkern research notes, SmallCNN and
PreAct-ResNet-18, float64); for smooth networks (tanh) it converges to it linearly in ``h``. Karakida et al.
report that F-GR with a relatively large ``h`` generalises better than the exact one.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .grad_norm import (BACKENDS, _check_choice, _check_inputs, _check_labels, _check_positive,
                        _input_gradient, frozen_bn_stats)

__all__ = ["gradalign_penalty", "fgr_penalty", "FGR_METHODS"]

FGR_METHODS = ("finite_difference", "double_backprop")


def _uniform(like: Tensor, eps: float, noise, generator, seed) -> Tensor:
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != like.shape:
            raise ValueError(f"gradalign_penalty: noise must be a tensor of the input's shape "
                             f"{tuple(like.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        return noise.detach().to(like.dtype).to(like.device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=like.device).manual_seed(int(seed))
    u = torch.rand(like.shape, generator=generator, dtype=like.dtype, device=like.device)
    return (2.0 * u - 1.0) * eps


def gradalign_penalty(model: nn.Module, x: Tensor, y: Tensor, eps: float, lam: float = 1.0, *,
                      noise: Tensor | None = None, generator: torch.Generator | None = None,
                      seed: int | None = None, backend: str = "auto", return_cos: bool = False):
    """GradAlign penalty ``lam * (1 - mean cos(g(x), g(x + eta)))`` (module docstring), differentiable w.r.t.
    the parameters through ``g(x + eta)``. ``noise`` is ``eta`` itself (shape of ``x``); otherwise ``eta`` is
    drawn uniformly in ``[-eps, eps]`` from ``generator``/``seed``/the global RNG. Returns the penalty (a 0-dim
    tensor; 0 when no example has two non-zero gradients), and the per-example cosines (NaN where dropped)
    when ``return_cos``. The model runs in its current mode; no parameter ``.grad`` is touched."""
    fn = "gradalign_penalty"
    y = _check_inputs(fn, model, x, y)
    _check_choice(fn, "backend", backend, BACKENDS)
    eps = _check_positive(fn, "eps", eps, strict=False)
    lam = _check_positive(fn, "lam", lam, strict=False)
    x = x.detach()
    eta = _uniform(x, eps, noise, generator, seed)
    _, g1 = _input_gradient(model, x, y, create_graph=False, backend=backend)
    _, g2 = _input_gradient(model, x + eta, y, create_graph=True, backend=backend)
    g1, g2 = g1.flatten(1), g2.flatten(1)
    n1, n2 = g1.norm(dim=1), g2.norm(dim=1)
    keep = (n1 > 0) & (n2 > 0)
    safe1 = torch.where(keep, n1, torch.ones_like(n1))
    safe2 = torch.where(keep, n2, torch.ones_like(n2))
    cos = ((g1 / safe1[:, None]) * (g2 / safe2[:, None])).sum(1)
    count = keep.sum()
    mean_cos = torch.where(keep, cos, torch.zeros_like(cos)).sum() / count.clamp(min=1)
    penalty = torch.where(count > 0, lam * (1.0 - mean_cos), torch.zeros_like(mean_cos))
    if return_cos:
        return penalty, torch.where(keep, cos.detach(), torch.full_like(cos, float("nan")))
    return penalty


def fgr_penalty(model: nn.Module, x: Tensor, y: Tensor, gamma: float, h: float = 0.1,
                method: str = "finite_difference"):
    """Gradient-norm regularisation of the weights (module docstring). Returns ``(loss, loss_plain,
    grad_norm_sq)``: ``loss.backward()`` gives the regularised gradient (F-GR's finite difference, or the exact
    one by double backprop for ``method="double_backprop"``), ``loss_plain = CE(f(x), y)`` (mean),
    ``grad_norm_sq = ||grad_theta loss_plain||^2`` (detached). The second forward of F-GR runs at the shifted
    weights with BatchNorm running statistics left unchanged; the parameters themselves are never modified."""
    fn = "fgr_penalty"
    y = _check_inputs(fn, model, x, y)
    _check_choice(fn, "method", method, FGR_METHODS)
    gamma = _check_positive(fn, "gamma", gamma, strict=False)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(f"{fn}: the model has no parameter that requires grad")
    logits = model(x)
    _check_labels(fn, logits, y)
    loss_plain = F.cross_entropy(logits, y)
    params = [p for _, p in named]
    grads = torch.autograd.grad(loss_plain, params, create_graph=method == "double_backprop", retain_graph=True)
    grad_norm_sq = sum((g * g).sum() for g in grads)
    if method == "double_backprop":
        return loss_plain + 0.5 * gamma * grad_norm_sq, loss_plain, grad_norm_sq.detach()
    h = _check_positive(fn, "h", h)
    shifted = {n: p + h * g.detach() for (n, p), g in zip(named, grads)}
    with frozen_bn_stats(model):
        loss_shifted = F.cross_entropy(torch.func.functional_call(model, shifted, (x,), strict=False), y)
    loss = (1.0 - gamma / h) * loss_plain + (gamma / h) * loss_shifted
    return loss, loss_plain, grad_norm_sq.detach()
