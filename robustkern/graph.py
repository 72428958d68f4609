"""Capture a model as a list of nodes with ``torch.fx``: the graph that bound propagation (``robustkern.bounds``)
and the fused input-gradient passes (``robustkern.flatness``) walk.

Supported: one tensor input; ``nn.Linear``, ``nn.Conv2d`` (zero padding; stride, padding, dilation, groups),
``nn.ReLU`` / ``F.relu`` / ``torch.relu``, ``nn.BatchNorm1d/2d``, ``nn.Flatten`` / ``torch.flatten`` /
``view`` / ``reshape`` that keep the batch dimension, ``nn.AvgPool2d``, ``nn.Identity``, ``nn.Dropout`` (in eval
mode), a normalisation layer (``robustkern.nn.Normalize``, or a module whose class name contains "Normalize"
with per-channel ``means``/``sds`` or ``mean``/``std`` tensors, as in Cohen et al.'s ``NormalizeLayer``) and
``+`` of two branches (residual blocks; also ``sum()`` over branches, whose leading ``0 +`` is the identity).
Anything else raises ``UnsupportedLayerError`` naming its type and where it is in the model.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .graph_functional import attribute_constant, expression_constant, functional_layer
from .nn import Normalize

__all__ = ["BoundNode", "UnsupportedLayerError", "capture", "normalize_params", "run_graph", "node_shapes",
           "tensor_input"]


class UnsupportedLayerError(TypeError):
    """The model contains a layer that bound propagation does not support."""


@dataclass
class BoundNode:
    """One step of bound propagation.

    ``kind`` is one of: input, linear, conv2d, relu, batchnorm, normalize, avgpool, identity, add, reshape,
    meta (a non-tensor value such as ``x.size(0)``), output. ``path`` is the module's qualified name (or the
    function's name); ``inputs`` are the names of the nodes it reads; ``call`` reproduces reshape/meta
    steps on concrete values."""

    name: str
    kind: str
    path: str
    inputs: list[str] = field(default_factory=list)
    module: nn.Module | None = None
    call: Callable[..., Any] | None = None
    users: int = 0

    def __repr__(self) -> str:
        return f"BoundNode({self.name!r}, {self.kind}, path={self.path!r}, inputs={self.inputs})"


def _is_foreign_normalize(m: nn.Module) -> bool:
    if "normalize" not in type(m).__name__.lower():
        return False
    return any(isinstance(getattr(m, a, None), (torch.Tensor, list, tuple)) and
               isinstance(getattr(m, b, None), (torch.Tensor, list, tuple))
               for a, b in (("means", "sds"), ("mean", "std")))


def normalize_params(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of a normalisation layer, as float64 tensors."""
    for a, b in (("mean", "std"), ("means", "sds")):
        mean, std = getattr(m, a, None), getattr(m, b, None)
        if mean is not None and std is not None:
            return (torch.as_tensor(mean, dtype=torch.float64).flatten(),
                    torch.as_tensor(std, dtype=torch.float64).flatten())
    raise UnsupportedLayerError(f"{type(m).__name__}: no mean/std attributes")


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Normalize) or _is_foreign_normalize(m) or super().is_leaf_module(m, qualname)


_MODULE_KINDS = (
    (nn.Linear, "linear"), (nn.Conv2d, "conv2d"), (nn.ReLU, "relu"),
    ((nn.BatchNorm1d, nn.BatchNorm2d), "batchnorm"), (nn.Flatten, "reshape"), (nn.AvgPool2d, "avgpool"),
    ((nn.Identity, nn.Dropout), "identity"), (Normalize, "normalize"),
)
# Kinds only some callers take (``capture(model, extra=...)``): the input-gradient paths of robustkern.flatness
# handle max pooling (a selection: piecewise linear), bound propagation does not.
_EXTRA_MODULE_KINDS = ((nn.MaxPool2d, "maxpool"),)
_RESHAPE_METHODS = {"view", "reshape", "flatten"}
SUPPORTED = ("Linear, Conv2d, ReLU, BatchNorm1d, BatchNorm2d, Flatten, AvgPool2d, Identity, Dropout (eval), "
             "Normalize, + of two branches, view/reshape/flatten keeping the batch dimension, F.linear / x @ W / "
             "F.conv2d with the model's own tensors as weights")


def _unsupported(what: str, where: str, node: fx.Node, extra=()) -> UnsupportedLayerError:
    also = "".join(f", {t.__name__}" for types, kind in _EXTRA_MODULE_KINDS if kind in extra
                   for t in (types if isinstance(types, tuple) else (types,)))
    return UnsupportedLayerError(
        f"robustkern.bounds: unsupported layer {what} at '{where}' (fx node '{node.name}'); supported: "
        f"{SUPPORTED}{also}")


def _module_kind(m: nn.Module, path: str, node: fx.Node, extra=()) -> str:
    if _is_foreign_normalize(m):
        return "normalize"
    for types, kind in _MODULE_KINDS + tuple(e for e in _EXTRA_MODULE_KINDS if e[1] in extra):
        if isinstance(m, types):
            break
    else:
        raise _unsupported(type(m).__name__, path, node, extra)
    if kind == "maxpool" and m.return_indices:
        raise _unsupported("MaxPool2d(return_indices=True)", path, node, extra)
    if kind == "conv2d":
        if m.padding_mode != "zeros":
            raise _unsupported(f"Conv2d(padding_mode={m.padding_mode!r})", path, node)
        if isinstance(m.padding, str):
            raise _unsupported(f"Conv2d(padding={m.padding!r}); give numeric padding", path, node)
    if kind == "avgpool" and m.ceil_mode:
        raise _unsupported("AvgPool2d(ceil_mode=True)", path, node)
    if kind == "batchnorm" and not m.affine and not m.track_running_stats:
        pass  # fine: identity scale, batch statistics
    return kind


def _module_call(m: nn.Module, input_name: str):
    return lambda values: m(values[input_name])


def capture(model: nn.Module, extra=()) -> list[BoundNode]:
    """Trace ``model`` and return its nodes in topological order (the last one is the output). ``extra``: kinds
    beyond the bound-propagation set that the caller handles (``"maxpool"``: ``nn.MaxPool2d``)."""
    tracer = _Tracer()
    if tracer.is_leaf_module(model, ""):     # a bare layer (nn.Linear(...) as the whole model): one step of a chain
        model = nn.Sequential(model)
    before = set(vars(model))
    try:
        graph = tracer.trace(model)
    except Exception as e:  # fx fails on data-dependent control flow and the like
        raise UnsupportedLayerError(
            f"robustkern.bounds: torch.fx could not trace {type(model).__name__}: {e}. Bound propagation needs "
            f"a model without data-dependent control flow, built from: {SUPPORTED}") from e
    finally:    # the constants fx set on the model while tracing: kept here, the model left as it was
        traced = {name: vars(model)[name] for name in set(vars(model)) - before if name.startswith("_tensor_constant")}
        for name in traced:
            delattr(model, name)
    nodes: list[BoundNode] = []
    by_name: dict[str, BoundNode] = {}
    constants: dict = {}     # the model's tensors read in forward, and expressions of them alone
    for node in graph.nodes:
        tensor_inputs = [a.name for a in node.all_input_nodes]
        if node.op == "get_attr":
            constants[node.name] = attribute_constant(model, str(node.target), traced)
            if constants[node.name] is None:
                raise _unsupported(f"constant tensor '{node.target}' made in forward (register it as a buffer)",
                                   str(node.target), node)
            continue
        if tensor_inputs and node.op in ("call_function", "call_method") and \
                all(name in constants for name in tensor_inputs):
            constants[node.name] = expression_constant(node, constants)
            continue
        if node.op in ("call_function", "call_method") and any(name in constants for name in tensor_inputs):
            layer = functional_layer(node, constants)
            if isinstance(layer, str):
                raise _unsupported(layer, getattr(node.target, "__name__", str(node.target)), node)
            kind, src, module = layer
            bn = BoundNode(node.name, kind, getattr(node.target, "__name__", str(node.target)), [src], module)
            nodes.append(bn)
            by_name[bn.name] = bn
            continue
        if node.op == "placeholder":
            if any(n.kind == "input" for n in nodes):
                raise UnsupportedLayerError("robustkern.bounds: models with more than one input are not supported")
            bn = BoundNode(node.name, "input", node.name)
        elif node.op == "call_module":
            m = model.get_submodule(node.target)
            kind = _module_kind(m, node.target, node, extra)
            bn = BoundNode(node.name, kind, node.target, tensor_inputs, m)
            if kind == "reshape":
                bn.call = _module_call(m, tensor_inputs[0])
        elif node.op == "call_function":
            bn = _function_node(node, tensor_inputs)
        elif node.op == "call_method":
            bn = _method_node(node, tensor_inputs)
        elif node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise UnsupportedLayerError("robustkern.bounds: the model must return a single tensor")
            bn = BoundNode(node.name, "output", "output", [out.name])
        else:  # pragma: no cover - fx's node kinds are the ones above
            raise _unsupported(f"fx node kind {node.op!r}", str(node.target), node)
        nodes.append(bn)
        by_name[bn.name] = bn
    for bn in nodes:
        for i in bn.inputs:
            by_name[i].users += 1
    return nodes


def _resolver(node: fx.Node):
    """A function mapping concrete values of the node's inputs (by name) to the node's (args, kwargs)."""
    def resolve(values: dict[str, Any]):
        return fx.node.map_arg((node.args, node.kwargs), lambda n: values[n.name])
    return resolve


def _function_node(node: fx.Node, inputs: list[str]) -> BoundNode:
    fn = node.target
    name = getattr(fn, "__name__", str(fn))
    if fn in (operator.add, torch.add, operator.iadd):
        if len(node.args) == 2 and not node.kwargs and len(inputs) == 1 and any(
                type(a) in (int, float) and a == 0 for a in node.args):
            return BoundNode(node.name, "identity", name, inputs)  # 0 + x: Python's sum() of branch outputs
        if len(node.args) != 2 or node.kwargs or not all(isinstance(a, fx.Node) for a in node.args):
            raise _unsupported(f"{name} with constants or alpha", name, node)
        return BoundNode(node.name, "add", name, inputs)
    if fn in (F.relu, torch.relu):
        return BoundNode(node.name, "relu", name, inputs[:1])
    if fn in (torch.flatten, torch.reshape):
        resolve = _resolver(node)
        return BoundNode(node.name, "reshape", name, inputs,
                         call=lambda values: fn(*resolve(values)[0], **resolve(values)[1]))
    if fn in (getattr, operator.getitem):
        resolve = _resolver(node)
        return BoundNode(node.name, "meta", name, inputs,
                         call=lambda values: fn(*resolve(values)[0]))
    raise _unsupported(f"function {name}", name, node)


def _method_node(node: fx.Node, inputs: list[str]) -> BoundNode:
    method = node.target
    resolve = _resolver(node)

    def call(values):
        args, kwargs = resolve(values)
        return getattr(args[0], method)(*args[1:], **kwargs)

    if method in _RESHAPE_METHODS:
        return BoundNode(node.name, "reshape", f".{method}()", inputs, call=call)
    if method in ("size", "dim"):
        return BoundNode(node.name, "meta", f".{method}()", inputs, call=call)
    if method == "relu":
        return BoundNode(node.name, "relu", ".relu()", inputs[:1])
    if method == "contiguous":
        return BoundNode(node.name, "identity", ".contiguous()", inputs[:1])
    raise _unsupported(f"method .{method}()", f".{method}()", node)


def run_graph(nodes: list[BoundNode], x, layer: Callable[[BoundNode, Any], Any], shapes: dict | None = None):
    """Run the captured network on ``x`` and return the output's value. ``layer(n, v)`` computes every layer
    node (ReLU included) from the value ``v`` of its (first) input; the input, Identity, ``+``, reshape and meta
    nodes are done here. With ``shapes`` given, the shape of every tensor value is recorded in it by node name.
    The one graph walker of the forward passes (bounds' shapes and batch statistics, the fused flatness passes)."""
    values: dict[str, Any] = {}
    for n in nodes:
        k = n.kind
        if k == "input":
            r = x
        elif k == "output":
            return values[n.inputs[0]]
        elif k == "add":
            r = values[n.inputs[0]] + values[n.inputs[1]]
        elif k in ("reshape", "meta"):
            r = n.call(values)
        elif k == "identity":
            r = values[n.inputs[0]]
        else:
            r = layer(n, values[n.inputs[0]])
        if shapes is not None and isinstance(r, torch.Tensor):
            shapes[n.name] = r.shape
        values[n.name] = r
    raise AssertionError("the captured graph has no output node")


def node_shapes(nodes: list[BoundNode], model: nn.Module, x1: torch.Tensor) -> dict[str, tuple]:
    """Per-example output shape of every tensor node (the input's too), from an eval-mode forward of one
    example ``x1``."""
    was = [(m, m.training) for m in model.modules()]
    model.eval()
    shapes: dict = {}
    try:
        with torch.no_grad():
            run_graph(nodes, x1, lambda n, v: torch.relu(v) if n.kind == "relu" else n.module(v), shapes)
    finally:
        for m, t in was:
            m.train(t)
    return {name: tuple(shape[1:]) for name, shape in shapes.items()}


def tensor_input(node: BoundNode, shapes: dict) -> str:
    """The name of the node's input that is a tensor (``shapes`` as ``node_shapes`` gives them), not a meta value."""
    return next(i for i in node.inputs if i in shapes)
