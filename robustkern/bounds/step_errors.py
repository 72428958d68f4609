"""The rounding-error vectors of CROWN's backward steps (``sound=True``; the derivation is in
``robustkern.bounds.crown``'s module docstring): for a step that maps coefficients ``A`` over a node's output to
its input, a vector ``v >= 0`` over the node's output such that the step's rounding error is at most ``|A| v``
per specification row. Each is computed once per bound computation (``ctx.error_vector``) from the step's
reduction depth (Higham's ``gamma_d``), its coefficients and the IBP magnitudes ``|h| <= m`` of the values it
multiplies. Dense rows (``robustkern.bounds.crown``) and patches (``robustkern.bounds.patches``) use the same
vectors; ``abs_dot`` is the dense rows' ``sum |A| v``, ``concretisation_outward`` the final widening of a
concretised bound.

One pass over ``|A|`` serves a ReLU and the step below it (``ErrorSum``). A ReLU step maps ``A`` to
``A' = A+ d_1 + A- d_2`` with slopes ``d`` in [0, 1] (upper line ``u+ / (u+ - l-)``, any lower slope), one of the
two products exactly zero, so ``|fl(a d)| <= |a|`` (rounding is monotone and ``a`` is representable): the
coefficients that the next step (the ReLU's input node) multiplies its error vector ``v`` with are bounded by the
ReLU's own ``|A|``, and ``|A'| v <= |A| v``. Where the ReLU's input node has no other user (so its coefficients are
``A'`` alone) the ReLU's term and the next step's are one product, ``|A| (v_relu + (1 + 8u) v_next)`` (the factor
covers slopes computed up to ``1 + 2u``, whatever the kernel's formula), the vector sum rounded up once per pass:
half the passes over ``|A|`` of a chain of layers and ReLUs, and a slightly larger term (``|A| >= |A'|``) of size
~``1e-13`` of the magnitudes in float64."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import gamma, next_down, next_up, round_up, tiny, unit_roundoff
from ..graph import BoundNode
from .precision import grow

__all__ = ["sum_bound", "abs_dot", "ErrorSum", "float32_upper_product", "concretisation_outward", "gemm_error",
           "affine_error", "avgpool_error", "relu_error", "is_channels_last"]


def is_channels_last(A: Tensor) -> bool:
    """Whether ``A`` (B, S, C, H, W) is laid out as (B, S, H, W, C) (a channels-last transposed convolution's
    output), with more than one channel."""
    return A.dim() == 5 and A.shape[2] > 1 and A.permute(0, 1, 3, 4, 2).is_contiguous()


def sum_bound(total: Tensor, n: int) -> Tensor:
    """An upper bound of the exact value of a computed sum ``total`` of ``n`` non-negative products (any order):
    ``total (1 + gamma_{n+1}) + n tiny`` in ``total``'s precision."""
    return total * (1 + gamma(n + 1, unit_roundoff(total.dtype))) + n * tiny(total.dtype)


def abs_dot(A: Tensor, v: Tensor) -> Tensor:
    """An upper bound of ``sum |A| v`` over the dimensions after (B, S), for ``A`` (B, S, *shape) and ``v >= 0``
    (B, *shape): one batched matrix-vector product in A's memory order, rounded up."""
    B, S = A.shape[:2]
    n = v[0].numel()
    if B > 1 and A.stride(0) == 0:      # rows every example shares (the identity): |A| once, one GEMM
        rows = A[0].abs().reshape(S, n)
        total = torch.mm(v.reshape(B, n).to(rows.dtype), rows.t())
        return sum_bound(total, n)
    absA = A.abs()
    if is_channels_last(absA):     # (B, S, H, W, C) in memory: match v to it instead of copying |A|
        rows, vec = absA.permute(0, 1, 3, 4, 2).reshape(B, S, n), v.permute(0, 2, 3, 1).reshape(B, n, 1)
    else:
        rows, vec = absA.reshape(B, S, n), v.reshape(B, n, 1)
    total = torch.bmm(rows, vec.to(rows.dtype)).squeeze(-1)
    return sum_bound(total, n)


# Node kinds whose step returns an error vector over their output: a ReLU's term can be carried to them.
_CARRIED_TO = ("linear", "conv2d", "batchnorm", "normalize", "avgpool")


class ErrorSum:
    """The error accumulator ``err`` (B, S) of one backward pass and side: ``add`` a step's ``|A| v``, with a ReLU's
    term held by ``relu`` and added together with the next step's (module docstring). ``dot(A, v, name)`` is the
    rounded-up ``sum |A| v`` of coefficients ``A`` over node ``name``'s output; ``merged`` a dict that keeps the
    summed vectors across the sides of a pass; ``first``: the index of the earliest node the pass goes through."""

    def __init__(self, ctx, zeros: Tensor, dot, merged: dict, first: int = 0):
        self.ctx, self.err, self.dot, self.merged, self.first = ctx, zeros, dot, merged, first
        self.held: dict = {}

    def term(self, t: Tensor) -> None:
        """An error term the caller computed (the constant's rounding, an addition where branches meet)."""
        self.err = self.err + t

    def relu(self, node: BoundNode, A, v: Tensor) -> None:
        """A ReLU step's term ``|A| v`` (``A`` over the ReLU's output): held for the ReLU's input node where that
        node has no other user and the pass goes through it, else added now."""
        src = self.ctx.by_name[node.inputs[0]]
        if src.users == 1 and src.kind in _CARRIED_TO and self.ctx.index[src.name] >= self.first:
            self.held[src.name] = (A, v, node.name)
        else:
            self.err = self.err + self.dot(A, v, node.name)

    def add(self, node: BoundNode, A, v: Tensor | None) -> None:
        """The term of ``node``'s step (``A`` over its output, ``v`` its error vector or None), with a ReLU term
        held for it: ``|A_relu| (v_relu + (1 + 8u) v)``."""
        held = self.held.pop(node.name, None)
        if held is None:
            if v is not None:
                self.err = self.err + self.dot(A, v, node.name)
            return
        A_relu, v_relu, relu = held
        if v is not None:
            hit = self.merged.get(relu)
            if hit is None or hit[0] is not v_relu or hit[1] is not v:
                u = unit_roundoff(v.dtype)
                hit = self.merged[relu] = (v_relu, v, grow(v_relu, v * (1 + 8 * u)))
            v_relu = hit[2]
        self.err = self.err + self.dot(A_relu, v_relu, relu)

    def total(self) -> Tensor:
        """``err`` with every held term added."""
        for A_relu, v_relu, relu in self.held.values():
            self.err = self.err + self.dot(A_relu, v_relu, relu)
        self.held = {}
        return self.err


def float32_upper_product(mag: Tensor, abs_w: Tensor, k: int) -> Tensor:
    """An upper bound, in float64, of ``mag |W|^T`` for ``mag >= 0`` (B, k) in float64 and ``|W|`` (N, k) exact in
    float32, from one float32 GEMM: ``mag`` rounded up to float32 (``>= mag``), the product ``Q`` of ``k``
    non-negative terms per entry within ``gamma_k(2^-24) Q`` plus ``k`` float32 tinies of its exact value (any
    summation order, Higham), so ``Q (1 + gamma_{k+1}) + k tiny`` bounds it; the extra ``2^-24`` of
    ``gamma_{k+1}`` over ``gamma_k`` covers the two float64 roundings of that expression. An error vector is
    ~``gamma_d(2^-53)`` times this product, so its ``2e-3`` relative looseness at ``k = 32768`` is ~1e-16 of the
    magnitudes; a float32 GEMM here costs half the float64 one and reads ``|W|`` in float32, not a float64 copy."""
    Q = round_up(mag, torch.float32) @ abs_w.t()
    return Q.to(torch.float64) * (1 + gamma(k + 1, unit_roundoff(torch.float32))) + k * tiny(torch.float32)


def gemm_error(ctx, node: BoundNode, fold: BoundNode | None = None) -> Tensor:
    """The per-output error vector ``v`` of a linear/conv step (see the module docstring), with the BatchNorm
    ``fold`` folded into it."""
    def make():
        m = node.module
        w, b = ctx.weight(node)
        mag = ctx.magnitude(node.inputs[0])
        u = unit_roundoff(ctx.dtype)
        if node.kind == "linear":
            k = w.shape[1]
            w_model = m.weight
            if w_model.dtype == torch.float32 and ctx.dtype == torch.float64:   # a float32 model's sound bounds
                P = float32_upper_product(mag.reshape(mag.shape[0], -1), w_model.detach().abs(), k)
            else:
                P = mag.reshape(mag.shape[0], -1) @ w.abs().t()
            depth = w.shape[0]
        else:
            k = w.shape[1] * w.shape[2] * w.shape[3]
            P = F.conv2d(mag, w.abs(), None, m.stride, m.padding, m.dilation, m.groups)
            depth = P[0].numel() + w.shape[0] * w.shape[2] * w.shape[3]
        if b is not None:
            P = P + b.abs().reshape((1, -1) + (1,) * (P.dim() - 2))
        P = P * (1 + gamma(k + 2, u)) + k * tiny(ctx.dtype)
        g = 2 * gamma(depth + 2, u)
        if fold is None:
            return g * P
        s, t, ds, dt = ctx.affine(fold)
        shape = (1, -1) + (1,) * (P.dim() - 2)
        ds = torch.zeros_like(s) if ds is None else ds.to(ctx.dtype)
        dt = torch.zeros_like(t) if dt is None else dt.to(ctx.dtype)
        return ((ds + g * s.abs()).reshape(shape) * P + (dt + g * t.abs()).reshape(shape)) * (1 + 4 * u)
    return ctx.error_vector(node.name if fold is None else fold.name, make)


def affine_error(ctx, node: BoundNode) -> Tensor:
    def make():
        s, t, ds, dt = ctx.affine(node)
        mag = ctx.magnitude(node.inputs[0])
        u = unit_roundoff(ctx.dtype)
        shape = (1, -1) + (1,) * (mag.dim() - 2)
        ds = torch.zeros_like(s) if ds is None else ds.to(ctx.dtype)
        dt = torch.zeros_like(t) if dt is None else dt.to(ctx.dtype)
        g = gamma(mag[0].numel() + 2, u)
        return ((ds + 2 * u * s.abs()).reshape(shape) * mag + (dt + g * t.abs()).reshape(shape)) * (1 + 4 * u)
    return ctx.error_vector(node.name, make)


def avgpool_error(ctx, node: BoundNode) -> Tensor:
    def make():
        m = node.module
        k = m.kernel_size if isinstance(m.kernel_size, int) else m.kernel_size[0] * m.kernel_size[1]
        k = k * k if isinstance(m.kernel_size, int) else k
        g = 2 * gamma(k + 2, unit_roundoff(ctx.dtype))
        return g * m(ctx.magnitude(node.inputs[0])) * (1 + g) + k * tiny(ctx.dtype)
    return ctx.error_vector(node.name, make)


def relu_error(ctx, node: BoundNode) -> Tensor:
    bounds = ctx.relu_bounds[node.inputs[0]]      # (full CROWN replaces them with tighter ones)
    cached = ctx._errors.get(node.name)
    if cached is not None and cached[0] is not bounds:
        del ctx._errors[node.name]

    def make():
        lo, hi = bounds
        u = unit_roundoff(ctx.dtype)
        lm = lo.clamp(max=0).abs()
        up = torch.maximum(hi.clamp(min=0), -lm + 1e-8)
        n = lo.shape[1]
        v = 3 * u * (up + lm) + 2 * u * torch.maximum(lo.abs(), hi.abs()) + gamma(n + 2, u) * lm * (1 + u)
        v = v * (1 + 4 * u) + 4 * tiny(ctx.dtype)
        return bounds, v.reshape((v.shape[0],) + tuple(ctx.shapes[node.inputs[0]]))
    return ctx.error_vector(node.name, make)[1]


def concretisation_outward(val: Tensor, mag: Tensor, err: Tensor, n: int, upper: bool) -> Tensor:
    """A concretised bound ``val`` (sums of ``n`` terms whose magnitudes sum to ``mag``) widened by its own rounding
    and the accumulated step errors ``err``, then moved one ulp outwards."""
    u = unit_roundoff(val.dtype)
    slack = gamma(n + 3, u) * mag * (1 + gamma(n + 3, u)) + (n + 3) * tiny(val.dtype) + err * (1 + 4 * u)
    return next_up(val + slack) if upper else next_down(val - slack)
