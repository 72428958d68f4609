"""Walk a captured network forwards and backwards: the traversal shared by the two input-gradient paths.

``robustkern.flatness.fused`` (the ``robustkern::`` op chain, ``impl="ops"``) and
``robustkern.flatness.fused_step`` (one autograd node with a hand-written double backward, the CPU default) run
the same graph, the ``BoundNode`` list of ``robustkern.graph.capture``, and differ in what they do at
a layer. The walkers here do the graph's bookkeeping:

    run_graph   (``robustkern.graph.run_graph``, re-exported) values by node name; the input, Identity, ``+``
                of branches, reshape/meta steps (``n.call``); the shape of every node's value (``shapes``: what
                the transposed maps need)
    transpose   from the output's seed to the input: gradients by node name, summed where a value has several
                users; ``+`` passes its gradient to both branches, a reshape back to its input's shape, Identity on

and hand every layer (Linear, Conv2d, ReLU, BatchNorm, Normalize, AvgPool2d, MaxPool2d) to the caller's
callback. The layer maps both paths compute alike are here too: ``layer_forward`` (the layer as the model runs
it), ``layer_jvp`` (its Jacobian product: the layer without bias or shift) and ``layer_vjp`` (the transposed
Jacobian of the layers that are the same linear map in both paths: BatchNorm in eval mode, Normalize,
AvgPool2d), and the max pool's three maps given its selections (``maxpool_*``: each path keeps the indices on
its own tape). ReLU and the transposes of Linear/Conv2d are each path's own (bit masks and fused ops vs. saved
outputs and GEMM/fold kernels).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..graph import BoundNode, normalize_params, run_graph

__all__ = ["run_graph", "transpose", "layer_forward", "layer_jvp", "layer_vjp", "channel_shape", "bn_inv_std",
           "bn_scale", "maxpool_forward", "maxpool_jvp", "maxpool_vjp"]


# ----------------------------------------------------------------------------------------------- layer maps
def channel_shape(like: Tensor) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel vector over ``like`` (channels in dimension 1)."""
    return (1, -1) + (1,) * (like.dim() - 2)


def bn_inv_std(m, like: Tensor) -> Tensor:
    """``1 / sqrt(running_var + eps)`` of an eval-mode BatchNorm, shaped to broadcast over ``like``."""
    return torch.rsqrt(m.running_var.to(like.dtype) + m.eps).reshape(channel_shape(like))


def bn_scale(m, like: Tensor) -> Tensor:
    """Eval-mode BatchNorm is ``x * scale + shift`` per channel; ``scale = weight / sqrt(running_var + eps)``."""
    s = bn_inv_std(m, like)
    return s * m.weight.reshape(channel_shape(like)) if m.weight is not None else s


def _normalize_std(m, like: Tensor) -> Tensor:
    return normalize_params(m)[1].to(like.dtype).to(like.device).reshape(channel_shape(like))


def _pool_args(m):
    """``(kernel, stride, padding, ceil_mode, count_include_pad, divisor_override)`` of an AvgPool2d, in the
    argument order of ``F.avg_pool2d`` and ``aten.avg_pool2d_backward``."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    kernel = pair(m.kernel_size)
    stride = pair(m.stride) if m.stride else kernel
    return kernel, stride, pair(m.padding), m.ceil_mode, m.count_include_pad, m.divisor_override


def _maxpool_args(m):
    """``(kernel, stride, padding, dilation, ceil_mode)`` of a MaxPool2d, as ``aten.max_pool2d_with_indices``
    takes them."""
    pair = lambda v: [v, v] if isinstance(v, int) else list(v)  # noqa: E731
    kernel = pair(m.kernel_size)
    return kernel, pair(m.stride) if m.stride else kernel, pair(m.padding), pair(m.dilation), m.ceil_mode


def maxpool_forward(n: BoundNode, v: Tensor) -> tuple[Tensor, Tensor]:
    """``(out, idx)``: MaxPool2d and, per output element, the flat ``H*W`` index of the input it selects. The
    pool is linear given ``idx`` (a selection), which fixes its Jacobian, as the ReLU masks fix theirs."""
    return torch.ops.aten.max_pool2d_with_indices(v, *_maxpool_args(n.module))


def maxpool_jvp(v: Tensor, idx: Tensor) -> Tensor:
    """``J v`` of a max pool with selections ``idx``: the selected elements of ``v`` (a gather)."""
    return v.flatten(-2).gather(-1, idx.flatten(-2)).view(idx.shape)


def maxpool_vjp(n: BoundNode, g: Tensor, idx: Tensor, shapes: dict) -> Tensor:
    """``J^T g`` of a max pool with selections ``idx``: ``g`` scattered (added) to the selected inputs, by
    ``aten.max_pool2d_with_indices_backward`` (differentiable in ``g``: its own transpose is the gather)."""
    like = g.new_zeros(()).expand(shapes[n.inputs[0]])
    return torch.ops.aten.max_pool2d_with_indices_backward(g, like, *_maxpool_args(n.module), idx)


def layer_forward(n: BoundNode, v: Tensor) -> Tensor:
    """The layer ``n`` (Linear, Conv2d, eval-mode BatchNorm, Normalize, AvgPool2d) applied to ``v``."""
    k, m = n.kind, n.module
    if k == "linear":
        return F.linear(v, m.weight, m.bias)
    if k == "conv2d":
        return F.conv2d(v, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)
    if k == "batchnorm":
        return F.batch_norm(v, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)
    if k == "normalize":
        mean, std = (t.to(v.dtype).to(v.device).reshape(channel_shape(v)) for t in normalize_params(m))
        return (v - mean) / std
    if k == "avgpool":
        return F.avg_pool2d(v, *_pool_args(m))
    raise AssertionError(k)


def layer_jvp(n: BoundNode, v: Tensor) -> Tensor:
    """``J_n v`` for the same layers: the layer without its bias or shift (they are affine maps)."""
    k, m = n.kind, n.module
    if k == "linear":
        return F.linear(v, m.weight)
    if k == "conv2d":
        return F.conv2d(v, m.weight, None, m.stride, m.padding, m.dilation, m.groups)
    if k == "batchnorm":
        return v * bn_scale(m, v)
    if k == "normalize":
        return v / _normalize_std(m, v)
    if k == "avgpool":
        return F.avg_pool2d(v, *_pool_args(m))
    raise AssertionError(k)


def layer_vjp(n: BoundNode, g: Tensor, shapes: dict) -> Tensor:
    """``J_n^T g`` for eval-mode BatchNorm, Normalize and AvgPool2d (``shapes``: node name -> output shape, as
    ``run_graph`` records it; the pool's input shape is read from it)."""
    k, m = n.kind, n.module
    if k == "batchnorm":
        return g * bn_scale(m, g)
    if k == "normalize":
        return g / _normalize_std(m, g)
    if k == "avgpool":
        like = g.new_zeros(()).expand(shapes[n.inputs[0]])
        return torch.ops.aten.avg_pool2d_backward(g, like, *_pool_args(m))
    raise AssertionError(k)


# ----------------------------------------------------------------------------------------------- walkers
def transpose(nodes: list[BoundNode], seed: Tensor, vjp: Callable[[BoundNode, Tensor], tuple[str, Tensor]],
              shapes: dict, on_node: Callable[[BoundNode, Tensor], None] | None = None,
              skip=frozenset()) -> Tensor | None:
    """``J^T seed`` from the output node back to the input node (None if no gradient reaches it).

    ``vjp(n, g)`` -> ``(name, gradient)``: a layer node's transposed map of its output gradient ``g``, and the
    node that receives it (the layer's input, or the input of a node the layer absorbs, such as a ReLU whose
    mask it applies; an absorbed node then receives no gradient and is passed over). ``shapes``: the output
    shapes ``run_graph`` recorded. ``on_node(n, g)`` sees the gradient at the output of every node reached
    (before it is propagated). Nodes in ``skip`` receive nothing (and layers feeding them are not transposed)."""
    grads: dict[str, Tensor] = {}

    def give(name: str, g: Tensor) -> None:
        if name in skip:
            return
        grads[name] = g if name not in grads else grads[name] + g

    for n in reversed(nodes):
        k = n.kind
        if k == "output":
            give(n.inputs[0], seed)
            continue
        if k == "input":
            return grads.get(n.name)
        if k == "meta" or n.name not in grads:
            continue
        g = grads.pop(n.name)
        if on_node is not None:
            on_node(n, g)
        if k == "add":
            give(n.inputs[0], g)
            give(n.inputs[1], g)
        elif k == "reshape":
            src = next(i for i in n.inputs if i in shapes)
            give(src, g.reshape(shapes[src]))
        elif k == "identity":
            give(n.inputs[0], g)
        elif n.inputs[0] not in skip:
            give(*vjp(n, g))
    raise AssertionError("the captured graph has no input node")
