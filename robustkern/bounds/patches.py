"""Patches: the coefficients of a CROWN backward pass that starts at a convolution-shaped node, kept as one small
kernel per specification row instead of a dense (rows x all neurons) matrix.

A backward pass for intermediate bounds starts from the identity specification of a node ``h0`` (C0, H0, W0):
row ``r`` is the unit vector of neuron ``(c_r, y_r, x_r)``. Through convolutions, ReLUs, per-channel affine
maps, simple average pooling and residual additions, the coefficients of row ``r`` over an earlier node ``h``
(C, H, W) are zero outside a window of ``h``'s spatial grid, so row ``r`` is stored as the kernel
``P[b, r]`` (kh, kw, C) over the window whose top-left corner is ``(y_r sh - ph, x_r sw - pw)``: the
``Geometry`` ``(kh, kw, sh, sw, ph, pw)`` is the same for every row. Positions of the window outside the grid
(the zero padding of a convolution) hold exact zeros. This is auto_LiRPA's "patches" mode (Xu et al. 2020,
"Automatic Perturbation Analysis for Scalable Certified Robustness and Beyond", ``auto_LiRPA/patches.py``,
``operators/convolution.py``), written here for rows given as a list, so that the same code serves every
neuron or only the unstable ones (auto_LiRPA's ``sparse_intermediate_bounds``).

Steps (coefficients ``P`` over a node's output to its input; ``g`` the geometry of ``P``):

=========== ============================================================================================
conv2d      ``P <- conv_transpose2d(P, W, stride s, dilation d, groups)`` on the rows as a batch: the new
            kernel is ``(kh - 1) s + d (k - 1) + 1`` wide, stride ``sh s``, padding ``ph s + p``; entries
            that land outside the input's grid are zeroed; bias term ``sum P b``
relu        ``P+ d_l + P- d_u`` (lower side; the upper side mirrors it) with the relaxation's slopes
            (``robustkern.ops.crown.crown_relu_relaxation``, or explicit alpha-CROWN slopes) gathered at
            the window's positions; bias term ``sum P- b_u`` (``P+ b_u``)
batchnorm,  per-channel ``P s``, bias term ``sum P t``
normalize
avgpool     a depthwise convolution with weight ``1/k^2`` (zero padding counted or no padding, no
            ``ceil_mode``/``divisor_override``)
add         both inputs receive ``P``; where two patches meet they are summed after padding both to the
            union of their windows (equal strides)
identity    unchanged
=========== ============================================================================================

At the input, ``A x + c`` is concretised over the (clipped) box from the gathered centre and radius, and for an
L2 ball also by the dual norm, keeping the tighter: ``robustkern::crown_concretize`` with each window row as an
example of its own (``window_concretize``).
A pass that meets any other node (a reshape, a linear layer) or residual branches of different strides is not
served here (``plan`` returns None) and runs dense (``robustkern.bounds.crown``): the same bound.

Rounding (``sound=True``): every step adds ``|A| v`` to the error accumulator, as on dense rows, with the same
per-node vectors ``v`` of ``robustkern.bounds.crown``; here ``|A| v`` is ``sum |P| v`` over the window (``v``
gathered like the slopes, once per pass), a ReLU's term carried to the step below it as there
(``step_errors.ErrorSum``: a ReLU step scales each patch entry by a slope in [0, 1]). The patches steps compute
the same products as the dense ones, and their sums have no more nonzero terms (the entries outside a window are
exact zeros, whose addition is exact), so the dense argument's rounding bounds hold for them; the
concretisation's sums have ``C kh kw`` terms.

Memory: a pass holds (batch, rows, C kh kw) per node instead of (batch, rows, C H W); the kernels grow with
depth (a 4x4 stride-2 convolution after another: 10x10 over the input) and stop being smaller than the node
once the window covers the grid; ``robustkern.bounds.crown`` then prefers dense rows (its ``PATCHES`` "auto").
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import unit_roundoff
from ..ops.crown import crown_concretize, crown_relu_explicit_lower, crown_relu_relaxation
from .phased_conv import phased_transposed_conv
from .step_errors import (ErrorSum, affine_error, avgpool_error, concretisation_outward, gemm_error, relu_error,
                          sum_bound)

__all__ = ["Geometry", "plan", "patches_bound", "patches_rows_per_pass", "window_values"]


@dataclass(frozen=True)
class Geometry:
    """The window of every row of a patches matrix over a node: ``kh x kw`` positions whose top-left corner is
    ``(y sh - ph, x sw - pw)`` for the row's start position ``(y, x)``."""
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int

    def through_conv(self, k: tuple, s: tuple, p: tuple, d: tuple) -> "Geometry":
        """The geometry over a convolution's input, for this one over its output."""
        return Geometry((self.kh - 1) * s[0] + d[0] * (k[0] - 1) + 1, (self.kw - 1) * s[1] + d[1] * (k[1] - 1) + 1,
                        self.sh * s[0], self.sw * s[1], self.ph * s[0] + p[0], self.pw * s[1] + p[1])

    def union(self, other: "Geometry") -> "Geometry | None":
        """The smallest geometry holding both windows (None when the strides differ)."""
        if (self.sh, self.sw) != (other.sh, other.sw):
            return None
        ph, pw = max(self.ph, other.ph), max(self.pw, other.pw)
        return Geometry(max(self.kh - self.ph, other.kh - other.ph) + ph, max(self.kw - self.pw, other.kw - other.pw)
                        + pw, self.sh, self.sw, ph, pw)


def _pair(v) -> tuple:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _avgpool_as_conv(m) -> tuple | None:
    """(kernel, stride, padding) of an ``nn.AvgPool2d`` that is a depthwise convolution with weight ``1/k^2``."""
    k, p = _pair(m.kernel_size), _pair(m.padding)
    s = _pair(m.stride if m.stride is not None else m.kernel_size)
    if m.ceil_mode or m.divisor_override is not None or (any(p) and not m.count_include_pad):
        return None
    return k, s, p


def plan(ctx, start: str) -> dict | None:
    """The geometry of the patches each node receives in a pass from ``start`` (a (C, H, W) node), or None when
    the pass meets a node that patches do not serve (module docstring)."""
    shapes = ctx.shapes
    if len(shapes.get(start, ())) != 3:
        return None
    pending = {start: Geometry(1, 1, 1, 1, 0, 0)}
    seen: dict = {}
    for node in reversed(ctx.nodes[:ctx.index[start] + 1]):
        g = pending.pop(node.name, None)
        if g is None:
            continue
        seen[node.name] = g
        kind = node.kind
        if kind == "input":
            continue
        if kind in ("relu", "identity", "batchnorm", "normalize"):
            if len(shapes[node.inputs[0]]) != 3:
                return None
            outs = [(node.inputs[0], g)]
        elif kind == "conv2d":
            m = node.module
            outs = [(node.inputs[0], g.through_conv(_pair(m.kernel_size), _pair(m.stride), _pair(m.padding),
                                                    _pair(m.dilation)))]
        elif kind == "avgpool":
            geo = _avgpool_as_conv(node.module)
            if geo is None:
                return None
            outs = [(node.inputs[0], g.through_conv(*geo, (1, 1)))]
        elif kind == "add" and all(len(shapes.get(i, ())) == 3 for i in node.inputs):
            outs = [(node.inputs[0], g), (node.inputs[1], g)]
        else:
            return None
        for name, gg in outs:
            if name in pending:
                gg = pending[name].union(gg)
                if gg is None:
                    return None
            pending[name] = gg
    return seen


def patches_rows_per_pass(ctx, geometries: dict, batch: int, budget: int, live: int) -> int:
    """Rows per pass that keep ``live`` patches matrices of the widest node within ``budget`` bytes."""
    widest = max(ctx.shapes[name][0] * g.kh * g.kw for name, g in geometries.items())
    per_row = batch * widest * ((torch.finfo(ctx.dtype).bits // 8) * live + 8)
    return max(1, budget // per_row)


class _Rows:
    """The start positions of a pass's rows and, per (node, geometry), the flat indices of every window entry
    into the node's (C*H*W) neurons, ``C*H*W`` (a zero appended by ``_gather``) where the entry is padding."""

    def __init__(self, rows: Tensor, start_shape: tuple):
        c0, h0, w0 = start_shape
        self.channel = rows // (h0 * w0)
        self.y = (rows // w0) % h0
        self.x = rows % w0
        self.count = rows.numel()
        self._index: dict = {}
        self._gathered: dict = {}

    def index(self, shape: tuple, g: Geometry) -> tuple[Tensor, Tensor | None]:
        """``(idx (R, kh*kw*C), valid (R, kh, kw, 1) or None when every entry is inside the grid)``: the window
        entries in the (kh, kw, C) order of the patches."""
        key = (shape, g)
        if key not in self._index:
            c, h, w = shape
            dev = self.y.device
            ys = self.y.unsqueeze(1) * g.sh - g.ph + torch.arange(g.kh, device=dev)       # (R, kh)
            xs = self.x.unsqueeze(1) * g.sw - g.pw + torch.arange(g.kw, device=dev)       # (R, kw)
            vy, vx = (ys >= 0) & (ys < h), (xs >= 0) & (xs < w)
            valid = vy.unsqueeze(2) & vx.unsqueeze(1)                                      # (R, kh, kw)
            pos = ys.clamp(0, h - 1).unsqueeze(2) * w + xs.clamp(0, w - 1).unsqueeze(1)   # (R, kh, kw)
            chan = torch.arange(c, device=dev) * (h * w)
            idx = torch.where(valid.unsqueeze(3), pos.unsqueeze(3) + chan, c * h * w)      # (R, kh, kw, C)
            self._index[key] = (idx.reshape(self.count, -1), None if bool(valid.all()) else valid.unsqueeze(3))
        return self._index[key]

    def gathered(self, values: Tensor, idx: Tensor) -> Tensor:
        """``_gather`` of ``values`` (B, ...) flattened per example at ``idx``, once per pass for both sides (the
        input box at the window entries)."""
        key = (id(values), id(idx))
        hit = self._gathered.get(key)
        if hit is None or hit[0] is not values or hit[1] is not idx:
            hit = self._gathered[key] = (values, idx, _gather(values.reshape(values.shape[0], -1), idx))
        return hit[2]


def _gather(values: Tensor, idx: Tensor) -> Tensor:
    """``values`` (B, N) or (B, R, N) (one row per pass row) at ``idx`` (R, K), zero at the padding index N:
    (B, R, K)."""
    B, N = values.shape[0], values.shape[-1]
    R, K = idx.shape
    if values.dim() == 2:
        ext = torch.cat([values, values.new_zeros(B, 1)], 1)
        return ext.index_select(1, idx.reshape(-1)).reshape(B, R, K)
    ext = torch.cat([values, values.new_zeros(B, values.shape[1], 1)], 2).reshape(B, -1)
    offs = torch.arange(R, device=idx.device).unsqueeze(1) * (N + 1)
    return ext.index_select(1, (idx + offs).reshape(-1)).reshape(B, R, K)


class _Patches:
    """Coefficients ``P`` (B or 1, R, kh, kw, C) over a node (channels last in the window), with their
    geometry."""

    def __init__(self, P: Tensor, g: Geometry):
        self.P, self.g = P, g

    def flat(self) -> Tensor:
        return self.P.reshape(self.P.shape[0], self.P.shape[1], -1)


def _pad_to(p: _Patches, g: Geometry) -> Tensor:
    top, left = g.ph - p.g.ph, g.pw - p.g.pw
    return F.pad(p.P, (0, 0, left, g.kw - p.g.kw - left, top, g.kh - p.g.kh - top))


def _abs_dot(p: _Patches, v: Tensor, rows: _Rows, shape: tuple) -> Tensor:
    """An upper bound of ``sum |P| v`` per row (``v >= 0`` (B, *shape)), rounded up by ``step_errors.sum_bound``."""
    idx, _ = rows.index(shape, p.g)
    vg = rows.gathered(v.to(p.P.dtype), idx)       # (once per pass: the vectors are the same for both sides)
    n = idx.shape[1]
    total = (p.flat().abs() * vg).sum(-1)
    return sum_bound(total, n)


def _dense_weight(w: Tensor, groups: int) -> Tensor:
    """A grouped convolution's weight (C_out, C_in / groups, k0, k1) as the block-diagonal (C_out, C_in, k0, k1)
    of the same convolution without groups."""
    if groups == 1:
        return w
    co, cg = w.shape[:2]
    og = co // groups
    blocks = [F.pad(w[g * og:(g + 1) * og], (0, 0, 0, 0, g * cg, (groups - 1 - g) * cg)) for g in range(groups)]
    return torch.cat(blocks, 0)


def _tap_places(kh: int, kw: int, k0: int, k1: int, stride: tuple, dilation: tuple) -> tuple[tuple, list]:
    """Where each tap ``t = u k1 + v`` of a (k0, k1) convolution lands in the composed kernel, kept phase-major:
    rows ``s a + d u`` of the kernel are phase ``d u mod s``, block ``a + d u div s``, so the kernel is held as
    (N, s0, s1, Hq, Wq, C) and tap ``t`` adds a contiguous (kh, kw) block at ``(r0, r1, q0:q0 + kh, q1:q1 + kw)``.
    Returns ``((H, W, Hq, Wq), [index per tap])``."""
    (s0, s1), (d0, d1) = stride, dilation
    H, W = (kh - 1) * s0 + d0 * (k0 - 1) + 1, (kw - 1) * s1 + d1 * (k1 - 1) + 1
    places = []
    for t in range(k0 * k1):
        (q0, r0), (q1, r1) = divmod(d0 * (t // k1), s0), divmod(d1 * (t % k1), s1)
        places.append((slice(None), r0, r1, slice(q0, q0 + kh), slice(q1, q1 + kw)))
    return (H, W, -(-H // s0), -(-W // s1)), places


class _Compose(torch.autograd.Function):
    """``_compose`` for an ungrouped weight, with its own backward pass (the transposed convolution's adjoint: the
    output gradient gathered at each tap's place, and two products) in differentiable operations."""

    @staticmethod
    def forward(ctx, P: Tensor, w: Tensor, stride: tuple, dilation: tuple) -> Tensor:
        N, kh, kw, co = P.shape
        ci, k0, k1 = w.shape[1:]
        (H, W, Hq, Wq), places = _tap_places(kh, kw, k0, k1, stride, dilation)
        taps = torch.matmul(P.reshape(-1, co), w.permute(0, 2, 3, 1).reshape(co, -1))
        taps = taps.reshape(N, kh, kw, k0 * k1, ci).permute(0, 3, 1, 2, 4).contiguous()   # (N, taps, kh, kw, C)
        phased = P.new_zeros(N, stride[0], stride[1], Hq, Wq, ci)
        for t, place in enumerate(places):
            phased[place] += taps[:, t]
        ctx.save_for_backward(P, w)
        ctx.geometry = (stride, dilation)
        out = phased.permute(0, 3, 1, 4, 2, 5).reshape(N, Hq * stride[0], Wq * stride[1], ci)
        return out[:, :H, :W]

    @staticmethod
    def backward(ctx, grad: Tensor):
        P, w = ctx.saved_tensors
        stride, dilation = ctx.geometry
        N, kh, kw, co = P.shape
        ci, k0, k1 = w.shape[1:]
        (H, W, Hq, Wq), places = _tap_places(kh, kw, k0, k1, stride, dilation)
        padded = F.pad(grad, (0, 0, 0, Wq * stride[1] - W, 0, Hq * stride[0] - H))
        phased = padded.reshape(N, Hq, stride[0], Wq, stride[1], ci).permute(0, 2, 4, 1, 3, 5)
        at_taps = torch.stack([phased[place] for place in places], 3).reshape(-1, k0 * k1 * ci)
        wm = w.permute(0, 2, 3, 1).reshape(co, -1)
        grad_P = torch.matmul(at_taps, wm.t()).reshape(P.shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = torch.matmul(P.reshape(-1, co).t(), at_taps).reshape(co, k0, k1, ci).permute(0, 3, 1, 2)
        return grad_P, grad_w, None, None


def _compose(P: Tensor, w: Tensor, stride: tuple, dilation: tuple, groups: int) -> Tensor:
    """Kernels ``P`` (N, kh, kw, C_out) over a convolution's output composed with its weight ``w`` (C_out,
    C_in / groups, k0, k1): the kernels (N, kh', kw', C_in) over its input, ``kh' = (kh - 1) s + d (k - 1) + 1``
    (the transposed convolution of ``P`` by ``w``). On CPU without dilation, by its phases as one convolution
    (``robustkern.bounds.phased_conv``; measured in float32 on 12k-16k kernels of 1x1 and 4x4 positions onto 1,
    3 and 8 channels: 9-90 ms against 30-120 ms for ``conv_transpose2d`` and 11-360 ms tap by tap). Otherwise
    tap by tap: one product with every tap's (C_out, C_in) matrix, then each tap's result added as a block of the phase-major kernel (``_tap_places``);
    for a kernel of one position or onto one channel this is several times faster than ``conv_transpose2d`` on
    CPU (measured: 10-16 ms against 34-67 ms for 16k rows), the other way round for wider kernels onto several
    channels (whose taps hold k0 k1 / (s0 s1) times the result's entries), which take ``conv_transpose2d`` on the
    channels-last kernels. Grouped weights are expanded block-diagonally."""
    w = _dense_weight(w, groups)
    if P.device.type == "cpu" and tuple(dilation) == (1, 1):
        out_hw = tuple((n - 1) * s + k for n, s, k in zip(P.shape[1:3], stride, w.shape[2:]))
        return phased_transposed_conv(P.permute(0, 3, 1, 2), w, tuple(stride), (0, 0), out_hw).spatial()
    if P.shape[1] * P.shape[2] > 1 and w.shape[1] > 1:
        return F.conv_transpose2d(P.permute(0, 3, 1, 2), w, None, stride, 0, 0, 1, dilation).permute(0, 2, 3, 1)
    return _Compose.apply(P, w, stride, dilation)


def _conv_step(p: _Patches, w: Tensor, b: Tensor | None, stride: tuple, dilation: tuple, groups: int,
               g_in: Geometry, in_shape: tuple, rows: _Rows):
    Bp, R = p.P.shape[:2]
    bias = (p.P.sum((2, 3)) * b).sum(-1) if b is not None else None
    out = _compose(p.P.reshape(Bp * R, *p.P.shape[2:]), w, stride, dilation, groups)
    P = out.reshape(Bp, R, *out.shape[1:])
    _, valid = rows.index(in_shape, g_in)
    if valid is not None:
        P = P * valid.to(P.dtype)
    return _Patches(P, g_in), bias


def _relu_step(ctx, p: _Patches, src: str, rows: _Rows, upper: bool, slope: Tensor | None):
    shape = ctx.shapes[src]
    idx, _ = rows.index(shape, p.g)
    lo, hi = ctx.relu_bounds[src]
    d_l, d_u, b_u = crown_relu_relaxation(lo, hi, ctx.mode)
    if slope is not None and slope.dim() == 5:      # alpha-CROWN's slopes of the window entries (window_values)
        s = slope.reshape(slope.shape[0], slope.shape[1], -1).to(lo.dtype)
        dl = crown_relu_explicit_lower(_gather(lo, idx), _gather(hi, idx), s)
    else:
        if slope is not None:
            d_l = crown_relu_explicit_lower(lo.unsqueeze(1), hi.unsqueeze(1), slope.to(lo.dtype))
            d_l = d_l[:, 0] if d_l.shape[1] == 1 else d_l
        dl = _gather(d_l, idx)
    P = p.flat()
    pos, neg = P.clamp(min=0), P.clamp(max=0)
    du, bu = _gather(d_u, idx), _gather(b_u, idx)
    if upper:
        P_new, bias = pos * du + neg * dl, (pos * bu).sum(-1)
    else:
        P_new, bias = pos * dl + neg * du, (neg * bu).sum(-1)
    return _Patches(P_new.reshape(P_new.shape[:2] + p.P.shape[2:]), p.g), bias


def _step(ctx, node, p: _Patches, geometries: dict, rows: _Rows, upper: bool, slopes: dict):
    """``([(input, patches)], bias term or None, error vector or None)`` of one node (module docstring)."""
    kind = node.kind
    src = node.inputs[0]
    sound = ctx.sound
    if kind == "relu":
        out, bias = _relu_step(ctx, p, src, rows, upper, slopes.get(node.name))
        return [(src, out)], bias, relu_error(ctx, node) if sound else None
    if kind == "conv2d":
        w, b = ctx.weight(node)
        m = node.module
        out, bias = _conv_step(p, w, b, _pair(m.stride), _pair(m.dilation), m.groups, geometries[src],
                               ctx.shapes[src], rows)
        return [(src, out)], bias, gemm_error(ctx, node) if sound else None
    if kind in ("batchnorm", "normalize"):
        scale, shift = ctx.affine(node)[:2]
        bias = (p.P.sum((2, 3)) * shift.reshape(-1)).sum(-1)
        out = _Patches(p.P * scale.reshape(-1), p.g)
        return [(src, out)], bias, affine_error(ctx, node) if sound else None
    if kind == "avgpool":
        k, s, pad = _avgpool_as_conv(node.module)
        c = ctx.shapes[src][0]
        w = p.P.new_full((c, 1) + tuple(k), 1.0 / (k[0] * k[1]))   # the pooling as a depthwise convolution
        out, _ = _conv_step(p, w, None, s, (1, 1), c, geometries[src], ctx.shapes[src], rows)
        return [(src, out)], None, avgpool_error(ctx, node) if sound else None
    if kind == "add":
        return [(node.inputs[0], p), (node.inputs[1], p)], None, None
    if kind == "identity":
        return [(src, p)], None, None
    raise AssertionError(kind)  # plan() admits no other kind


def window_values(ctx, start: str, geometries: dict, rows: Tensor, relu: str, values: Tensor) -> Tensor:
    """``values`` (B, N) of the neurons of the ReLU node ``relu`` at the window entries that the patches of a pass
    from ``start`` over ``rows`` read there: (B, R, kh, kw, C), zero at padding. alpha-CROWN's per-row slopes in
    this layout hold only the entries a row can use (auto_LiRPA keeps (rows, N) per ReLU)."""
    g = geometries[relu]
    shape = ctx.shapes[relu]
    idx, _ = _Rows(rows, ctx.shapes[start]).index(shape, g)
    return _gather(values, idx).reshape(values.shape[0], rows.numel(), g.kh, g.kw, shape[0])


def _start_patches(rows: _Rows, shape: tuple, dtype, device) -> _Patches:
    """The identity rows: kernel 1x1, a one in the row's channel."""
    c = shape[0]
    P = torch.zeros(1, rows.count, 1, 1, c, dtype=dtype, device=device)
    P[0, torch.arange(rows.count, device=device), 0, 0, rows.channel] = 1
    return _Patches(P, Geometry(1, 1, 1, 1, 0, 0))


def patches_bound(ctx, start: str, geometries: dict, rows: Tensor, sides: tuple, input_box, ball,
                  slopes: dict | None = None) -> dict:
    """Bounds of the neurons ``rows`` (indices into the flattened C*H*W) of ``start`` over the input set, per side
    (False: lower, True: upper), (B, R) each: ``robustkern.bounds.crown.backward_bound`` on the identity rows,
    computed on patches (``geometries`` from ``plan``). ``slopes`` as there, (B, 1 or R, N) per ReLU, or the
    window entries' slopes (B, R, kh, kw, C) (``window_values``)."""
    shapes = ctx.shapes
    index = _Rows(rows, shapes[start])
    B = input_box.mid.shape[0]
    R = rows.numel()
    u = unit_roundoff(ctx.dtype)
    stop = ctx.index[start]
    result, carried = {}, {}
    dot = lambda p, v, name: _abs_dot(p, v, index, shapes[name])  # noqa: E731
    for upper in sides:
        side_slopes = slopes.get(upper, {}) if slopes else {}
        pending: dict[str, _Patches] = {start: _start_patches(index, shapes[start], ctx.dtype, ctx.device)}
        bias = torch.zeros(B, R, dtype=ctx.dtype, device=ctx.device)
        errs = ErrorSum(ctx, torch.zeros_like(bias), dot, carried) if ctx.sound else None
        at_input = None
        for node in reversed(ctx.nodes[:stop + 1]):
            p = pending.pop(node.name, None)
            if p is None:
                continue
            if node.kind == "input":
                at_input = p
                continue
            outs, bterm, v = _step(ctx, node, p, geometries, index, upper, side_slopes)
            if ctx.sound:
                if node.kind == "relu":
                    errs.relu(node, p, v)
                else:
                    errs.add(node, p, v)
            if bterm is not None:
                bias = bias + bterm
                if ctx.sound:
                    errs.term(u * bias.abs())
            for name, q in outs:
                if name in pending:
                    g = geometries[name]
                    a, b = _pad_to(pending[name], g), _pad_to(q, g)
                    merged = _Patches(a + b, g)
                    if ctx.sound:   # the addition where two branches meet rounds
                        both = _Patches(a.abs() + b.abs(), g)
                        errs.term(u * dot(both, ctx.magnitude(name), name) * (1 + 2 * u))
                    pending[name] = merged
                else:
                    pending[name] = q
        result[upper] = _concretize(ctx, at_input, bias, errs.total() if ctx.sound else None, index, input_box, ball,
                                    upper, B)
    return result


def _concretize(ctx, p: _Patches | None, bias: Tensor, err: Tensor | None, rows: _Rows, box, ball, upper: bool,
                B: int) -> Tensor:
    """``A x + bias`` over the input box (and L2 ball), as ``crown_concretize`` on dense rows, widened by the
    accumulated error and the concretisation's own rounding when sound."""
    if p is None:   # no path from the input: the bound is the constant
        return concretisation_outward(bias, bias.abs(), err, 1, upper) if ctx.sound else bias
    shape = ctx.shapes[ctx.nodes[0].name]
    idx, _ = rows.index(tuple(shape), p.g)
    P = p.flat()
    mid, rad = rows.gathered(box.mid, idx), rows.gathered(box.rad, idx)
    center = eps = cg = None
    if ball is not None:
        center, eps = ball
        cg = rows.gathered(center, idx)
    val = window_concretize(P, bias, mid, rad, cg, eps, upper)
    if not ctx.sound:
        return val
    absP = P.abs()
    mag = (absP * (mid.abs() + rad)).sum(-1) + bias.abs()
    if center is not None:
        mag = mag + (absP * cg.abs()).sum(-1) + eps.unsqueeze(1) * P.norm(dim=-1)
    return concretisation_outward(val, mag, err, idx.shape[1], upper)


def window_concretize(P: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, center: Tensor | None,
                      eps: Tensor | None, upper: bool) -> Tensor:
    """``crown_concretize`` of window rows: ``P`` (B, R, K) over boxes gathered per row, ``mid, rad`` (and an L2
    ball's ``center``) (B, R, K), ``bias`` (B, R), ``eps`` (B,); a batch of 1 (rows every example shares)
    broadcasts. Each of the B*R rows is its own example of the op (one specification row over its own box), so
    its value, gradients and saved tensors are the op's."""
    B, R, K = max(P.shape[0], mid.shape[0], bias.shape[0]), P.shape[1], P.shape[2]

    def per_row(t: Tensor) -> Tensor:
        return t.expand(B, R, K).reshape(B * R, K)

    val = crown_concretize(per_row(P).unsqueeze(1), bias.expand(B, R).reshape(B * R, 1), per_row(mid), per_row(rad),
                           None if center is None else per_row(center),
                           None if eps is None else eps.repeat_interleave(R), upper)
    return val.reshape(B, R)
