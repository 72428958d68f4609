"""Backward linear bound propagation over a captured graph: CROWN-IBP and CROWN.

A bound on a specification ``C f(x)`` is carried backwards as ``A h + c`` (``A`` of shape (B, S, *shape of
h``), one per side); every node maps it to its inputs:

=========== =====================================================================================
linear      ``A <- A W``, ``c += A b``
conv2d      ``A <- conv_transpose2d(A, W)`` (output_padding chosen so the input size comes back; the B*S
            rows as one batch, channels-last), ``c += sum A b``; onto the input on CPU in float32, by its
            phases as one convolution, in their order (``robustkern.bounds.phased_conv``)
batchnorm,  per-channel affine ``(scale, shift)`` from ``precision.Coefficients`` (eval: running statistics,
normalize   training: the clean batch's): ``A <- A scale``, ``c += sum A shift``; a BatchNorm right after a
            linear/conv layer that has no other user and a weight smaller than ``A`` is folded into it
            (``W' = scale W``, ``b' = scale b + shift``: one step, no pass over ``A``)
avgpool     the adjoint of the (linear) pooling, ``aten.avg_pool2d_backward``
relu        ``robustkern::crown_relu_backward`` with the bounds of the ReLU's input (fused sign split), or with
            explicit lower slopes (alpha-CROWN) ``robustkern::crown_relu_backward_slopes``; on a channels-last
            ``A`` it runs on the (B, S, H*W*C) layout with the bounds (and slopes) permuted to match
add         ``A`` flows to both branches and is accumulated (reverse topological order)
reshape     ``A`` reshaped to the input's shape (per example)
=========== =====================================================================================

At the input, ``robustkern::crown_concretize`` evaluates ``A x + c`` over the (clipped) input box, and for
an L2 ball also over the ball by the dual norm, ``A x0 -/+ eps ||A||_2``, keeping the tighter of the two (both
are bounds over supersets of ball-and-box); over a box whose centre and radius need no gradient its backward keeps
the signs of ``A`` as int8, not ``A``. The ReLU input bounds come from IBP (CROWN-IBP) or, for
CROWN, from backward passes per ReLU-input node with the identity specification (``identity_bounds``), intersected
with the IBP box (both are sound, so their intersection is). Only the neurons that IBP leaves unstable are
recomputed (``SPARSE_INTERMEDIATE``; a stable neuron's relaxation is exact whatever its bounds). A pass that
starts at a convolution-shaped node runs on patches (``robustkern.bounds.patches``: one kernel per row over a
window, (batch, rows, C kh kw) per node instead of (batch, rows, C H W); ``PATCHES``), else on dense rows,
``crown_batch_size`` rows at a time or what a memory budget allows (``rows_per_pass``,
``patches_rows_per_pass``). Dense rows that every example shares (the identity) go through the first linear or
convolution step once for the whole batch.

Floating point (``sound=True``). The relaxation is exact in real arithmetic; computed in floating point every
product rounds, and an ``(A, c)`` whose ``A`` is only close to the exact product is not by itself a valid bound.
The argument used here needs no exact product: for whatever coefficients ``A`` a step computed, the identity
``A h = A_in h_in + c + E h_in`` holds with the step's error ``E``, and ``|E h_in| <= |A| v`` for a per-node
vector ``v`` built from the step's rounding bound (``gamma_d`` of the step's reduction depth ``d``, Higham) and
the IBP magnitude ``|h_in| <= m`` (sound boxes). Every step adds ``|A| v`` to an error accumulator, per
specification row (one pass over ``|A|`` per layer: a ReLU's term rides on the step below it, ``ErrorSum``):

=========== ===========================================================================================
linear,     ``v = 2 gamma_{d+2} (|W| m_in + |b|)``; a BatchNorm folded in (``W' = s W``, ``b' = s b + t``) adds
conv2d      its rounding and its coefficients' radii: ``v = (ds + 2 gamma |s|)(|W| m_in + |b|) + dt + 2 gamma |t|``
batchnorm,  ``v = (ds + 2u |s|) m_in + dt + gamma_{N+2} |t|`` (``ds``, ``dt``: ``robustkern.bounds.precision``)
normalize
avgpool     ``v = 2 gamma_{k+2} avgpool(m_in)``
relu        ``v = 3u (u+ + |l-|) + 2u m + gamma_{N+2} |l-|``: the products and bias sum, and the rounded upper line
            ``d_u z + b_u`` (computed from ``u+ / (u+ - l-)``), which lies below the chord by at most ``3u (u+ + |l-|)``;
            any lower slope in [0, 1] is valid, rounded or not
add         where two branches' ``A`` meet, ``u (|A_1| + |A_2|) m``
=========== ===========================================================================================

plus ``u |c|`` for each addition to the constant (the vectors: ``robustkern.bounds.step_errors``). The
concretisation adds ``gamma_{N+3} (|A||mid| + |A| rad + |c|)`` (and the ball terms), the bound is moved one ulp
outwards, and, for a float32 model, rounded outwards to float32. The whole backward pass (intermediate CROWN bounds
included) runs in float64, also for float32 models, so the accumulated error is ~1e-16 of the magnitudes and costs
no tightness; float64 models get the same accounting with float64's unit roundoff. ``sound=False`` computes
everything in the working precision with no accounting (training).

The ReLU row holds for both ReLU ops (``crown_relu_backward`` and, with explicit slopes,
``crown_relu_backward_slopes``) on every backend: each entry of ``A'`` is one rounded product, ``A d_l`` or
``A d_u`` (the other term of ``A+ d_l + A- d_u`` is an exact zero), the bias one sum of ``N`` rounded products
``A- b_u`` (``A+`` on the upper side) in whatever order, and an explicit lower slope is selected, not computed
(``clamp(a, 0, 1)`` on unstable neurons, 1 or 0 on stable ones): any value in [0, 1] is a valid lower line.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.crown import RELU_LOWER_MODES, crown_concretize, crown_relu_backward, crown_relu_backward_slopes
from .._numerics import round_down, round_up, unit_roundoff
from ..graph import BoundNode, tensor_input
from .ibp import Box
from .phased_conv import PhaseMajor, flat_operands, phased_transposed_conv
from .patches import patches_bound, patches_rows_per_pass, plan, window_values
from .precision import Coefficients
from .step_errors import (ErrorSum, abs_dot, affine_error, avgpool_error, concretisation_outward, gemm_error,
                          is_channels_last, relu_error)

__all__ = ["backward_bound", "crown_bounds", "crown_setup", "crown_intermediate", "identity_rows",
           "output_spec", "finish", "chain_start", "CrownSetup", "identity_bounds", "unstable_rows",
           "row_slopes"]

# Transposed convolutions of ``A`` run channels-last (see ``_gemm_step``); False: contiguous NCHW.
CHANNELS_LAST = True
# Fold a BatchNorm into the linear/conv layer before it (see ``_step``); False: a separate affine step.
FOLD_BATCHNORM = True
# Intermediate-bound passes from convolution-shaped nodes on patches (robustkern.bounds.patches): "auto" where the
# kernels are smaller than the nodes they cover, True wherever patches serve the pass, False: dense rows always.
PATCHES = "auto"
# Recompute only the neurons that the current (IBP) bounds leave unstable (``crown_intermediate``).
SPARSE_INTERMEDIATE = True
# On CPU in float32, coefficients onto the input through a convolution by its phases (robustkern.bounds.phased_conv).
PHASED_INPUT = True


def _cview(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((1, 1, -1) + (1,) * (ndim - 3))


class _Ctx:
    """What a backward pass needs: the graph, shapes, ReLU input bounds, dtype, the affine coefficients, and for
    sound bounds the IBP boxes whose magnitudes bound each node's values."""

    def __init__(self, nodes, shapes, relu_bounds, dtype, device, coeffs: Coefficients, mode, boxes: dict,
                 input_box: Box, sound: bool):
        self.nodes = nodes
        self.index = {n.name: i for i, n in enumerate(nodes)}
        self.by_name = {n.name: n for n in nodes}
        self.shapes = shapes
        self.relu_bounds = relu_bounds      # name of a ReLU-input node -> (l, u) flattened (B, N)
        self.dtype = dtype
        self.device = device
        self.coeffs = coeffs
        self.mode = mode
        self.boxes = boxes
        self.input_box = input_box
        self.sound = sound
        self._params: dict = {}
        self._errors: dict = {}

    def relu_bounds_channels_last(self, name: str):
        """``relu_bounds[name]`` permuted from (B, C*H*W) to the (B, H*W*C) order of channels-last ``A``."""
        key = ("channels_last", name)
        bounds = self.relu_bounds[name]
        if key not in self._params or self._params[key][0] is not bounds:  # (CROWN replaces the bounds)
            c, h, w = self.shapes[name]
            self._params[key] = (bounds, tuple(t.reshape(-1, c, h, w).permute(0, 2, 3, 1).reshape(t.shape[0], -1)
                                               for t in bounds))
        return self._params[key][1]

    def weight(self, node: BoundNode):
        return self.coeffs.weights(node, self.dtype)

    def affine(self, node: BoundNode):
        """``(s, t, ds, dt)`` of a BatchNorm/normalisation node in the pass's dtype."""
        return self.coeffs.get(node, self.dtype, self.device)

    # ---------------------------------------------------------------- rounding-error accounting (sound)
    def magnitude(self, name: str) -> Tensor:
        """An upper bound of ``|h|`` (B, *shape) for node ``name`` over the input set (from the IBP boxes)."""
        key = ("mag", name)
        if key not in self._params:
            if self.by_name[name].kind == "input":
                box = self.input_box
            else:
                v = self.boxes[name]
                box = v() if callable(v) else v
            lo, hi = box.end_points(True)
            m = torch.maximum(lo.abs(), hi.abs()).to(self.dtype)
            self._params[key] = m.reshape((m.shape[0],) + tuple(self.shapes[name]))
        return self._params[key]

    def error_vector(self, key: str, make) -> Tensor:
        if key not in self._errors:
            with torch.no_grad():
                self._errors[key] = make()
        return self._errors[key]


def _channel_sums(A: Tensor) -> Tensor:
    """(B, S, C): ``A`` (B, S, C, ...) summed over the dimensions after the channel one."""
    return A.sum(tuple(range(3, A.dim()))) if A.dim() > 3 else A


def _gemm_step(ctx: _Ctx, node: BoundNode, A: Tensor, B: int, S: int, w: Tensor, b: Tensor | None):
    """``A`` through a linear (``A W``) or conv2d layer (``conv_transpose2d(A, W)`` on the B*S rows as one batch,
    channels-last: the layout in which CPU (oneDNN) transposed convolutions are fastest; the ReLU step keeps
    it) with weight ``w`` and bias ``b``. Returns ``[(input, A_in)], bias term, False``."""
    src = node.inputs[0]
    if B > 1 and A.stride(0) == 0:   # the same rows for every example (the identity): one product, shared
        outs, bias, _ = _gemm_step(ctx, node, A[:1], 1, S, w, b)
        expand = lambda a: a.expand(B, *a.shape[1:])  # noqa: E731
        return ([(name, PhaseMajor(expand(a.A), a.phases) if isinstance(a, PhaseMajor) else expand(a))
                 for name, a in outs], bias.expand(B, S) if bias is not None else None, False)
    bias = (_channel_sums(A) * b).sum(-1) if b is not None else None
    if node.kind == "linear":
        return [(src, torch.matmul(A, w))], bias, False
    m = node.module
    cin, hin, win = ctx.shapes[src]
    o, ho, wo = A.shape[2:]
    flat = A.reshape(B * S, o, ho, wo)
    if flat.dtype == torch.float64 and flat.device.type == "cpu":
        # no oneDNN kernel in float64: ATen's input gradient of the convolution (im2col GEMM + col2im) computes the
        # same sums as its slow_conv_transpose2d, in one GEMM (any summation order: the accounting holds)
        like = flat.new_empty(1).expand(B * S, cin, hin, win)
        A_in = torch.ops.aten.convolution_backward(flat, like, w, None, list(m.stride), list(m.padding),
                                                   list(m.dilation), False, [0, 0], m.groups, [True, False, False])[0]
        return [(src, A_in.reshape(B, S, cin, hin, win))], bias, False
    if CHANNELS_LAST:
        flat = flat.contiguous(memory_format=torch.channels_last)
    if PHASED_INPUT and flat.device.type == "cpu" and m.groups == 1 and tuple(m.dilation) == (1, 1) and \
            ctx.by_name[src].kind == "input" and ctx.by_name[src].users == 1:
        # onto the input (few channels): the phases of the transposed convolution as one convolution, left in
        # phase-major order for the concretisation (robustkern.bounds.phased_conv)
        phased = phased_transposed_conv(flat, w, tuple(m.stride), tuple(m.padding), (hin, win))
        if phased is not None:
            return [(src, PhaseMajor(phased.A.reshape(B, S, *phased.A.shape[1:]), phased.phases))], bias, False
    opad = []
    for size, osz, k, s, p, d in zip((hin, win), (ho, wo), w.shape[2:], m.stride, m.padding, m.dilation):
        opad.append(size - ((osz - 1) * s - 2 * p + d * (k - 1) + 1))
    A_in = F.conv_transpose2d(flat, w, None, m.stride, m.padding, tuple(opad), m.groups, m.dilation)
    return [(src, A_in.reshape(B, S, cin, hin, win))], bias, False


def _step(ctx: _Ctx, node: BoundNode, A: Tensor, B: int, S: int) -> tuple[list[tuple[str, Tensor]], Tensor | None,
                                                                           Tensor | None]:
    """Map ``A`` (coefficients of ``node``'s output) to its inputs. Returns [(input, A_in)], the bias term
    (B, S) or None, and (sound) the step's error vector ``v`` (B, *output shape) or None (exact step)."""
    kind = node.kind
    shapes = ctx.shapes
    if kind in ("linear", "conv2d"):
        w, b = ctx.weight(node)
        outs, bias, _ = _gemm_step(ctx, node, A, B, S, w, b)
        return outs, bias, gemm_error(ctx, node) if ctx.sound else None
    if kind == "batchnorm":
        src = ctx.by_name[node.inputs[0]]
        w = ctx.weight(src)[0] if src.kind in ("linear", "conv2d") else None
        if FOLD_BATCHNORM and w is not None and src.users == 1 and w.shape[0] == A.shape[2] and \
                w.numel() <= A.numel():
            # fold the per-channel affine map into the layer before it (its only user): one GEMM step with
            # W' = scale W (per output channel), b' = scale b + shift, no pass over A for the BatchNorm;
            # only where W is smaller than A (convolutions; not a wide linear layer, whose W' and its
            # gradient would cost more than the passes over A they save)
            scale, shift = ctx.affine(node)[:2]
            w, b = ctx.weight(src)
            w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
            b = shift if b is None else b * scale + shift
            outs, bias, _ = _gemm_step(ctx, src, A, B, S, w, b)
            return outs, bias, gemm_error(ctx, src, node) if ctx.sound else None
    if kind in ("batchnorm", "normalize"):
        scale, shift = ctx.affine(node)[:2]
        bias = (_channel_sums(A) * shift).sum(-1)
        return [(node.inputs[0], A * _cview(scale, A.dim()))], bias, affine_error(ctx, node) if ctx.sound else None
    if kind == "avgpool":
        m = node.module
        src = node.inputs[0]
        shp = shapes[src]
        flat = A.reshape(B * S, *A.shape[2:])
        like = flat.new_empty(1).expand(B * S, *shp)
        k = m.kernel_size if isinstance(m.kernel_size, (tuple, list)) else (m.kernel_size,) * 2
        s = m.stride if isinstance(m.stride, (tuple, list)) else (m.stride,) * 2
        p = m.padding if isinstance(m.padding, (tuple, list)) else (m.padding,) * 2
        A_in = torch.ops.aten.avg_pool2d_backward(flat, like, list(k), list(s), list(p), m.ceil_mode,
                                                  m.count_include_pad, m.divisor_override)
        return [(src, A_in.reshape(B, S, *shp))], None, avgpool_error(ctx, node) if ctx.sound else None
    if kind == "add":
        return [(node.inputs[0], A), (node.inputs[1], A)], None, None
    if kind == "reshape":
        src = tensor_input(node, shapes)
        return [(src, A.reshape(B, S, *shapes[src]))], None, None
    if kind == "identity":
        return [(node.inputs[0], A)], None, None
    raise AssertionError(kind)  # relu and input are handled by the caller


def _relu_step(ctx: _Ctx, node: BoundNode, A: Tensor, B: int, S: int, upper: bool, slope: Tensor | None):
    """``A`` through the ReLU ``node`` by ``crown_relu_backward`` (the lower-slope rule ``ctx.mode``) or, with
    ``slope`` (B, 1 or S, N in the flattened C*H*W order), by ``crown_relu_backward_slopes``."""
    src = node.inputs[0]
    if is_channels_last(A):  # the ReLU step on the (B, S, H*W*C) layout, bounds (and slopes) permuted to match
        l, u_ = ctx.relu_bounds_channels_last(src)
        A_hwc = A.permute(0, 1, 3, 4, 2)
        flat = A_hwc.reshape(B, S, -1)
        if slope is None:
            A_new, b = crown_relu_backward(flat, l, u_, ctx.mode, upper)
        else:
            c, h, w = ctx.shapes[src]
            hwc = slope.reshape(B, -1, c, h, w).permute(0, 1, 3, 4, 2).reshape(B, slope.shape[1], -1)
            A_new, b = crown_relu_backward_slopes(flat, l, u_, hwc.to(flat.dtype), upper)
        return A_new.reshape(A_hwc.shape).permute(0, 1, 4, 2, 3), b
    l, u_ = ctx.relu_bounds[src]
    flat = A.reshape(B, S, -1)
    if slope is None:
        A_new, b = crown_relu_backward(flat, l, u_, ctx.mode, upper)
    else:
        flat_slope = slope.reshape(B, slope.shape[1], -1).to(flat.dtype)
        A_new, b = crown_relu_backward_slopes(flat, l, u_, flat_slope, upper)
    return A_new.reshape(A.shape), b


def backward_bound(ctx: _Ctx, start: str, A0: Tensor, sides: tuple[bool, ...], input_box: Box, ball, sound: bool,
                   slopes: dict | None = None, first: int | None = None,
                   linear: dict | None = None) -> dict[bool, Tensor]:
    """Bounds of ``A0 h_start`` (A0 (B, S, *shape)) over the input set, for each side in ``sides``
    (False: lower, True: upper). ``ball`` is (center, eps) flattened for an L2 ball, else None. With ``sound``
    the rounding errors of every step are accumulated and the result is rounded outwards (module docstring).
    ``slopes``: ``{side: {relu node name: lower slopes (B, 1 or S, N)}}`` for the ReLUs whose lower slope is
    given explicitly (the others follow ``ctx.mode``). ``first``: the index of the earliest node to go through
    (the nodes from it to ``start`` must be a chain); the bound is then concretised over the IBP box of that
    node's input (``input_box``/``ball`` when it is the input), as Loss Landscape Matters'
    ``backward_range_frozen``. ``linear``: a dict that receives, per side, the pass's linear bound over the
    concretised node, ``(A (B, S, *its shape), bias (B, S))`` (before the rounding-error widening)."""
    B, S = A0.shape[:2]
    result = {}
    stop = ctx.index[start]
    u = unit_roundoff(A0.dtype)
    merged: dict = {}
    for upper in sides:
        side_slopes = slopes.get(upper, {}) if slopes else {}
        As: dict[str, Tensor] = {start: A0}
        bias = A0.new_zeros((B, S))
        errs = ErrorSum(ctx, A0.new_zeros((B, S)), lambda a, v, _: abs_dot(a, v), merged, first or 0) if sound \
            else None
        A_input = None
        for node in reversed(ctx.nodes[first or 0:stop + 1]):
            A = As.pop(node.name, None)
            if A is None:
                continue
            if node.kind == "input":
                A_input = A
                continue
            if node.kind == "relu":
                A_new, b = _relu_step(ctx, node, A, B, S, upper, side_slopes.get(node.name))
                outs, bterm = [(node.inputs[0], A_new)], b
                if sound:
                    errs.relu(node, A, relu_error(ctx, node))
            else:
                outs, bterm, v = _step(ctx, node, A, B, S)
                if sound:
                    errs.add(node, A, v)
            if bterm is not None:
                bias = bias + bterm
                if sound:
                    errs.term(u * bias.abs())
            for name, a in outs:
                if name in As:
                    if sound:   # the addition where two branches meet rounds
                        errs.term(u * abs_dot(As[name].abs() + a.abs(), ctx.magnitude(name)) * (1 + 2 * u))
                    As[name] = As[name] + a
                else:
                    As[name] = a
        box, at_ball = input_box, ball
        if first:       # concretise over the IBP box of the first node's input
            src = tensor_input(ctx.nodes[first], ctx.shapes)
            A_input = As.pop(src, None)
            if ctx.by_name[src].kind != "input":
                v = ctx.boxes[src]
                ibp = v() if callable(v) else v
                box, at_ball = Box(ibp.mid.to(ctx.dtype), ibp.rad.to(ctx.dtype)), None
        if A_input is None:  # the specification does not depend on the input
            A_input = A0.new_zeros((B, S) + tuple(box.mid.shape[1:]))
        if linear is not None:   # the linear bound over the concretised node, in its own (B, S, C, H, W) layout
            linear[upper] = (_spatial(A_input, B, S), bias)
        center, eps = at_ball if at_ball is not None else (None, None)
        A_flat, mid, rad, center = flat_operands(A_input, box.mid, box.rad, center)
        val = crown_concretize(A_flat, bias, mid, rad, center, eps, upper)
        if sound:
            absA = A_flat.abs()
            mag = torch.bmm(absA, (mid.abs() + rad).unsqueeze(-1)).squeeze(-1) + bias.abs()
            if center is not None:
                mag = mag + torch.bmm(absA, center.abs().unsqueeze(-1)).squeeze(-1) + eps.unsqueeze(1) * A_flat.norm(dim=-1)
            val = concretisation_outward(val, mag, errs.total(), A_flat.shape[-1], upper)
        result[upper] = val
    return result


def _spatial(A, B: int, S: int) -> Tensor:
    """Coefficients over a node as a (B, S, *shape) tensor (a phase-major ``A`` rearranged)."""
    if not isinstance(A, PhaseMajor):
        return A
    full = A.spatial()
    return full.reshape(B, S, *full.shape[1:]).permute(0, 1, 4, 2, 3)


@dataclass
class CrownSetup:
    """What every backward pass of one bound computation shares: the context (graph, ReLU input bounds, dtype,
    affine coefficients), the input box and L2 ball in the pass's dtype, the ReLU-input nodes in topological
    order, and the dtype the bounds come back in."""
    ctx: _Ctx
    input_box: Box
    ball: tuple | None
    relu_inputs: list
    work: torch.dtype


def crown_setup(nodes, shapes, ibp_bounds: dict, *, sound: bool, coeffs: Coefficients, norm: float, x: Tensor,
                eps: Tensor, relu_lower: str = "adaptive") -> CrownSetup:
    """The shared state of a CROWN-IBP / CROWN computation, with the ReLU input bounds from IBP."""
    if relu_lower not in RELU_LOWER_MODES:
        raise ValueError(f"compute_bounds: relu_lower must be one of {sorted(RELU_LOWER_MODES)}, got {relu_lower!r}")
    work = x.dtype
    cdtype = torch.float64 if sound else work
    B = x.shape[0]
    box = _box(ibp_bounds[nodes[0].name])
    input_box = Box(box.mid.to(cdtype), box.rad.to(cdtype))
    ball = None
    if norm == 2:
        ball = (x.reshape(B, -1).to(cdtype), eps.to(cdtype))
    relu_inputs = []
    for n in nodes:
        if n.kind == "relu" and n.inputs[0] not in relu_inputs:
            relu_inputs.append(n.inputs[0])
    relu_bounds: dict = {}
    for name in relu_inputs:
        lo, hi = _box(ibp_bounds[name]).end_points(sound)
        relu_bounds[name] = (lo.reshape(B, -1).to(cdtype), hi.reshape(B, -1).to(cdtype))
    ctx = _Ctx(nodes, shapes, relu_bounds, cdtype, x.device, coeffs, RELU_LOWER_MODES[relu_lower], ibp_bounds,
               input_box, sound)
    return CrownSetup(ctx, input_box, ball, relu_inputs, work)


def identity_rows(setup: CrownSetup, name: str, rows: Tensor | None = None) -> Tensor:
    """The specification (B, n, *shape of ``name``) whose rows are the unit vectors of the node's neurons
    (``rows``: the indices of some of them; default all)."""
    ctx = setup.ctx
    shp = ctx.shapes[name]
    n = math.prod(shp)
    B = setup.input_box.mid.shape[0]
    if rows is None:
        eye = torch.eye(n, dtype=ctx.dtype, device=ctx.device)
    else:  # only the requested rows (an (n, n) identity per chunk would cost n^2 per pass)
        eye = torch.zeros(rows.numel(), n, dtype=ctx.dtype, device=ctx.device)
        eye[torch.arange(rows.numel(), device=ctx.device), rows] = 1
    return eye.reshape(1, eye.shape[0], *shp).expand(B, -1, *shp)


# Bytes that the coefficient matrices of one CROWN pass for intermediate bounds may take when the caller gives no
# crown_batch_size: a pass from a node with n neurons holds (batch, rows, size of each node it goes through)
# matrices, about LIVE_MATRICES of them at once (A, |A| or its split, the next A, the concretisation's product).
CROWN_PASS_BYTES = 1 << 30
LIVE_MATRICES = 4


def rows_per_pass(ctx: _Ctx, start: str, batch: int, crown_batch_size: int | None = None) -> int:
    """Rows of the identity specification per backward pass from ``start`` (CROWN's intermediate bounds):
    ``crown_batch_size`` when given; else as many as keep a pass within ``CROWN_PASS_BYTES``, counting
    ``LIVE_MATRICES`` matrices of (batch, rows, largest node on the way) in the pass's dtype. Every row is its own
    specification, so the bounds do not depend on the split; only the peak memory and the number of passes do."""
    n = math.prod(ctx.shapes[start])
    if crown_batch_size:
        return max(1, min(int(crown_batch_size), n))
    widest = max(math.prod(ctx.shapes[node.name]) for node in ctx.nodes[:ctx.index[start] + 1]
                 if node.name in ctx.shapes)
    per_row = batch * widest * (torch.finfo(ctx.dtype).bits // 8) * LIVE_MATRICES
    return max(1, min(n, CROWN_PASS_BYTES // per_row))


def unstable_rows(bounds: tuple[Tensor, Tensor]) -> Tensor:
    """The neurons (indices into the flattened node) whose bounds ``(l, u)`` (B, N) straddle 0 in some example:
    the only ones whose tighter bounds can change a ReLU relaxation (a stable neuron's relaxation is exact)."""
    lo, hi = bounds
    return ((lo < 0) & (hi > 0)).any(0).nonzero().flatten()


def identity_bounds(setup: CrownSetup, name: str, rows: Tensor, crown_batch_size: int | None = None,
                    slopes: dict | None = None) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds (B, R) of the neurons ``rows`` of ``name`` over the input set: backward passes from
    the identity rows, ``crown_batch_size`` rows at a time (default: a memory budget). Passes that start at a
    convolution-shaped node run on patches (``robustkern.bounds.patches``) where ``PATCHES`` allows it, else on
    dense rows. ``slopes``: alpha-CROWN's ``{side: {relu: (B, 1 or R, N)}}`` (see ``backward_bound``)."""
    ctx = setup.ctx
    batch = setup.input_box.mid.shape[0]
    geometries = _patches_plan(ctx, name)
    if crown_batch_size:
        step = int(crown_batch_size)
    elif geometries is not None:
        step = patches_rows_per_pass(ctx, geometries, batch, CROWN_PASS_BYTES, LIVE_MATRICES)
    else:
        step = rows_per_pass(ctx, name, batch)
    n = rows.numel()
    los, his = [], []
    for s0 in range(0, n, step):
        chunk = rows[s0:s0 + step]
        part = {side: {k: (v if v.shape[1] == 1 else v[:, s0:s0 + step]) for k, v in per.items()}
                for side, per in slopes.items()} if slopes else None
        if geometries is not None:
            r = patches_bound(ctx, name, geometries, chunk, (False, True), setup.input_box, setup.ball, part)
        else:
            r = backward_bound(ctx, name, identity_rows(setup, name, chunk), (False, True), setup.input_box,
                               setup.ball, ctx.sound, part)
        los.append(r[False])
        his.append(r[True])
    return torch.cat(los, 1), torch.cat(his, 1)


def row_slopes(setup: CrownSetup, start: str, rows: Tensor, relu: str, init: Tensor) -> Tensor:
    """alpha-CROWN's per-row lower slopes of the ReLU node ``relu`` for the passes from ``start`` over the neurons
    ``rows``, starting at ``init`` (B, N): (B, R, N), or (B, R, kh, kw, C) where those passes run on patches
    (only the window entries a row reads; ``robustkern.bounds.patches.window_values``)."""
    geometries = _patches_plan(setup.ctx, start)
    if geometries is None:
        return init.unsqueeze(1).expand(-1, rows.numel(), -1).clone()
    return window_values(setup.ctx, start, geometries, rows, relu, init)


def _patches_plan(ctx: _Ctx, name: str) -> dict | None:
    """The patches geometries of a pass from ``name``, or None for dense rows: ``PATCHES`` False, a node that
    patches do not serve, or ("auto") kernels that together hold more entries than the nodes they cover."""
    if not PATCHES:
        return None
    geometries = plan(ctx, name)
    if geometries is None or PATCHES != "auto":
        return geometries
    kernels = sum(ctx.shapes[k][0] * g.kh * g.kw for k, g in geometries.items())
    nodes = sum(math.prod(ctx.shapes[k]) for k in geometries)
    return geometries if kernels <= nodes else None


def crown_intermediate(setup: CrownSetup, crown_batch_size: int | None = None) -> None:
    """CROWN's ReLU input bounds: for each ReLU-input node in topological order, the backward passes from the
    identity (``identity_bounds``) with the bounds of the earlier ReLUs, intersected with IBP's. With
    ``SPARSE_INTERMEDIATE`` only the neurons unstable under IBP are recomputed (auto_LiRPA's
    ``sparse_intermediate_bounds``): the others keep IBP's bounds, which give the same (exact) relaxation."""
    ctx = setup.ctx
    for name in setup.relu_inputs:   # topological order: earlier ReLUs' bounds are ready when needed
        l_ibp, u_ibp = ctx.relu_bounds[name]
        n = l_ibp.shape[1]
        rows = unstable_rows((l_ibp, u_ibp)) if SPARSE_INTERMEDIATE else torch.arange(n, device=ctx.device)
        if rows.numel() == 0:
            continue
        lo, hi = identity_bounds(setup, name, rows, crown_batch_size)
        if rows.numel() == n:
            ctx.relu_bounds[name] = (torch.maximum(l_ibp, lo), torch.minimum(u_ibp, hi))
        else:
            ctx.relu_bounds[name] = (l_ibp.index_copy(1, rows, torch.maximum(l_ibp[:, rows], lo)),
                                     u_ibp.index_copy(1, rows, torch.minimum(u_ibp[:, rows], hi)))


def output_spec(setup: CrownSetup, C: Tensor | None, num_outputs: int) -> tuple[str, Tensor]:
    """The node whose value ``C`` multiplies (the output's input) and ``A0`` = ``C`` (or the identity) in the
    pass's dtype, shaped (B, S, *shape of that node)."""
    ctx = setup.ctx
    out_src = ctx.nodes[-1].inputs[0]
    B = setup.input_box.mid.shape[0]
    if C is None:
        A0 = torch.eye(num_outputs, dtype=ctx.dtype, device=ctx.device).unsqueeze(0).expand(B, -1, -1)
    else:
        A0 = C.to(ctx.dtype)
    return out_src, A0.reshape(B, A0.shape[1], *ctx.shapes[out_src])


def finish(setup: CrownSetup, lb: Tensor | None, ub: Tensor | None) -> tuple:
    """Sound bounds computed in float64 for a float32 model, rounded outwards to float32."""
    if setup.ctx.sound and setup.ctx.dtype != setup.work:
        lb = round_down(lb, setup.work) if lb is not None else None
        ub = round_up(ub, setup.work) if ub is not None else None
    return lb, ub


def chain_start(nodes, start: str, layers: int) -> int:
    """The index of the earliest of the last ``layers`` layers up to ``start`` (Loss Landscape Matters'
    ``frozen + 1`` modules: every node but the input, the output and non-tensor values counts), checking that
    they form a chain (each reads the one before it)."""
    by_name = {n.name: n for n in nodes}
    node, count = by_name[start], 1
    while True:
        srcs = [i for i in node.inputs if by_name[i].kind != "meta"]
        if len(srcs) != 1:
            raise ValueError(f"frozen: the backward pass through the last layers only needs a chain of layers; "
                             f"{node.path!r} reads {len(srcs)} tensors")
        prev = by_name[srcs[0]]
        if count >= layers or prev.kind == "input":
            return next(i for i, n in enumerate(nodes) if n is node)
        node, count = prev, count + 1


def crown_bounds(nodes, shapes, ibp_bounds: dict, C: Tensor | None, num_outputs: int, method: str, *,
                 bound_lower: bool, bound_upper: bool, sound: bool, coeffs: Coefficients, norm: float, x: Tensor,
                 eps: Tensor, relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                 slopes: dict | None = None, frozen: int | None = None, linear: dict | None = None):
    """CROWN-IBP (``method="CROWN-IBP"``) or CROWN (``"CROWN"``) bounds on ``C f(x)`` (or ``f(x)``).
    ``ibp_bounds`` are ``propagate``'s per-node boxes (values or callables). ``C`` in any float dtype: with
    ``sound`` the backward pass runs in float64 and takes it exactly. ``slopes``: explicit ReLU lower slopes of
    the final backward pass (see ``backward_bound``). ``frozen`` (CROWN-IBP): the final backward pass goes through
    the last ``frozen + 1`` layers only and is concretised over the IBP box before them (Loss Landscape Matters'
    ``crown-interval-frozen``). ``linear``: a dict that receives the final pass's linear bounds per side
    (``backward_bound``), in the model's dtype. Returns ``(lb, ub)``; None for a side not requested."""
    setup = crown_setup(nodes, shapes, ibp_bounds, sound=sound, coeffs=coeffs, norm=norm, x=x, eps=eps,
                        relu_lower=relu_lower)
    if method == "CROWN":
        crown_intermediate(setup, crown_batch_size)
    out_src, A0 = output_spec(setup, C, num_outputs)
    first = None
    if frozen is not None:
        if method != "CROWN-IBP":
            raise ValueError(f"compute_bounds: frozen takes method 'CROWN-IBP', got {method!r}")
        first = chain_start(nodes, out_src, int(frozen) + 1)
    sides = tuple(s for s, want in ((False, bound_lower), (True, bound_upper)) if want)
    r = backward_bound(setup.ctx, out_src, A0, sides, setup.input_box, setup.ball, sound, slopes, first, linear)
    if linear is not None:
        for side, (A, bias) in linear.items():
            linear[side] = (A.to(setup.work), bias.to(setup.work))
    return finish(setup, r.get(False), r.get(True))


def _box(v) -> Box:
    return v() if callable(v) else v
