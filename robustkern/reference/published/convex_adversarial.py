"""Plain-PyTorch transcription of the exact dual-network bound of Wong & Kolter (2018) as locuslab/convex_adversarial
@2cd8149 computes it (``DualNetwork`` over ``L2Ball`` / ``InfBall``, ``DualLinear``, ``DualConv2d``, ``DualReLU``,
``DualReshape``; ``robust_loss`` without projections): the independent ground truth that
``robustkern.bounds.cap`` is tested against.

* ``dual_objective_reference``: ``DualNetwork.forward(c)``, the dual objective ``J(c)`` (B, m), a lower bound of
  ``c . f(x')`` over the ball, for the pre-activation bounds given: ``nu = -c`` carried backwards through the
  transposed layers (a ReLU scales it by its slope ``d``), each layer adding its term (a bias ``-nu . b`` with
  the ``nu`` at its output, an unstable ReLU ``sum_I [d nu]_+ l``), the input ball ``-nu . x - eps ||nu||_*``.
* ``relu_bounds_reference``: the pre-activation bounds of every ReLU, layer by layer, as the dual network's
  ``bounds()``: for each unit ``l = J(e_u)`` and ``u = -J(-e_u)`` of the network up to it. (The original
  propagates identity matrices forwards to get every unit at once; the numbers are the same.)
* ``robust_loss_reference``: ``robust_loss(net, epsilon, X, y)``: ``(ce, err)``, the cross-entropy of
  ``f = -J(e_y - e_j)`` and the share of examples whose ``f`` is not maximal at ``y``.

``norm`` is the original's ``norm_type``: ``"l2"`` (``L2Ball``) or ``"l1"`` (``InfBall``, the L-inf ball, whose
dual norm is L1). Chains of Linear, Conv2d (no output padding in the transposed convolution, as the original),
ReLU and Flatten; no input clipping (``bounded_input=False``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["dual_objective_reference", "relu_bounds_reference", "robust_loss_reference"]


def _relu_data(zl: Tensor, zu: Tensor):
    """``DualReLU``'s slope ``d`` (1 active, ``u / (u - l)`` unstable, 0 inactive) and unstable mask ``I``."""
    d = (zl >= 0).to(zl.dtype)
    I = (zu > 0) & (zl < 0)
    d = torch.where(I, zu / torch.where(I, zu - zl, torch.ones_like(zu)), d)
    return d, I, zl


def dual_objective_reference(layers: list[nn.Module], relus: list, X: Tensor, epsilon: float, c: Tensor,
                             norm: str = "l2") -> Tensor:
    """``J(c)`` (B, m) for ``c`` (B, m, *output shape) of the chain ``layers`` (the last one affine); ``relus``
    holds, per ReLU of ``layers`` in order, ``(d, I, zl)`` from ``_relu_data``."""
    B, m = c.shape[:2]
    nu = -c
    obj = torch.zeros(B, m, dtype=c.dtype, device=c.device)
    shapes = [tuple(X.shape[1:])]
    with torch.no_grad():
        h = X[:1]
        for layer in layers:
            h = layer(h)
            shapes.append(tuple(h.shape[1:]))
    relu_idx = sum(isinstance(layer, nn.ReLU) for layer in layers)
    for i in reversed(range(len(layers))):
        layer = layers[i]
        if isinstance(layer, nn.Linear):
            if layer.bias is not None:
                obj = obj - nu.reshape(B, m, -1).matmul(layer.bias)
            nu = F.linear(nu, layer.weight.t())
        elif isinstance(layer, nn.Conv2d):
            if layer.bias is not None:
                full = layer.bias.reshape(-1, 1, 1).expand(shapes[i + 1]).reshape(-1)
                obj = obj - nu.reshape(B, m, -1).matmul(full)
            flat = F.conv_transpose2d(nu.reshape((B * m,) + shapes[i + 1]), layer.weight, stride=layer.stride,
                                      padding=layer.padding)
            nu = flat.reshape((B, m) + tuple(flat.shape[1:]))
        elif isinstance(layer, nn.ReLU):
            relu_idx -= 1
            d, I, zl = relus[relu_idx]
            nu = d.unsqueeze(1) * nu             # the objective reads the scaled nu (DualReLU.T's output)
            obj = obj + (nu.clamp(min=0) * (zl * I).unsqueeze(1)).reshape(B, m, -1).sum(-1)
        elif isinstance(layer, nn.Flatten) or type(layer).__name__ == "Flatten":
            nu = nu.reshape((B, m) + shapes[i])
        else:
            raise ValueError(f"dual_objective_reference: layer {type(layer).__name__} is not in the transcription")
    nu = nu.reshape(B, m, -1)
    nu_x = nu.matmul(X.reshape(B, -1, 1)).squeeze(2)
    dual = nu.norm(2, 2) if norm == "l2" else nu.abs().sum(2)
    return obj - nu_x - epsilon * dual


def relu_bounds_reference(net: nn.Sequential, X: Tensor, epsilon: float, norm: str = "l2") -> list:
    """``(d, I, zl)`` of every ReLU of ``net`` (with its bounds ``zl``, ``zu`` computed before it)."""
    layers = list(net.children())
    relus = []
    for k, layer in enumerate(layers):
        if not isinstance(layer, nn.ReLU):
            continue
        with torch.no_grad():
            shape = tuple(nn.Sequential(*layers[:k])(X[:1]).shape[1:])
        n = int(torch.tensor(shape).prod())
        eye = torch.eye(n, dtype=X.dtype, device=X.device).reshape((1, n) + shape).expand((X.shape[0], n) + shape)
        zl = dual_objective_reference(layers[:k], relus, X, epsilon, eye, norm).reshape((-1,) + shape)
        zu = -dual_objective_reference(layers[:k], relus, X, epsilon, -eye, norm).reshape((-1,) + shape)
        relus.append(_relu_data(zl, zu))
    return relus


def robust_loss_reference(net: nn.Sequential, epsilon: float, X: Tensor, y: Tensor, norm: str = "l2"):
    """``robust_loss``: ``(ce, err)`` with ``f = -J(e_y - e_j)`` (B, K)."""
    relus = relu_bounds_reference(net, X, epsilon, norm)
    K = list(net.children())[-1].out_features
    eye = torch.eye(K, dtype=X.dtype, device=X.device)
    c = eye[y].unsqueeze(1) - eye.unsqueeze(0)
    f = -dual_objective_reference(list(net.children()), relus, X, epsilon, c, norm)
    err = (f.max(1)[1] != y).float().mean().item()
    return F.cross_entropy(f, y), err
