"""The whole input-gradient pass as one autograd node with a hand-written double backward (the CPU fast path).

``fused.input_gradient(create_graph=True)`` on CPU runs ``_InputGradientPass``: one ``torch.autograd.Function``
whose forward takes ``x`` and the parameters and returns ``(z, g)``, the logits and the per-example input
gradient ``g = J^T s`` of ``sum_i CE(z_i, y_i)`` (``s = softmax(z) - onehot(y)``; ``J`` the logit Jacobian,
fixed by the ReLU masks), and whose backward is the double backward written out. For an incoming ``(u, h)``
(the adjoints of ``z`` and ``g``):

    1. tangent pass      ``t = J h`` through the linearised network (no biases; ReLU masks from the saved
                         ReLU outputs, ``1[relu(a) > 0] = 1[a > 0]``), and at every Linear/Conv2d/BatchNorm the
                         parameter gradient of ``<h, J^T s>`` at fixed ``s``: ``G_n^T t_in`` (``G_n`` = the
                         input-gradient pass at the layer's output, ``t_in`` the tangent at its input);
    2. seed              ``u + (diag p - p p^T) t_out`` (``p = softmax(z)``: the derivative of the seed ``s``);
    3. backward          through the network's forward graph: the ordinary parameter gradients (and ``x``'s).

Per Linear/Conv2d that is the same six products as PyTorch's double backprop (forward, input-gradient pass,
tangent, backward, two weight gradients), in one autograd node for the whole pass rather than one per op (a
``robustkern::`` op costs ~0.1 ms of dispatch on the CPU), with ATen called for only the outputs needed
(``convolution_backward`` with one output mask, ``threshold_backward`` for the masks read from the ReLU outputs),
no products towards ``x`` unless ``x`` requires grad, and the cheaper CPU kernel per layer shape (``_conv_t``,
``_conv_wgrad``): a strided layer with few input channels takes its input gradient as a GEMM + ``fold``
(col2im), other strided layers oneDNN's transposed convolution in channels-last, and a layer with one input
channel its weight gradient as ``unfold`` + one GEMM. Timings: ``benchmarks/bench_flatness_fused.py`` and
``benchmarks/RESULTS.md``.

The backward is itself not differentiable (``once_differentiable``: a third derivative raises); the op-based
path of ``robustkern.flatness.fused`` (``impl="ops"``) keeps every order. Exact as PyTorch's double backprop
wherever no pre-activation is exactly 0 (equal in float64 up to rounding; tests/test_flatness_fused.py).

The forward, tangent and transposed passes walk the captured graph with ``robustkern.flatness._walk`` (shared
with ``fused.py``); this module supplies the per-layer maps (``_Pass.vjp``/``jvp``) and the parameter gradients.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..graph import BoundNode
from . import _walk as walk
from ._walk import bn_inv_std, channel_shape

__all__ = ["input_gradient_pass", "lfr_direction"]

_PARAM_KINDS = ("linear", "conv2d", "batchnorm")
_aten = torch.ops.aten


def _conv_args(m):
    return list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], m.groups


FOLD_MAX_IN = 4          # a strided layer with at most this many input channels: input gradient by GEMM + fold
STRIDED_CHANNELS_LAST = True   # other strided layers: oneDNN's transposed convolution in channels-last


def _conv_t(g: Tensor, m, like: Tensor) -> Tensor:
    """Input gradient of ``conv2d(., m.weight)`` (the transposed convolution) given the output gradient ``g``;
    ``like`` is the layer's input (its shape is used, not its values). Kernel choices measured on one core
    (AMD EPYC, batch 128, the DM MNIST layers): a strided layer with few input channels (the first layer of an
    image model) takes one GEMM ``W^T g`` per example and a ``fold`` (col2im): 3x faster than oneDNN's
    transposed convolution with 1 output channel; other strided layers run oneDNN in channels-last (up to 1.4x,
    conversions included); stride-1 layers run ATen's NCHW kernel, which was fastest for them (fold and
    channels-last 1.6x slower there)."""
    w = m.weight
    plain = m.groups == 1 and tuple(m.dilation) == (1, 1) and isinstance(m.padding, tuple)
    strided = g.dim() == 4 and max(m.stride) > 1
    if strided and plain and w.shape[1] <= FOLD_MAX_IN:
        b, c_out, oh, ow = g.shape
        cols = torch.matmul(w.reshape(c_out, -1).t(), g.reshape(b, c_out, oh * ow))
        return F.fold(cols, like.shape[2:], w.shape[2:], padding=m.padding, stride=m.stride)
    if strided and STRIDED_CHANNELS_LAST:
        cl = torch.channels_last
        like = torch.empty(like.shape, dtype=like.dtype, device=like.device, memory_format=cl)
        return _aten.convolution_backward(g.contiguous(memory_format=cl), like, m.weight, None, *_conv_args(m),
                                          [True, False, False])[0].contiguous()
    return _aten.convolution_backward(g, like, m.weight, None, *_conv_args(m), [True, False, False])[0]


def _conv_wgrad(g: Tensor, inp: Tensor, m) -> Tensor:
    """Weight gradient of ``conv2d(inp, m.weight)`` given the output gradient ``g``. With one input channel
    (the first layer of a grey-scale model) one GEMM of the ``unfold``-ed input (im2col) and ``g`` viewed as
    (B*H'*W', C_out): 2.4-2.8x faster than oneDNN's weight gradient there on one core."""
    w = m.weight
    if m.groups == 1 and w.shape[1] == 1 and tuple(m.dilation) == (1, 1) and isinstance(m.padding, tuple):
        b, c_out, oh, ow = g.shape
        cols = F.unfold(inp, w.shape[2:], padding=m.padding, stride=m.stride)  # (B, kH*kW, H'*W')
        gm = g.permute(0, 2, 3, 1).reshape(b * oh * ow, c_out)
        return cols.transpose(0, 1).reshape(cols.shape[1], -1).matmul(gm).t().reshape(w.shape)
    return _aten.convolution_backward(g, inp, m.weight, None, *_conv_args(m), [False, True, False])[1]


class _Pass:
    """The captured network and what the forward keeps, shared by forward and backward."""

    def __init__(self, nodes: list[BoundNode]):
        self.nodes = nodes
        self.shapes: dict[str, torch.Size] = {}
        self.saved_index: dict[str, int] = {}   # node name -> index in ctx.saved_tensors (forward values)
        self.grad_index: dict[str, int] = {}    # param layer -> index of G_n (input-gradient pass at its output)

    # --- the linear maps of one layer (the rest of the graph is walked by robustkern.flatness._walk) -------
    def vjp(self, n: BoundNode, g: Tensor, saved) -> Tensor:
        """``J_n^T g`` for the layer's input; masks from the saved ReLU outputs."""
        k, m = n.kind, n.module
        if k == "linear":
            return g.matmul(m.weight)
        if k == "conv2d":
            return _conv_t(g, m, saved[self.saved_index[n.inputs[0]]])
        if k == "relu":
            return _aten.threshold_backward(g, saved[self.saved_index[n.name]], 0)
        if k == "maxpool":
            return walk.maxpool_vjp(n, g, saved[self.saved_index[_idx(n)]], self.shapes)
        return walk.layer_vjp(n, g, self.shapes)

    def jvp(self, n: BoundNode, v: Tensor, saved) -> Tensor:
        """``J_n v`` for the layer's input value ``v`` (the linearised layer: no bias, the recorded mask)."""
        if n.kind == "relu":
            return _aten.threshold_backward(v, saved[self.saved_index[n.name]], 0)
        if n.kind == "maxpool":
            return walk.maxpool_jvp(v, saved[self.saved_index[_idx(n)]])
        return walk.layer_jvp(n, v)

    def input_side(self) -> set[str]:
        """Nodes between the input and the first parameter layer (their gradients only feed ``x``'s)."""
        side: set[str] = set()
        for n in self.nodes:
            if n.kind == "input" or (n.kind in ("normalize", "identity", "reshape", "meta")
                                     and n.inputs and all(i in side for i in n.inputs)):
                side.add(n.name)
        return side

    def transpose(self, seed: Tensor, saved, on_node=None, need_input: bool = True) -> Tensor | None:
        """``J^T seed`` from the output to the input node; ``on_node(n, g_out)`` sees the gradient at the
        output of every node on the way (before it is propagated). ``need_input=False`` skips the products
        that only lead to the input's gradient (returns None)."""
        return walk.transpose(self.nodes, seed, lambda n, g: (n.inputs[0], self.vjp(n, g, saved)), self.shapes,
                              on_node, set() if need_input else self.input_side())

    def tangent(self, t: Tensor, saved, on_layer=None) -> Tensor:
        """``J t`` through the linearised network; ``on_layer(n, t_in)`` sees the tangent at the input of every
        layer (before the layer's map)."""
        def layer(n: BoundNode, v: Tensor) -> Tensor:
            if on_layer is not None:
                on_layer(n, v)
            return self.jvp(n, v, saved)

        return walk.run_graph(self.nodes, t, layer)


def _idx(n: BoundNode) -> str:
    """The key under which a max pool's selections are kept."""
    return n.name + ".idx"


def _forward_values(p: _Pass, x: Tensor):
    """Run the network; returns (logits, values kept for the backward by node name): the inputs of the
    Linear/Conv2d/BatchNorm layers (a BatchNorm's only when it has a weight), the ReLU outputs and the max
    pools' selections."""
    keep: dict[str, Tensor] = {}

    def layer(n: BoundNode, v: Tensor) -> Tensor:
        k = n.kind
        if k == "relu":
            keep[n.name] = r = torch.relu(v)
            return r
        if k == "maxpool":
            r, keep[_idx(n)] = walk.maxpool_forward(n, v)
            return r
        if k in ("linear", "conv2d") or (k == "batchnorm" and n.module.weight is not None):
            keep[n.inputs[0]] = v
        return walk.layer_forward(n, v)

    return walk.run_graph(p.nodes, x, layer, p.shapes), keep


class _InputGradientPass(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p: _Pass, params: list, y: Tensor, x: Tensor, *flat: Tensor):
        ctx.params = params
        z, keep = _forward_values(p, x)
        if z.dim() != 2:
            raise ValueError(f"robustkern.flatness.fused: the model must output (B, classes) logits, got shape "
                             f"{tuple(z.shape)}")
        s = _seed(z, y)
        grads_at: dict[str, Tensor] = {}

        def record(n, g):
            if n.kind in _PARAM_KINDS:
                grads_at[n.name] = g

        keep_list = list(keep.values())
        p.saved_index = {name: i for i, name in enumerate(keep)}
        g = p.transpose(s, keep_list, record)
        p.grad_index = {name: len(keep_list) + i for i, name in enumerate(grads_at)}
        ctx.p = p
        ctx.save_for_backward(*keep_list, *grads_at.values(), z)
        return z, g.contiguous()

    @staticmethod
    @once_differentiable
    def backward(ctx, adj_z, adj_g):
        p: _Pass = ctx.p
        saved = ctx.saved_tensors
        z = saved[-1]
        grads: dict[int, Tensor] = {}   # id(param) -> gradient

        def add(param, value):
            if param is None or value is None:
                return
            grads[id(param)] = value if id(param) not in grads else grads[id(param)] + value

        # 1. tangent pass and the parameter gradients of <h, J^T s> at fixed s
        seed_adj = adj_z if adj_z is not None else torch.zeros_like(z)
        if adj_g is not None:
            def param_grads(n, tin):
                if n.name not in p.grad_index:
                    return
                G, m = saved[p.grad_index[n.name]], n.module
                if n.kind == "linear":
                    add(m.weight, G.reshape(-1, G.shape[-1]).t().matmul(tin.reshape(-1, tin.shape[-1])))
                elif n.kind == "conv2d":
                    add(m.weight, _conv_wgrad(G, tin, m))
                elif m.weight is not None:  # batchnorm: <h, G * w * inv_std> in w
                    dims = [0] + list(range(2, G.dim()))
                    add(m.weight, (G * tin).sum(dims) * bn_inv_std(m, G).flatten())

            tout = p.tangent(adj_g, saved, param_grads)
            # 2. the seed's derivative: (diag p - p p^T) t_out
            prob = torch.softmax(z, dim=-1)
            seed_adj = seed_adj + prob * (tout - (prob * tout).sum(-1, keepdim=True))

        # 3. the ordinary backward through the forward graph
        def on_node(n, delta):
            m = n.module
            if n.kind == "linear":
                a = saved[p.saved_index[n.inputs[0]]]
                d2, a2 = delta.reshape(-1, delta.shape[-1]).t(), a.reshape(-1, a.shape[-1])
                if id(m.weight) in grads:  # accumulate in place: one pass over the (large) weight gradient
                    grads[id(m.weight)] = grads[id(m.weight)].addmm_(d2, a2)
                else:
                    add(m.weight, d2.matmul(a2))
                if m.bias is not None:
                    add(m.bias, delta.reshape(-1, delta.shape[-1]).sum(0))
            elif n.kind == "conv2d":
                a = saved[p.saved_index[n.inputs[0]]]
                add(m.weight, _conv_wgrad(delta, a, m))
                if m.bias is not None:
                    add(m.bias, delta.sum((0, 2, 3)))
            elif n.kind == "batchnorm":
                dims = [0] + list(range(2, delta.dim()))
                if m.weight is not None:
                    a = saved[p.saved_index[n.inputs[0]]]
                    xhat = (a - m.running_mean.to(a.dtype).reshape(channel_shape(a))) * bn_inv_std(m, a)
                    add(m.weight, (delta * xhat).sum(dims))
                if m.bias is not None:
                    add(m.bias, delta.sum(dims))

        dx = p.transpose(seed_adj, saved, on_node, need_input=ctx.needs_input_grad[3])
        if dx is not None:
            dx = dx.contiguous()
        return (None, None, None, dx if ctx.needs_input_grad[3] else None,
                *(grads.get(id(q)) if need else None for q, need in zip(ctx.params, ctx.needs_input_grad[4:])))


def _params(nodes: list[BoundNode]) -> list[Tensor]:
    out, seen = [], set()
    for n in nodes:
        if n.kind in _PARAM_KINDS:
            for q in (n.module.weight, n.module.bias):
                if q is not None and id(q) not in seen:
                    seen.add(id(q))
                    out.append(q)
    return out


def input_gradient_pass(nodes: list[BoundNode], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, g)`` as one autograd node whose backward is the hand-written double backward (module doc)."""
    params = _params(nodes)
    return _InputGradientPass.apply(_Pass(nodes), params, y, x, *params)


def _seed(z: Tensor, y: Tensor) -> Tensor:
    return torch.softmax(z, dim=-1).scatter_add(-1, y.unsqueeze(-1), z.new_full((z.shape[0], 1), -1.0))


def lfr_direction(nodes: list[BoundNode], x: Tensor, y: Tensor, dual) -> Tensor:
    """``J^T (diag p - p p^T) J v`` with ``v = dual(g)``, ``g = J^T s`` (``fused.lfr_ascent_direction``), with
    plain ATen calls and no graph: one forward, two transposed passes, one tangent pass."""
    p = _Pass(nodes)
    with torch.no_grad():
        z, keep = _forward_values(p, x)
        saved = list(keep.values())
        p.saved_index = {name: i for i, name in enumerate(keep)}
        g = p.transpose(_seed(z, y), saved)
        out = p.tangent(dual(g), saved)
        prob = torch.softmax(z, dim=-1)
        return p.transpose(prob * (out - (prob * out).sum(-1, keepdim=True)), saved).contiguous()
