"""Input gradients of the cross-entropy whose own derivatives run through robustkern ops (second order made cheap).

For a network ``f`` built from piecewise-linear layers (Linear, Conv2d, ReLU, AvgPool2d, MaxPool2d, eval-mode
BatchNorm, Normalize, Flatten/reshape, Identity, eval-mode Dropout, ``+`` of branches) the per-example input
gradient of ``ell_i = CE(f(x_i), y_i)`` is ``g_i = J_i^T s_i`` with ``s_i = softmax(z_i) - onehot(y_i)``
(``z = f(x)``) and ``J_i`` the logit Jacobian, which is piecewise constant in ``x`` (fixed by the ReLU masks and
the max pools' selections). This module runs its own forward (ReLU masks recorded as bits by
``robustkern::relu_bits``, max-pool selections as ATen's indices; no activation kept beyond what the weight
gradients need) and its own backward ``J^T`` from ops that are themselves differentiable:

    seed             robustkern::softmax_ce_grad      (backward: the softmax curvature, fused)
    Linear^T + mask  robustkern::linear_input_grad    (mask of the ReLU feeding the layer applied in the op;
    Conv2d^T + mask  robustkern::conv2d_input_grad     backward = one forward GEMM/conv of the masked incoming
                                                       gradient + one weight-gradient: ATen's fastest kernels,
                                                       not its generic convolution double backward)
    ReLU^T           robustkern::relu_masked          (where no layer absorbs it; linear: backward is itself)
    AvgPool^T, BN^T, Normalize^T, reshape^T            linear maps with differentiable ATen backwards
    MaxPool^T        aten.max_pool2d_with_indices_backward with the forward's selections (its own derivative
                     in the incoming gradient is the gather of the same selections: ATen's double backward)

so ``torch.autograd`` of any function of the returned gradient w.r.t. the parameters (``create_graph=True``) is a
double backward through these stages and equals PyTorch's double backprop (``torch.autograd.grad(...,
create_graph=True)``) exactly up to rounding, wherever no pre-activation is exactly 0 (at a tie inside a max-pool
window both take the selection of the same ATen kernel).

``lfr_ascent_direction`` uses that ``J`` is locally constant: ``d/dx sum_i ||g_i||_p = J^T (diag p - p p^T) J v``,
``v = d||g||_p / dg`` (``sign(g)`` for p = 1, ``g / ||g||_2`` for p = 2), computed as one forward-mode Jacobian
product ``J v`` (the forward pass of the linearised network: no biases, the recorded masks), the softmax
curvature (one fused op) and one backward product ``J^T``, with no autograd graph (Xu et al., "Adversarial
Defense via Local Flatness Regularization", ICIP 2020, compute the same direction by double backprop).

On CPU (``impl="auto"``) both functions take ``robustkern.flatness.fused_step`` instead: the same products
with plain ATen calls, the whole input-gradient pass one autograd node whose double backward is hand-written
(the op chain above cost ~0.1 ms of custom-op dispatch per op, and its bit masks save nothing on CPU, where the
ReLU outputs are kept for the weight gradients anyway). ``impl="ops"`` forces the op chain (every order of
differentiation; the step's double backward is once-differentiable).

The graph walk itself (values by node name, ``+`` of branches, reshapes, gradients summed over a value's users)
is ``robustkern.flatness._walk``, shared by both; each supplies only its per-layer maps.

``supports(model)`` says whether the model can take this path (``unsupported_reason`` says why not): the model is
captured with ``robustkern.graph.capture`` (torch.fx); layers outside the list above, BatchNorm in training
mode (batch statistics couple the examples), Dropout in training mode and models fx cannot trace are refused.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..graph import BoundNode, UnsupportedLayerError, capture
from ..ops.flatness import (conv2d_input_grad, linear_input_grad, relu_bits, relu_masked, softmax_ce_grad,
                            softmax_curvature)
from . import _walk as walk

__all__ = ["supports", "unsupported_reason", "input_gradient", "lfr_ascent_direction", "NORMS"]

NORMS = (1, 2)
_KINDS = {"input", "linear", "conv2d", "relu", "batchnorm", "normalize", "avgpool", "maxpool", "identity", "add",
          "reshape", "meta", "output"}
_EXTRA = ("maxpool",)   # capture() kinds beyond bound propagation's that these paths handle
_CAPTURED: "weakref.WeakKeyDictionary[nn.Module, list[BoundNode] | str]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------- capture
def _capture(model: nn.Module) -> list[BoundNode] | str:
    """The model's nodes (cached per model), or the reason it cannot be captured."""
    try:
        cached = _CAPTURED.get(model)
    except TypeError:
        cached = None
    if cached is None:
        try:
            cached = capture(model, extra=_EXTRA)
        except UnsupportedLayerError as e:
            cached = str(e).replace("robustkern.bounds:", "robustkern.flatness.fused:", 1)
        try:
            _CAPTURED[model] = cached
        except TypeError:
            pass
    return cached


def unsupported_reason(model: nn.Module) -> str | None:
    """None if ``input_gradient``/``lfr_ascent_direction`` support ``model`` in its current train/eval mode,
    else why not (naming the layer). Training mode matters: BatchNorm and Dropout must be in eval mode."""
    if not isinstance(model, nn.Module):
        return f"expected an nn.Module, got {type(model).__name__}"
    nodes = _capture(model)
    if isinstance(nodes, str):
        return nodes
    for n in nodes:
        if n.kind not in _KINDS:
            return f"layer kind {n.kind!r} at '{n.path}' has no fused second-order path"
        m = n.module
        if n.kind == "batchnorm" and (m.training or m.running_mean is None):
            return (f"{type(m).__name__} at '{n.path}' uses batch statistics (training mode or no running stats): "
                    f"they couple the examples of a batch; put it in eval mode")
        if n.kind == "identity" and isinstance(m, nn.Dropout) and m.training and m.p > 0:
            return f"{type(m).__name__} at '{n.path}' is in training mode (random masks); put it in eval mode"
    return None


def supports(model: nn.Module) -> bool:
    """Whether the fused second-order path handles ``model`` (see ``unsupported_reason``)."""
    return unsupported_reason(model) is None


def _nodes(model: nn.Module) -> list[BoundNode]:
    reason = unsupported_reason(model)
    if reason is not None:
        raise UnsupportedLayerError(f"robustkern.flatness.fused: {reason}")
    return _CAPTURED[model] if model in _CAPTURED else capture(model, extra=_EXTRA)


# ----------------------------------------------------------------------------------------------- passes
@dataclass
class _Tape:
    """What the hand-built backward needs from the forward: ReLU bits, max-pool selections and output shapes."""
    bits: dict[str, Tensor] = field(default_factory=dict)
    idx: dict[str, Tensor] = field(default_factory=dict)
    shapes: dict[str, torch.Size] = field(default_factory=dict)


def _forward(nodes: list[BoundNode], x: Tensor) -> tuple[Tensor, _Tape]:
    """Run the captured network on ``x``; returns ``(logits, tape)`` (the ReLU masks as bits, the shapes)."""
    tape = _Tape()

    def layer(n: BoundNode, v: Tensor) -> Tensor:
        if n.kind == "relu":
            r, tape.bits[n.name] = relu_bits(v)
            return r
        if n.kind == "maxpool":
            r, tape.idx[n.name] = walk.maxpool_forward(n, v)
            return r
        return walk.layer_forward(n, v)

    return walk.run_graph(nodes, x, layer, tape.shapes), tape


def _tangent(nodes: list[BoundNode], tape: _Tape, t: Tensor) -> Tensor:
    """``J t``: the tangent ``t`` through the linearised network (no biases, the tape's masks)."""
    def layer(n: BoundNode, v: Tensor) -> Tensor:
        if n.kind == "maxpool":
            return walk.maxpool_jvp(v, tape.idx[n.name])
        return relu_masked(v, tape.bits[n.name]) if n.kind == "relu" else walk.layer_jvp(n, v)

    return walk.run_graph(nodes, t, layer)


def _backward(nodes: list[BoundNode], tape: _Tape, seed: Tensor) -> Tensor:
    """``J^T seed`` through the captured network, with ops whose own backward is defined (see module doc). A
    Linear/Conv2d fed by a ReLU that nothing else reads takes that ReLU's mask into its input-gradient op."""
    by_name = {n.name: n for n in nodes}

    def vjp(n: BoundNode, g: Tensor) -> tuple[str, Tensor]:
        k, m, src = n.kind, n.module, n.inputs[0]
        if k == "relu":
            return src, relu_masked(g, tape.bits[n.name])
        if k == "maxpool":
            return src, walk.maxpool_vjp(n, g, tape.idx[n.name], tape.shapes)
        if k not in ("linear", "conv2d"):
            return src, walk.layer_vjp(n, g, tape.shapes)
        bits, feeder = None, by_name[src]
        if feeder.kind == "relu" and feeder.users == 1:
            bits, src = tape.bits[feeder.name], feeder.inputs[0]
        if k == "linear":
            return src, linear_input_grad(g, m.weight, bits)
        return src, conv2d_input_grad(g, m.weight, bits, tape.shapes[src], m.stride, m.padding, m.dilation,
                                      m.groups)

    return walk.transpose(nodes, seed, vjp, tape.shapes)


def _check(model, x, y):
    nodes = _nodes(model)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError("robustkern.flatness.fused: x must be a floating-point tensor")
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
        raise ValueError(f"robustkern.flatness.fused: y must be int64 labels of shape ({x.shape[0]},)")
    return nodes


# ----------------------------------------------------------------------------------------------- public API
IMPLS = ("auto", "ops", "step")


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, *, create_graph: bool,
                   impl: str = "auto") -> tuple[Tensor, Tensor]:
    """``(logits, grad)`` with ``logits = model(x)`` and ``grad = d(sum_i CE(logits_i, y_i)) / dx`` (per example;
    scale by ``1/B`` for the mean). With ``create_graph=True`` both carry autograd history: differentiating a
    function of ``grad`` (and of the logits) w.r.t. the parameters or ``x`` runs the double backward through
    the ops listed in the module docstring. With ``create_graph=False`` neither does (no graph is built).
    Raises ``UnsupportedLayerError`` when ``supports(model)`` is False.

    ``impl``: ``"ops"`` builds the pass from the ``robustkern::`` ops above (differentiable to any order; ReLU
    masks kept as bits); ``"step"`` is ``robustkern.flatness.fused_step``: the whole pass as one autograd node
    with a hand-written double backward (plain ATen calls, no per-op dispatch; a third derivative raises);
    ``"auto"``: ``"step"`` on CPU (faster than ``"ops"`` there and at parity with PyTorch's double backprop,
    benchmarks/bench_flatness_fused.py), ``"ops"`` elsewhere."""
    if impl not in IMPLS:
        raise ValueError(f"robustkern.flatness.fused: impl must be one of {IMPLS}, got {impl!r}")
    nodes = _check(model, x, y)
    if impl == "step" or (impl == "auto" and x.device.type == "cpu"):
        from .fused_step import input_gradient_pass

        with torch.set_grad_enabled(create_graph):
            logits, grad = input_gradient_pass(nodes, x, y)
        if logits.dim() != 2:
            raise ValueError(f"robustkern.flatness.fused: the model must output (B, classes) logits, got shape "
                             f"{tuple(logits.shape)}")
        return logits, grad
    with torch.set_grad_enabled(create_graph):
        logits, tape = _forward(nodes, x)
        if logits.dim() != 2:
            raise ValueError(f"robustkern.flatness.fused: the model must output (B, classes) logits, got shape "
                             f"{tuple(logits.shape)}")
        grad = _backward(nodes, tape, softmax_ce_grad(logits, y))
    return logits, grad


def _norm_gradient(g: Tensor, p) -> Tensor:
    """``d ||g_i||_p / d g_i`` per example (0 where ``g_i = 0``, as ``torch.autograd`` gives for p = 2)."""
    if p == 1:
        return torch.sign(g)
    flat = g.reshape(g.shape[0], -1)
    norm = flat.norm(dim=1, keepdim=True)
    return torch.where(norm > 0, flat / torch.where(norm > 0, norm, 1.0), 0.0).reshape(g.shape)


def lfr_ascent_direction(model: nn.Module, x: Tensor, y: Tensor, p=1, impl: str = "auto") -> Tensor:
    """``d/dx sum_i ||grad_x CE(f(x_i), y_i)||_p`` (exact almost everywhere for the supported piecewise-linear
    networks): ``J^T (diag p - p p^T) J v`` with ``v = d||g||_p/dg``, one forward-mode product, one fused
    curvature, one backward product; no graph is kept (the result has no autograd history). ``p`` in (1, 2).
    This is the inner ascent direction of LFR (Xu et al. 2020) before its sign is taken. ``impl`` as in
    ``input_gradient`` (``"step"``: the same products with plain ATen calls, the CPU default)."""
    if p not in NORMS:
        raise ValueError(f"robustkern.flatness.fused: p must be one of {NORMS}, got {p!r}")
    nodes = _check(model, x, y)
    if impl not in IMPLS:
        raise ValueError(f"robustkern.flatness.fused: impl must be one of {IMPLS}, got {impl!r}")
    if impl == "step" or (impl == "auto" and x.device.type == "cpu"):
        from .fused_step import lfr_direction

        return lfr_direction(nodes, x.detach(), y, lambda g: _norm_gradient(g, p))
    with torch.no_grad():
        logits, tape = _forward(nodes, x.detach())
        g = _backward(nodes, tape, softmax_ce_grad(logits, y))
        jv = _tangent(nodes, tape, _norm_gradient(g, p))
        return _backward(nodes, tape, softmax_curvature(logits, jv))
