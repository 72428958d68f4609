"""Batch statistics of BatchNorm layers that normalise with their batch's mean and variance (training mode, or
no running statistics), for bound propagation.

What is bounded. Bounds over a perturbation set are bounds of one fixed function; for such a layer that function
uses the statistics of the clean batch ``x`` (as auto_LiRPA and CROWN-IBP do), i.e. ``y = w (z - mean) /
sqrt(var + eps) + b`` with ``mean``/``var`` the mean and biased variance of the layer's input over the batch and
spatial dimensions when the network runs on ``x``. Statistics belong to the weights and the batch they are
computed from: they are computed in the same call as the bounds, never remembered between calls.

* ``point_statistics``: the statistics as the working precision computes them, with autograd (unsound bounds,
  training). One forward over the captured graph, one entry per graph node, so a module applied twice gets
  each application's own statistics; running statistics are not touched.
* ``recorded_forward``: the model's own forward (which the training loss needs anyway) with the statistics
  recorded per call, mapped to graph nodes in call order; None when the calls do not match the graph.
* ``enclosed_statistics``: for sound bounds, float64 intervals that contain the exact statistics of the network
  in real arithmetic on ``x`` (the layer inputs themselves computed exactly, earlier layers' statistics
  included): an interval propagation of the clean batch (radius 0) in float64 with ``sound=True``, each such
  layer's statistics enclosed from its input box as the pass reaches it. A channel whose mean is large against
  its spread, which float32 cannot resolve, is still enclosed to about 1e-16 of its mean.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .._numerics import gamma, next_down, next_up, tiny, unit_roundoff
from ..graph import BoundNode, run_graph
from .precision import Coefficients

__all__ = ["uses_batch_stats", "point_statistics", "forward_with_statistics", "recorded_forward",
           "enclosed_statistics"]


def uses_batch_stats(m: nn.Module) -> bool:
    return m.training or m.running_mean is None


def _reduce_dims(t: Tensor) -> list[int]:
    return [0] + list(range(2, t.dim()))


def point_statistics(nodes: list[BoundNode], x: Tensor) -> dict:
    """``{node name: (mean, var)}`` of every batch-statistics BatchNorm node, from a forward of ``x`` over the
    captured graph (``x``'s dtype, autograd kept, running statistics untouched)."""
    return forward_with_statistics(nodes, x)[1]


def forward_with_statistics(nodes: list[BoundNode], x: Tensor, stats: dict | None = None):
    """``(output, stats)``: the captured graph on ``x`` with every batch-statistics BatchNorm node normalising by
    ``stats[name] = (mean, var)`` when given (the function a bound with those statistics is about, evaluated
    at other points), else by ``x``'s own batch statistics, which are returned. Running statistics are not
    touched; autograd is kept."""
    for node in nodes:
        m = node.module
        if node.kind == "identity" and isinstance(m, nn.Dropout) and m.training and m.p > 0:
            raise RuntimeError(f"robustkern.bounds: Dropout '{node.path}' is in training mode; bounds of a "
                               f"random layer are undefined (put the model in eval mode)")
    out_stats: dict = {}

    def layer(node: BoundNode, z: Tensor) -> Tensor:
        m = node.module
        if node.kind == "relu":
            return torch.relu(z)
        if node.kind == "batchnorm" and uses_batch_stats(m):
            if stats is not None:
                mean, var = stats[node.name]
            else:
                var, mean = torch.var_mean(z, _reduce_dims(z), unbiased=False)
            out_stats[node.name] = (mean, var)
            shape = (1, -1) + (1,) * (z.dim() - 2)
            v = (z - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + m.eps)
            if m.weight is not None:
                v = v * m.weight.reshape(shape)
            if m.bias is not None:
                v = v + m.bias.reshape(shape)
            return v
        return m(z) if m is not None else z

    return run_graph(nodes, x, layer), out_stats


def recorded_forward(model: nn.Module, nodes: list[BoundNode], x: Tensor):
    """``(model(x), stats)``: the model's own forward, with the batch statistics of every batch-statistics
    BatchNorm call recorded and assigned to the graph's nodes in call order (``stats`` is None when the calls
    do not match the graph's nodes of those modules)."""
    bn_nodes = [n for n in nodes if n.kind == "batchnorm" and uses_batch_stats(n.module)]
    if not bn_nodes:
        return model(x), {}
    calls: dict[int, list] = {}
    handles = []

    def hook(module, args):
        if uses_batch_stats(module):
            (t,) = args
            var, mean = torch.var_mean(t.float() if t.dtype in (torch.float16, torch.bfloat16) else t,
                                       _reduce_dims(t), unbiased=False)
            calls.setdefault(id(module), []).append((mean, var))

    for m in {id(n.module): n.module for n in bn_nodes}.values():
        handles.append(m.register_forward_pre_hook(hook))
    try:
        out = model(x)
    finally:
        for h in handles:
            h.remove()
    stats: dict = {}
    seen: dict[int, int] = {}
    for n in bn_nodes:
        k = seen.get(id(n.module), 0)
        seen[id(n.module)] = k + 1
        got = calls.get(id(n.module), [])
        if k >= len(got):
            return out, None
        stats[n.name] = got[k]
    if any(len(calls.get(i, [])) != c for i, c in seen.items()):
        return out, None
    return out, stats


def _stats_interval(mid: Tensor, rad: Tensor):
    """``(mean_lo, mean_hi, var_lo, var_hi)`` (float64, per channel) enclosing the mean and biased variance over
    the batch and spatial dimensions of every tensor ``z`` with ``|z - mid| <= rad`` (element-wise)."""
    dims = _reduce_dims(mid)
    n = mid.numel() // max(mid.shape[1], 1)
    u = unit_roundoff(torch.float64)
    g = gamma(n + 3, u)
    shape = (1, -1) + (1,) * (mid.dim() - 2)
    mean_mid = mid.sum(dims) / n
    mean_rad = next_up((rad.sum(dims) / n) * (1 + g) + g * mid.abs().sum(dims) / n + n * tiny(torch.float64))
    d = (mid - mean_mid.reshape(shape)).abs()
    w = (rad + mean_rad.reshape(shape) + u * d) * (1 + 4 * u) + tiny(torch.float64)
    lo = next_down(d - w).clamp(min=0.0)
    hi = next_up(d + w)
    var_lo = next_down(lo.square().sum(dims) / n * (1 - g)).clamp(min=0.0)
    var_hi = next_up(hi.square().sum(dims) / n * (1 + g) + n * tiny(torch.float64))
    return next_down(mean_mid - mean_rad), next_up(mean_mid + mean_rad), var_lo, var_hi


class _EnclosingCoefficients(Coefficients):
    """Coefficients whose batch statistics are enclosed from the layer's input box when the pass reaches it."""

    def get(self, node, dtype, device=None, input_box=None):
        if node.kind == "batchnorm" and uses_batch_stats(node.module) and node.name not in self.stats:
            if input_box is None:
                raise AssertionError("statistics enclosure needs the unfused pass")
            self.stats[node.name] = _stats_interval(input_box.mid.to(torch.float64),
                                                    input_box.rad.to(torch.float64))
        return super().get(node, dtype, device)



def enclosed_statistics(nodes: list[BoundNode], x: Tensor) -> dict:
    """``{node name: (mean_lo, mean_hi, var_lo, var_hi)}`` (float64) containing the exact batch statistics of
    the network on ``x`` (see the module docstring)."""
    from .ibp import propagate
    x64 = x.detach().to(torch.float64)
    coeffs = _EnclosingCoefficients(None, sound=True)
    zeros = torch.zeros(x64.shape[0], dtype=torch.float64, device=x64.device)
    with torch.no_grad():
        propagate(nodes, {}, x64, zeros, math.inf, -math.inf, math.inf, None, True, coeffs,
                  input_box=(x64, torch.zeros_like(x64)))
    return coeffs.stats
