"""Layers written as functions of the model's own tensors, for ``robustkern.graph.capture``.

A forward may apply its weights without ``nn.Linear``/``nn.Conv2d`` modules: ``F.linear(x, self.weight,
self.bias)``, ``x.matmul(self.w.t())``, ``x @ self.w``, ``torch.mm(x, w)``, ``F.conv2d(x, self.weight, self.bias,
stride, padding, dilation, groups)``, the tensors being parameters, buffers or plain tensor attributes of the model,
possibly through constant expressions (``self.w.t()``, ``self.w * 2``). torch.fx records those tensors as
``get_attr`` nodes; here each one, and each expression of them alone, becomes a *constant*: a function that reads
it from the model when called. A ``linear``/``conv2d`` call on one traced tensor and constants becomes a layer node
whose module is a ``FunctionalLinear``/``FunctionalConv2d``: an ``nn.Linear``/``nn.Conv2d`` whose ``weight`` and
``bias`` are those constants, evaluated on every access, so bound propagation sees the current values (after an
optimiser step) and its gradients reach the model's parameters.
"""
from __future__ import annotations

import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

__all__ = ["FunctionalLinear", "FunctionalConv2d", "attribute_constant", "expression_constant", "functional_layer"]

Constant = Callable[[], Any]

_LINEAR = (F.linear,)
_MATMUL_FUNCTIONS = (torch.matmul, operator.matmul, torch.mm)
_MATMUL_METHODS = ("matmul", "mm", "__matmul__")
_CONV2D = (F.conv2d, torch.conv2d)


class _ConstantWeights:
    """``weight`` and ``bias`` read from the model by the constants ``_weight``/``_bias`` on every access."""

    @property
    def weight(self) -> torch.Tensor:
        return self._weight()

    @property
    def bias(self) -> torch.Tensor | None:
        return None if self._bias is None else self._bias()


class FunctionalLinear(_ConstantWeights, nn.Linear):
    """``nn.Linear`` whose weight (out, in) and bias are read from the model on every access."""

    def __init__(self, weight: Constant, bias: Constant | None):
        nn.Module.__init__(self)
        w = weight()
        self.out_features, self.in_features = w.shape
        self._weight, self._bias = weight, bias


class FunctionalConv2d(_ConstantWeights, nn.Conv2d):
    """``nn.Conv2d`` (zero padding) whose weight and bias are read from the model on every access."""

    def __init__(self, weight: Constant, bias: Constant | None, stride, padding, dilation, groups: int):
        nn.Module.__init__(self)
        w = weight()
        self.out_channels, cin, kh, kw = w.shape
        self.in_channels, self.kernel_size, self.groups = cin * groups, (kh, kw), groups
        self.stride, self.padding, self.dilation = (nn.modules.utils._pair(v) for v in (stride, padding, dilation))
        self.transposed, self.output_padding, self.padding_mode = False, (0, 0), "zeros"
        self._reversed_padding_repeated_twice = [p for p in reversed(self.padding) for _ in range(2)]
        self._weight, self._bias = weight, bias


def attribute_constant(model: nn.Module, target: str, traced: dict) -> Constant | None:
    """The model's tensor at the dotted path ``target``, read when called. fx evaluates expressions of plain tensor
    attributes while tracing (``self.w.t()`` with ``w`` not a parameter) and keeps the result as
    ``_tensor_constant<k>``: served when it is such an attribute or a view of one (it shares its storage, so it
    follows in-place updates); None for a tensor created in forward (``torch.randn(...)`` there would be frozen
    at its traced value: it must be a registered buffer) or a path that holds no tensor. ``traced``: fx's
    constants by name (taken off the model after tracing)."""
    if target in traced:
        value = traced[target]
        attributes = _tensor_attributes(model)
        if not isinstance(value, torch.Tensor) or not (id(value) in attributes or id(value._base) in attributes):
            return None
        return lambda: value

    def read():
        value = model
        for part in target.split("."):
            value = getattr(value, part)
        return value
    try:
        return read if isinstance(read(), torch.Tensor) else None
    except AttributeError:
        return None


def _tensor_attributes(model: nn.Module) -> set[int]:
    """The ids of the tensors held by ``model``'s modules as attributes (parameters, buffers, plain tensors), not
    counting fx's own constants."""
    found = set()
    for module in model.modules():
        for name, value in list(vars(module).items()) + list(module._parameters.items()) + \
                list(module._buffers.items()):
            if isinstance(value, torch.Tensor) and not name.startswith("_tensor_constant"):
                found.add(id(value))
    return found


def expression_constant(node: fx.Node, constants: dict[str, Constant]) -> Constant:
    """A function of constants only (``w.t()``, ``w * 2``): evaluated from their current values when called."""
    def value():
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: constants[n.name]())
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)
    value()     # fails now, at capture, if the expression does
    return value


def _bind(node: fx.Node, names: tuple[str, ...], defaults: dict) -> dict:
    bound = dict(defaults)
    bound.update(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _constant(arg, constants: dict[str, Constant]) -> Constant | None:
    return constants.get(arg.name) if isinstance(arg, fx.Node) else None


def functional_layer(node: fx.Node, constants: dict[str, Constant]) -> tuple[str, str, nn.Module] | str:
    """``(kind, traced input's name, module)`` for a linear / matmul / conv2d call of one traced tensor with
    constant weights; otherwise a phrase saying what is not supported."""
    fn = node.target
    if node.op == "call_function" and fn in _LINEAR:
        a = _bind(node, ("input", "weight", "bias"), {"bias": None})
        x, w, b = a["input"], _constant(a["weight"], constants), a["bias"]
        if w is None or not isinstance(x, fx.Node) or x.name in constants:
            return "linear with a traced weight (only the model's own tensors are constant weights)"
        bias = None if b is None else _constant(b, constants)
        if b is not None and bias is None:
            return "linear with a traced bias"
        if w().dim() != 2:
            return "linear with a weight that is not a matrix"
        return "linear", x.name, FunctionalLinear(w, bias)
    if (node.op == "call_function" and fn in _MATMUL_FUNCTIONS) or (
            node.op == "call_method" and fn in _MATMUL_METHODS):
        if len(node.args) != 2 or node.kwargs:
            return f"{getattr(fn, '__name__', fn)} with other than two operands"
        x, w = node.args
        wc = _constant(w, constants)
        if wc is None or not isinstance(x, fx.Node) or x.name in constants:
            return "matmul of two traced tensors, or with the constant first (x @ W with W the model's own is)"
        if wc().dim() != 2:
            return "matmul with a constant that is not a matrix"
        return "linear", x.name, FunctionalLinear(lambda: wc().t(), None)
    if node.op == "call_function" and fn in _CONV2D:
        a = _bind(node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups"),
                  {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1})
        x, w, b = a["input"], _constant(a["weight"], constants), a["bias"]
        bias = None if b is None else _constant(b, constants)
        if w is None or not isinstance(x, fx.Node) or x.name in constants or (b is not None and bias is None):
            return "conv2d with a traced weight or bias"
        if isinstance(a["padding"], str):
            return f"conv2d(padding={a['padding']!r}); give numeric padding"
        if any(isinstance(a[k], fx.Node) for k in ("stride", "padding", "dilation", "groups")):
            return "conv2d with traced stride, padding, dilation or groups"
        return "conv2d", x.name, FunctionalConv2d(w, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
    return f"{getattr(fn, '__name__', fn)} with the model's tensors as operands"
