"""Interval bound propagation (IBP) over a captured graph, on robustkern's fused interval ops.

State per node: a ``Box`` (centre, radius), or, for an L2 input ball before the first affine layer, a
``Ball`` (the ellipsoid ``{scale * z + shift : |z - x|_2 <= eps}``, carried exactly through per-channel affine
layers and reshapes). At the first Linear/Conv2d a Ball becomes a Box through the exact dual-norm bound
``|W diag(scale) z - W diag(scale) x|_inf <= eps * ||row of W diag(scale)||_2`` (per output unit, borders of
a padded convolution included), intersected with the interval bound of the clipped L-inf box of the same
radius (the ball lies inside it), so clipping to [x_min, x_max] still tightens L2 bounds.

Fusion: a Linear/Conv2d followed by BatchNorm and/or ReLU (each feeding only the next) runs as one op with
the BatchNorm and ReLU in its epilogue; BatchNorm/Normalize followed by ReLU runs as one element-wise op.
Per-node bounds remain available: fused-away nodes are recomputed on request from the stored pre-epilogue
box.

With a specification matrix ``C`` (B, S, n_out) and a final Linear layer, ``C`` is folded into that layer
(``W' = C W``, ``b' = C b``, as auto_LiRPA and CROWN-IBP do), which is tighter than bounding the logits first.
With ``sound=True`` the fold runs in float64 and the radius covers its error and its rounding to the working dtype
(``_fold_spec``), and ``|C - C_w| (|W| |x| + |b|)`` when ``C`` was rounded to the working dtype.

Soundness costs little tightness: a float32 GEMM box with ``sound=True`` is computed in float64 from its exact
float64 values and rounded outwards once (``robustkern.reference.interval``), so it is the exact interval image
up to a few float32 ulps; element-wise steps widen by a few ulps of the magnitudes involved.

Per-channel affine maps (BatchNorm, normalisation) come from ``robustkern.bounds.precision.Coefficients``
as a rounded centre and a radius ``(s, t, ds, dt)``; the ops use the centres and ``ds |z| + dt`` is added to
the radius afterwards (after a fused ReLU too: ReLU is monotone and 1-Lipschitz).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..ops import interval_affine, interval_conv2d, interval_input_box, interval_linear
from .._numerics import gamma, next_up, round_up, tiny, unit_roundoff
from ..graph import BoundNode
from .precision import Coefficients, grow, layer_weights, magnitude

__all__ = ["Box", "Ball", "plan_fusion", "propagate"]

# Convolutions on CPU run on channels-last boxes (see _gemm); a switch for benchmarks and tests.
CHANNELS_LAST_CPU = True


@dataclass
class Box:
    mid: Tensor
    rad: Tensor

    def end_points(self, sound: bool = True) -> tuple[Tensor, Tensor]:
        """``(lower, upper) = mid -/+ rad``. With ``sound``, the radius is first widened by
        ``2u(|mid| + rad)`` so that rounding the two end points to the working precision cannot move them
        inwards (|fl(a -/+ b) - (a -/+ b)| <= u |a -/+ b|)."""
        rad = self.rad
        if sound:
            rad = rad + 2 * unit_roundoff(rad.dtype) * (self.mid.abs() + rad) + torch.finfo(rad.dtype).tiny
        return self.mid - rad, self.mid + rad

    @property
    def lower(self) -> Tensor:
        return self.end_points()[0]

    @property
    def upper(self) -> Tensor:
        return self.end_points()[1]


@dataclass
class Ball:
    center: Tensor          # the transformed clean point
    cerr: Tensor | None     # bound on the rounding error accumulated in ``center`` (None: exact)
    eps: Tensor             # (B,) L2 radius in input units
    scale: Tensor | None    # accumulated per-element scale (None: identity), shape of ``center``
    box: Box                # the clipped L-inf box of radius eps, propagated alongside


def plan_fusion(nodes: list[BoundNode]) -> dict[str, list[BoundNode]]:
    """Map the name of each group's first node to the nodes it absorbs (GEMM -> [BatchNorm] -> [ReLU];
    BatchNorm/Normalize -> ReLU). A node is absorbed only if it is the single user of its predecessor."""
    users: dict[str, list[BoundNode]] = {n.name: [] for n in nodes}
    for n in nodes:
        for i in n.inputs:
            users[i].append(n)

    def sole_user(n: BoundNode, kind: str) -> BoundNode | None:
        us = users[n.name]
        return us[0] if len(us) == 1 and us[0].kind == kind else None

    groups: dict[str, list[BoundNode]] = {}
    absorbed: set[str] = set()
    for n in nodes:
        if n.name in absorbed:
            continue
        chain: list[BoundNode] = []
        if n.kind in ("linear", "conv2d"):
            bn = sole_user(n, "batchnorm")
            if bn is not None and _bn_channels_match(n, bn):
                chain.append(bn)
            last = chain[-1] if chain else n
            relu = sole_user(last, "relu")
            if relu is not None:
                chain.append(relu)
        elif n.kind in ("batchnorm", "normalize"):
            relu = sole_user(n, "relu")
            if relu is not None:
                chain.append(relu)
        if chain:
            groups[n.name] = chain
            absorbed.update(c.name for c in chain)
    return groups


def _bn_channels_match(gemm: BoundNode, bn: BoundNode) -> bool:
    out = gemm.module.out_features if gemm.kind == "linear" else gemm.module.out_channels
    return bn.module.num_features == out and (gemm.kind == "conv2d") == isinstance(bn.module, torch.nn.BatchNorm2d)


def params(node: BoundNode, dtype: torch.dtype):
    """The weight and bias of a Linear/Conv2d node in ``dtype`` (no copy when they already are)."""
    return layer_weights(node, dtype)


def _coefficient_error(coef, mag: Tensor) -> Tensor | None:
    """``ds |z| + dt`` per element (``mag`` bounds ``|z|``, channels in dim 1), or None when exact."""
    _, _, ds, dt = coef
    if ds is None:
        return None
    shape = (1, -1) + (1,) * (mag.dim() - 2)
    return ds.reshape(shape) * mag + dt.reshape(shape)


def _widen(box: Box, extra: Tensor | float, sound: bool) -> Box:
    if not sound:
        return box
    u = unit_roundoff(box.mid.dtype)
    return Box(box.mid, box.rad + 4 * u * extra + torch.finfo(box.mid.dtype).tiny)


def ball_to_box(state) -> Box:
    return state.box if isinstance(state, Ball) else state


def _affine_state(state, coef, relu: bool, sound: bool):
    scale, shift = coef[0], coef[1]
    if isinstance(state, Ball) and not relu:
        shape = (1, -1) + (1,) * (state.center.dim() - 2)
        a, c = scale.reshape(shape), shift.reshape(shape)
        ac = state.center * a
        center = ac + c
        cerr = None
        if sound or state.cerr is not None:
            cerr = state.cerr * a.abs() if state.cerr is not None else torch.zeros_like(center)
            if sound:
                cerr = cerr + 4 * unit_roundoff(center.dtype) * (ac.abs() + c.abs()) + torch.finfo(center.dtype).tiny
                extra = _coefficient_error(coef, magnitude(state.box.mid, state.box.rad))
                if extra is not None:  # the exact map's image lies within extra of the rounded map's
                    cerr = grow(cerr, extra)
        new_scale = a.expand_as(center) if state.scale is None else state.scale * a
        box = _affine_box(state.box, coef, False, sound)
        return Ball(center, cerr, state.eps, new_scale, box)
    return _affine_box(ball_to_box(state), coef, relu, sound)


def _affine_box(box: Box, coef, relu: bool, sound: bool) -> Box:
    out = Box(*interval_affine(box.mid, box.rad, coef[0], coef[1], relu=relu, sound=sound))
    extra = _coefficient_error(coef, magnitude(box.mid, box.rad)) if sound else None
    return out if extra is None else Box(out.mid, grow(out.rad, extra))


def _gemm(node: BoundNode, box: Box, weight, bias, epi: dict, sound: bool, return_pre: bool):
    m = node.module
    if node.kind == "linear":
        return interval_linear(box.mid, box.rad, weight, bias, sound=sound, return_pre=return_pre, **epi)
    mid, rad = box.mid, box.rad
    if CHANNELS_LAST_CPU and mid.device.type == "cpu" and not mid.is_contiguous(memory_format=torch.channels_last):
        # oneDNN's convolutions, forward and backward, run faster on channels-last (NHWC) boxes on CPU and an
        # NCHW backward pays a layout copy of the input gradient; the boxes stay NHWC from here (the interval
        # ops and the fused epilogue backward handle both layouts), so only the first convolution converts.
        mid = mid.contiguous(memory_format=torch.channels_last)
        rad = rad.contiguous(memory_format=torch.channels_last)
    return interval_conv2d(mid, rad, weight, bias, m.stride, m.padding, m.dilation, m.groups,
                           sound=sound, return_pre=return_pre, **epi)


def _ball_row_norms(node: BoundNode, ball: Ball, weight: Tensor, sound: bool) -> Tensor:
    """``||row of W diag(scale)||_2`` per output unit (and per example when ``weight`` is per example)."""
    m = node.module
    sq = torch.ones_like(ball.center[:1]) if ball.scale is None else ball.scale[:1].square()
    w2 = weight.square()
    if node.kind == "linear":
        if weight.dim() == 3:
            sq = sq.expand(weight.shape[0], -1) if ball.scale is None else ball.scale.square()
            norms2 = torch.bmm(w2, sq.unsqueeze(-1)).squeeze(-1)
        else:
            norms2 = sq @ w2.t()
        k = weight.shape[-1]
    else:
        norms2 = torch.nn.functional.conv2d(sq, w2, None, m.stride, m.padding, m.dilation, m.groups)
        k = weight.shape[1] * weight.shape[2] * weight.shape[3]
    norms = norms2.sqrt()
    if sound:
        norms = norms * (1 + 2 * gamma(k + 2, unit_roundoff(norms.dtype)))
    return norms


def _gemm_ball(node: BoundNode, ball: Ball, weight, bias, sound: bool) -> Box:
    """The first affine layer of an L2 ball: dual-norm bound intersected with the box bound."""
    cerr = ball.cerr if ball.cerr is not None else torch.zeros_like(ball.center)
    m, r = _gemm(node, Box(ball.center, cerr), weight, bias, {}, sound, False)
    eps = ball.eps.reshape((-1,) + (1,) * (m.dim() - 1))
    r = r + eps * _ball_row_norms(node, ball, weight, sound)
    if sound:
        r = r * (1 + 4 * unit_roundoff(r.dtype))
    bm, br = _gemm(node, ball.box, weight, bias, {}, sound, False)
    lo = torch.maximum(m - r, bm - br)
    hi = torch.minimum(m + r, bm + br)
    hi = torch.maximum(hi, lo)  # both boxes contain the true image, so they overlap up to rounding
    out = Box((lo + hi) * 0.5, (hi - lo) * 0.5)
    return _widen(out, m.abs() + r + bm.abs() + br, sound)


def _fold_spec(C: Tensor, C_err: Tensor | None, weight: Tensor, bias: Tensor | None, box: Box, sound: bool):
    """``W' = C W``, ``b' = C b`` per example, and (``sound``) the radius that covers what the folded layer misses
    of ``C (W x + b)`` over the box. Sound folds are computed in float64 (a product of two float32 numbers is
    exact there) and rounded to nearest in the working dtype; the radius covers the float64 fold's error,
    ``gamma_{n+1}(2^-53) |C| (|W| |x| + |b|)``, the rounding to the working dtype, ``|C W - W'| |x| + |C b - b'|``
    (a few ulps of ``|C W| |x|``), and the rounding of ``C`` itself, ``C_err (|W| |x| + |b|)``."""
    if not sound:
        return torch.matmul(C, weight), (torch.matmul(C, bias) if bias is not None else None), None
    dtype, f64 = weight.dtype, torch.float64
    u = unit_roundoff(f64)
    n, k = weight.shape
    C64, w64 = C.to(f64), weight.to(f64)
    b64 = bias.to(f64) if bias is not None else None
    wf64 = torch.matmul(C64, w64)
    bf64 = torch.matmul(C64, b64) if b64 is not None else None
    wf, bf = wf64.to(dtype), (bf64.to(dtype) if bf64 is not None else None)
    mag = magnitude(box.mid, box.rad).to(f64)
    logits = torch.matmul(mag, w64.abs().t())                  # |W| |x| (B, n_out)
    if b64 is not None:
        logits = logits + b64.abs()
    logits = logits * (1 + gamma(k + 2, u)) + k * tiny(f64)
    coef = C64.abs() * (2 * gamma(n + 1, u))
    if C_err is not None:
        coef = coef + C_err.to(f64)
    slack = torch.bmm(coef, logits.unsqueeze(-1)).squeeze(-1) * (1 + gamma(n + 1, u))
    if dtype != f64:
        rounding = torch.bmm((wf64 - wf.to(f64)).abs(), mag.unsqueeze(-1)).squeeze(-1)
        if bf64 is not None:
            rounding = rounding + (bf64 - bf.to(f64)).abs()
        slack = slack + rounding * (1 + gamma(k + 3, u)) + k * tiny(f64)
    return wf, bf, round_up(next_up(slack), dtype)


def _is_state(v) -> bool:
    return isinstance(v, (Box, Ball))


def _apply_reshape(node: BoundNode, env: dict, state):
    def run(t: Tensor) -> Tensor:
        t = t.contiguous()   # the user's .view() sees the standard layout, whatever layout the boxes run in
        values = {k: (t if k in node.inputs and _is_state(v) else v) for k, v in env.items()}
        return node.call(values)

    if isinstance(state, Ball):
        return Ball(run(state.center), None if state.cerr is None else run(state.cerr), state.eps,
                    None if state.scale is None else run(state.scale.contiguous()),
                    Box(run(state.box.mid), run(state.box.rad)))
    return Box(run(state.mid), run(state.rad))


def propagate(nodes: list[BoundNode], groups: dict[str, list[BoundNode]], x: Tensor, eps: Tensor, norm: float,
              x_min: float, x_max: float, C: Tensor | None, sound: bool, coeffs: Coefficients,
              input_box: tuple[Tensor, Tensor] | None = None, C_err: Tensor | None = None,
              ) -> tuple[Box, dict[str, Box | Callable[[], Box]]]:
    """Run IBP. Returns the output box (of ``C`` times the output when ``C`` is given) and the per-node
    boxes (a callable for nodes that were fused away: it recomputes the box on request). ``x``, ``eps``,
    ``C`` in the working dtype; ``C_err`` bounds ``C``'s own rounding (``precision.spec_rounding``);
    ``coeffs`` gives the BatchNorm/normalisation maps. ``input_box`` ``(mid, rad)``: an explicit element-wise
    input box used instead of the (clipped) ball around ``x``."""
    dtype, device = x.dtype, x.device
    absorbed = {c.name: head for head, chain in groups.items() for c in chain}
    out_node = nodes[-1]
    src = out_node.inputs[0]
    by_name = {n.name: n for n in nodes}
    fold = C is not None and by_name[src].kind == "linear" and src not in groups
    env: dict = {}
    bounds: dict = {}
    for node in nodes:
        if node.name in absorbed:
            continue
        kind = node.kind
        ins = [env[i] for i in node.inputs if _is_state(env.get(i))]
        if kind == "input" and input_box is not None:
            state = Box(*input_box)
        elif kind == "input":
            mid, rad = interval_input_box(x, eps, x_min, x_max, sound=sound)
            state = Box(mid, rad) if norm != 2 else Ball(x, None, eps, None, Box(mid, rad))
        elif kind == "meta":
            env[node.name] = node.call({k: (v.mid if isinstance(v, Box) else v.center if isinstance(v, Ball)
                                            else v) for k, v in env.items()})
            continue
        elif kind in ("linear", "conv2d"):
            state = _run_gemm(node, ins[0], groups.get(node.name, []), C if fold and node.name == src else None,
                              C_err if fold and node.name == src else None, dtype, sound, coeffs, bounds)
        elif kind in ("batchnorm", "normalize"):
            coef = coeffs.get(node, dtype, device, input_box=ball_to_box(ins[0]))
            chain = groups.get(node.name, [])
            if chain:
                pre = ball_to_box(ins[0])
                bounds[node.name] = _lazy_affine(pre, coef, sound)
                state = _affine_state(ins[0], coef, True, sound)
                bounds[chain[-1].name] = state
            else:
                state = _affine_state(ins[0], coef, False, sound)
        elif kind == "relu":
            box = ball_to_box(ins[0])
            state = Box(*interval_affine(box.mid, box.rad, relu=True, sound=sound))
        elif kind == "add":
            a, b = ball_to_box(ins[0]), ball_to_box(ins[1])
            out = Box(a.mid + b.mid, a.rad + b.rad)
            state = _widen(out, out.mid.abs() + out.rad, sound)
        elif kind == "avgpool":
            state = _avgpool(node, ball_to_box(ins[0]), sound)
        elif kind == "reshape":
            state = _apply_reshape(node, env, ins[0])
        elif kind == "identity":
            if node.module is not None and node.module.training and isinstance(node.module, torch.nn.Dropout) \
                    and node.module.p > 0:
                raise RuntimeError(f"robustkern.bounds: Dropout '{node.path}' is in training mode; bounds of a "
                                   f"random layer are undefined (put the model in eval mode)")
            state = ins[0]
        elif kind == "output":
            state = ball_to_box(ins[0])
            if C is not None and not fold:
                mid, rad = state.mid.flatten(1), state.rad.flatten(1)
                out = Box(*interval_linear(mid, rad, C, None, sound=sound))
                if sound and C_err is not None:
                    extra = torch.bmm(C_err, magnitude(mid, rad).unsqueeze(-1)).squeeze(-1)
                    out = Box(out.mid, grow(out.rad, extra * (1 + gamma(mid.shape[1] + 1, unit_roundoff(dtype)))))
                state = out
            return state, bounds
        else:  # pragma: no cover - capture() only produces the kinds above
            raise AssertionError(kind)
        env[node.name] = state
        for c in groups.get(node.name, []):
            env[c.name] = state
        if node.name not in bounds:
            bounds[node.name] = ball_to_box(state)
    raise AssertionError("graph without output node")


def _lazy_affine(pre: Box, coef, sound) -> Callable[[], Box]:
    return lambda: _affine_box(pre, coef, False, sound)


def _run_gemm(node, state, chain, C, C_err, dtype, sound, coeffs, bounds):
    weight, bias = coeffs.weights(node, dtype)
    slack = None
    if C is not None:
        weight, bias, slack = _fold_spec(C, C_err, weight, bias, ball_to_box(state), sound)
    epi: dict = {}
    bn = next((c for c in chain if c.kind == "batchnorm"), None)
    coef = None
    if bn is not None:
        coef = coeffs.get(bn, dtype, weight.device)
        epi["scale"], epi["shift"] = coef[0], coef[1]
    if chain and chain[-1].kind == "relu":
        epi["relu"] = True
    if isinstance(state, Ball):
        out = _gemm_ball(node, state, weight, bias, sound)
        pre = out
        if epi:
            out = Box(*interval_affine(out.mid, out.rad, epi.get("scale"), epi.get("shift"),
                                       relu=epi.get("relu", False), sound=sound))
    else:
        mid, rad, pre_box = _gemm(node, state, weight, bias, epi, sound, True)
        out = Box(mid, rad)
        pre = Box(*pre_box) if pre_box is not None else out
    if slack is not None:
        out = Box(out.mid, grow(out.rad, slack))
        pre = out
    if coef is not None and sound:
        extra = _coefficient_error(coef, magnitude(pre.mid, pre.rad))
        if extra is not None:
            out = Box(out.mid, grow(out.rad, extra))
    bounds[node.name] = pre
    if bn is not None:
        bounds[bn.name] = out if not epi.get("relu") else _lazy_affine(pre, coef, sound)
    if chain:
        bounds[chain[-1].name] = out
    return out


def _avgpool(node: BoundNode, box: Box, sound: bool) -> Box:
    pool = node.module
    if not sound:
        return Box(pool(box.mid), pool(box.rad))
    k = pool.kernel_size if isinstance(pool.kernel_size, int) else pool.kernel_size[0] * pool.kernel_size[1]
    k = k * k if isinstance(pool.kernel_size, int) else k
    e = gamma(k + 2, unit_roundoff(box.mid.dtype))
    rad = pool(box.rad + 2 * e * box.mid.abs()) * (1 + 3 * e) + k * torch.finfo(box.mid.dtype).tiny
    return Box(pool(box.mid), rad)
