"""Lipschitz bounds for L2 balls: the ball walk that LMT and BCP share, and LMT itself.

Ball walk (``propagate_ball``). Along a chain network (Linear, Conv2d, ReLU, BatchNorm, normalisation, reshapes),
every input within L2 distance ``eps`` of ``x`` maps, at every layer, into the ball of radius ``r`` around the
clean point's activation ``c``: ``r`` starts at ``eps`` and is multiplied by the operator norm of each affine
layer (``||A||_2``; ``max |scale|`` for a per-channel affine layer) and kept by ReLU (1-Lipschitz). With
``box=True`` it also carries BCP's box (Lee, Lee, Park 2020, "Lipschitz-Certifiable Training with a Tight Outer
Bound", sungyoon-lee/bcp ``net_BCP``): the interval image of the previous box, intersected after every affine
layer with the ball's extent per unit, ``|A_k (z - c)| <= ||A_k||_2 r`` (``A_k`` the unit's row; for a
convolution the output channel's whole kernel, as BCP), and after every ReLU with ``[relu(c - r), relu(c + r)]``.
The input box is the L-inf box of radius ``eps`` clipped to ``[x_min, x_max]`` (BCP does not clip; clipping only
tightens, and ``x_min=-inf, x_max=inf`` gives BCP's numbers).

Norms. Training (``sound=False``) takes estimates, normally power-iteration estimates with persistent iterates
(``robustkern.bounds.spectral.PowerIteration``); verification (``sound=True``) takes rigorous upper bounds
(``upper_norms``: Gram iteration, ``robustkern.bounds.spectral``) and runs in float64: every centre is computed
with a rounding-error bound ``e`` (``gamma_{k+2} (|A| |c| + |b|)`` per unit), and the ball around the computed
centre grows by ``||e||_2``, so it contains the ball around the exact centre; boxes use robustkern's sound
interval ops; per-channel coefficients are the enclosures of ``robustkern.bounds.precision``.

LMT (Tsuzuku, Sato, Sugiyama 2018, "Lipschitz-Margin Training"). With ``L`` an upper bound of the network's L2
Lipschitz constant, every margin ``z_y - z_j`` moves by at most ``sqrt(2) L eps`` in the ball, so the label is
certified when every margin of the clean logits exceeds ``sqrt(2) L eps``; the training loss is the
cross-entropy of the logits with ``sqrt(2) L eps`` added to every non-target logit. For a specification row
``C_s`` the bound is ``C_s z - ||C_s||_2 r_out`` (``sqrt(2) r_out`` for a margin row). ``last_layer="pairwise"``
keeps the final Linear ``W`` out of ``L`` and uses ``||C_s W||_2`` times the radius before it (``||w_y -
w_j||_2`` for a margin row), the bound BCP's code computes for LMT (``lmt_translation``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import gamma, ieee_products, next_down, next_up, tiny
from ..graph import BoundNode, UnsupportedLayerError
from .ibp import Box, _affine_box, params
from .module import BoundedModule
from .precision import enter
from .spec import margin_spec, robust_cross_entropy
from .spectral import PowerIteration, operator_norm_upper
from ..ops import interval_conv2d, interval_input_box, interval_linear

__all__ = ["BallState", "chain_nodes", "upper_norms", "estimated_norms", "propagate_ball", "lmt_bounds",
           "lmt_loss", "spec_center"]

_U64 = 2.0 ** -53
_CHAIN_KINDS = ("linear", "conv2d", "relu", "batchnorm", "normalize", "reshape", "identity")


@dataclass
class BallState:
    """Every activation reachable from the input set lies in the ball ``||z - center||_2 <= radius`` (per
    example) and, when ``box`` is given, in the box."""
    center: Tensor
    radius: Tensor            # (B,)
    box: Box | None = None


def chain_nodes(nodes: list[BoundNode]) -> list[BoundNode]:
    """The tensor nodes of a chain network in order (input to output excluded), each reading the one before;
    UnsupportedLayerError for any other graph (branches, pooling)."""
    out, prev = [], None
    for n in nodes:
        if n.kind in ("input", "meta"):
            prev = n.name if n.kind == "input" else prev
            continue
        if n.kind == "output":
            break
        if n.kind not in _CHAIN_KINDS:
            raise UnsupportedLayerError(
                f"robustkern.bounds: the Lipschitz methods (LMT, BCP) take chains of Linear, Conv2d, ReLU, "
                f"BatchNorm, normalisation and reshapes; '{n.path}' is a {n.kind} layer")
        tensor_inputs = [i for i in n.inputs if i == prev]
        if not tensor_inputs:
            raise UnsupportedLayerError(f"robustkern.bounds: the Lipschitz methods take chain networks; "
                                        f"'{n.path}' does not read the layer before it")
        out.append(n)
        prev = n.name
    return out


def upper_norms(bm: BoundedModule) -> dict[str, float]:
    """Rigorous upper bounds of the operator norms of every Linear/Conv2d layer (``spectral.operator_norm_upper``),
    keyed by node name: compute once per set of weights and pass to the bound functions."""
    shapes = bm.node_shapes()
    out = {}
    for n in chain_nodes(bm.nodes):
        if n.kind in ("linear", "conv2d"):
            out[n.name] = operator_norm_upper(n, shapes[n.inputs[0]])
    return out


def estimated_norms(bm: BoundedModule, power: PowerIteration, steps: int = 1) -> dict[str, Tensor]:
    """Power-iteration estimates (differentiable) of the operator norms of every Linear/Conv2d layer, advancing
    ``power``'s persistent iterates by ``steps``."""
    dtype = bm._dtype()
    return {n.name: power.estimate(n, params(n, dtype)[0], steps) for n in chain_nodes(bm.nodes)
            if n.kind in ("linear", "conv2d")}


def power_iteration_for(bm: BoundedModule, seed: int = 0) -> PowerIteration:
    """A ``PowerIteration`` over ``bm``'s layers (its iterates persist in the object)."""
    return PowerIteration(bm.nodes, bm.node_shapes(), seed)


# ----------------------------------------------------------------------------------------- rounding helpers
def _norm2_up(v: Tensor) -> Tensor:
    """An upper bound of the L2 norm over all but the first dimension (float64 values taken as exact)."""
    n = v[0].numel()
    s = v.square().flatten(1).sum(1)
    return next_up(torch.sqrt(next_up(s * (1 + gamma(n + 2, _U64)) + n * tiny(torch.float64))))


def _grow(r: Tensor, sigma, e: Tensor | None) -> Tensor:
    """``sigma r + e`` rounded up (float64)."""
    out = r * sigma
    if e is not None:
        out = out + e
    return next_up(out * (1 + 4 * _U64) + tiny(torch.float64))


def _box_of(lo: Tensor, hi: Tensor, sound: bool) -> Box:
    hi = torch.maximum(hi, lo)  # both sets contain the true image, so they overlap up to rounding
    box = Box((lo + hi) * 0.5, (hi - lo) * 0.5)
    if sound:
        box = Box(box.mid, box.rad + 4 * _U64 * (box.mid.abs() + box.rad) + tiny(torch.float64))
    return box


def _intersect(box: Box, center: Tensor, half: Tensor, sound: bool) -> Box:
    """``box`` intersected with ``[center - half, center + half]``."""
    lo1, hi1 = box.end_points(sound)
    lo2, hi2 = Box(center, half).end_points(sound)
    return _box_of(torch.maximum(lo1, lo2), torch.minimum(hi1, hi2), sound)


def _row_norms(node: BoundNode, weight: Tensor, sound: bool) -> Tensor:
    """``||A_k||_2`` per output unit, shaped to broadcast over the layer's output (B, *out)."""
    w2 = weight.square().flatten(1).sum(1)
    norms = w2.sqrt()
    if sound:
        norms = next_up(norms * (1 + 2 * gamma(weight[0].numel() + 2, _U64)))
    return norms if node.kind == "linear" else norms.reshape(1, -1, 1, 1)


def _affine(node: BoundNode, z: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    if node.kind == "linear":
        return F.linear(z, weight, bias)
    m = node.module
    return F.conv2d(z, weight, bias, m.stride, m.padding, m.dilation, m.groups)


def _affine_error(node: BoundNode, c: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """A bound of ``|fl(A c + b) - (A c + b)|`` per output unit (float64)."""
    k = weight[0].numel()
    mag = _affine(node, c.abs(), weight.abs(), bias.abs() if bias is not None else None)
    g = gamma(k + 2, _U64)
    return next_up(mag * (g * (1 + g)) + k * tiny(torch.float64))


# ----------------------------------------------------------------------------------------------- ball walk
def propagate_ball(bm: BoundedModule, x: Tensor, eps, norms: dict, *, box: bool = False, sound: bool = True,
                   x_min: float = 0.0, x_max: float = 1.0, stop_before_last: bool = False):
    """Walk the ball (and with ``box``, BCP's box) from the input set ``||x' - x||_2 <= eps`` through the chain
    (module docstring). ``norms`` maps each Linear/Conv2d node name to its operator norm (estimates for
    training, ``upper_norms`` for ``sound=True``). Returns ``(state, last)``: the state at the output, or with
    ``stop_before_last`` at the input of the final layer ``last`` (which must be a Linear)."""
    chain = chain_nodes(bm.nodes)
    inp = enter(x, eps, 2.0, x_min, x_max, None, torch.float64 if sound else bm._dtype())
    coeffs = bm._coefficients(inp.x, sound)
    last = chain[-1] if stop_before_last else None
    if last is not None and last.kind != "linear":
        raise UnsupportedLayerError(f"robustkern.bounds: this bound needs a final Linear layer; the last layer "
                                    f"'{last.path}' is a {last.kind} layer")
    with ieee_products():
        return _walk(bm, chain, inp, norms, coeffs, box, sound, last), last


def _walk(bm, chain, inp, norms, coeffs, box: bool, sound: bool, last):
    dtype = inp.dtype
    c, r = inp.xw, inp.eps
    state_box = None
    if box:
        state_box = Box(*interval_input_box(c, r, inp.x_min, inp.x_max, sound=sound))
    prev = bm.nodes[0].name
    env = {prev: c}
    for node in bm.nodes[1:]:
        if node is last or node.kind == "output":
            break
        if node.kind == "meta":
            env[node.name] = node.call(env)
            continue
        kind = node.kind
        if kind in ("linear", "conv2d"):
            w, b = params(node, dtype)
            c_new = _affine(node, c, w, b)
            err = _affine_error(node, c, w, b) if sound else None
            if state_box is not None:
                half = r.reshape((-1,) + (1,) * (c_new.dim() - 1)) * _row_norms(node, w, sound)
                if sound:
                    half = next_up(next_up(half * (1 + 2 * _U64)) + err)
                if kind == "linear":
                    ibp = Box(*interval_linear(state_box.mid, state_box.rad, w, b, sound=sound))
                else:
                    m = node.module
                    ibp = Box(*interval_conv2d(state_box.mid, state_box.rad, w, b, m.stride, m.padding, m.dilation,
                                               m.groups, sound=sound))
                state_box = _intersect(ibp, c_new, half, sound)
            sigma = norms[node.name]
            r = _grow(r, sigma, _norm2_up(err)) if sound else r * sigma
            c = c_new
        elif kind in ("batchnorm", "normalize"):
            s, t, ds, dt = coeffs.get(node, dtype, c.device)
            shape = (1, -1) + (1,) * (c.dim() - 2)
            s_abs = s.abs() if ds is None else next_up(s.abs() + ds)
            c_new = c * s.reshape(shape) + t.reshape(shape)
            err = None
            if sound:
                err = 2 * _U64 * (1 + _U64) * ((c * s.reshape(shape)).abs() + t.abs().reshape(shape))
                if ds is not None:
                    err = err + ds.reshape(shape) * c.abs() + dt.reshape(shape)
                err = next_up(err * (1 + 4 * _U64) + tiny(dtype))
            if state_box is not None:
                half = r.reshape((-1,) + (1,) * (c.dim() - 1)) * s_abs.reshape(shape)
                if sound:
                    half = next_up(next_up(half * (1 + 2 * _U64)) + err)
                state_box = _intersect(_affine_box(state_box, (s, t, ds, dt), False, sound), c_new, half, sound)
            sigma = s_abs.max()
            r = _grow(r, sigma, _norm2_up(err)) if sound else r * sigma
            c = c_new
        elif kind == "relu":
            if state_box is not None:
                rr = r.reshape((-1,) + (1,) * (c.dim() - 1))
                lo2, hi2 = c - rr, c + rr
                if sound:
                    lo2, hi2 = next_down(lo2), next_up(hi2)
                lo1, hi1 = state_box.end_points(sound)
                state_box = _box_of(torch.maximum(torch.relu(lo1), torch.relu(lo2)),
                                    torch.minimum(torch.relu(hi1), torch.relu(hi2)), sound)
            c = torch.relu(c)
        elif kind == "reshape":
            def run(t: Tensor, src=prev) -> Tensor:
                values = dict(env)
                values[src] = t.contiguous()
                return node.call(values)

            c = run(c)
            if state_box is not None:
                state_box = Box(run(state_box.mid), run(state_box.rad))
        elif kind == "identity":
            m = node.module
            if m is not None and m.training and isinstance(m, torch.nn.Dropout) and m.p > 0:
                raise RuntimeError(f"robustkern.bounds: Dropout '{node.path}' is in training mode; bounds of a "
                                   f"random layer are undefined (put the model in eval mode)")
        env[node.name] = c
        prev = node.name
    return BallState(c, r, state_box)


# ------------------------------------------------------------------------------------------- final margins
def spec_center(C: Tensor, weight: Tensor, bias: Tensor | None, c: Tensor, sound: bool):
    """``(G, val, err)``: ``G = C W`` (B, S, h), ``val = C (W c + b)`` (B, S) and, when ``sound``, bounds of
    their rounding errors: ``err = (E_G, e_val)`` with ``|G - exact| <= E_G`` and ``|val - exact| <= e_val``
    (float64)."""
    C = C.to(c.dtype)
    G = torch.matmul(C, weight)
    val = torch.bmm(G, c.unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        val = val + torch.matmul(C, bias)
    if not sound:
        return G, val, None
    K, h = weight.shape
    gK, gh = gamma(K + 2, _U64), gamma(h + K + 4, _U64)
    E_G = next_up(torch.matmul(C.abs(), weight.abs()) * (gK * (1 + gK)) + K * tiny(c.dtype))
    mag = torch.bmm(G.abs() + E_G, c.abs().unsqueeze(-1)).squeeze(-1)
    if bias is not None:
        mag = mag + torch.matmul(C.abs(), bias.abs())
    e_val = next_up(mag * (gh + gK) * (1 + gh) + (h + K) * tiny(c.dtype))
    return G, val, (E_G, e_val)


def _spec(C, y, num_outputs, dtype):
    return C if C is not None else margin_spec(y, num_outputs, dtype)


def _lower(val: Tensor, minus: Tensor, slack: Tensor | None) -> Tensor:
    """``val - minus - slack``, rounded down when ``slack`` is given (sound)."""
    out = val - minus
    if slack is None:
        return out
    total = next_up((slack + _U64 * (val.abs() + minus.abs())) * (1 + 4 * _U64) + tiny(val.dtype))
    return next_down(out - total)


def lmt_bounds(bm: BoundedModule, x: Tensor, eps, C: Tensor, *, norms: dict | None = None, sound: bool = True,
               last_layer: str = "lipschitz", x_min: float = 0.0, x_max: float = 1.0) -> Tensor:
    """LMT lower bounds (B, S) of ``C f(x')`` over the L2 ball (module docstring); ``last_layer`` is
    "lipschitz" (the whole network's bound, Tsuzuku et al.) or "pairwise" (``||C_s W||_2`` at the final
    Linear). ``norms``: estimates (training) or ``upper_norms(bm)`` (``sound=True``, float64, certified)."""
    if last_layer not in ("lipschitz", "pairwise"):
        raise ValueError(f"lmt_bounds: last_layer must be 'lipschitz' or 'pairwise', got {last_layer!r}")
    pair = last_layer == "pairwise"
    if norms is None:
        if not sound:
            raise ValueError("lmt_bounds: training bounds (sound=False) need norms (estimated_norms)")
        norms = upper_norms(bm)
    state, last = propagate_ball(bm, x, eps, norms, sound=sound, x_min=x_min, x_max=x_max, stop_before_last=pair)
    c, r = state.center, state.radius
    dtype = c.dtype
    if pair:
        w, b = params(last, dtype)
        G, val, err = spec_center(C, w, b, c, sound)
        norm = G.norm(dim=-1)
        if sound:
            E_G, e_val = err
            norm = next_up(next_up(norm * (1 + gamma(G.shape[-1] + 2, _U64))) + _norm2_up(E_G.flatten(0, 1))
                           .reshape(norm.shape))
    else:
        Cw = C.to(dtype)
        val = torch.bmm(Cw, c.reshape(c.shape[0], -1, 1)).squeeze(-1)
        norm = Cw.norm(dim=-1)
        e_val = None
        if sound:
            K = Cw.shape[-1]
            gK = gamma(K + 2, _U64)
            e_val = next_up(torch.bmm(Cw.abs(), c.abs().reshape(c.shape[0], -1, 1)).squeeze(-1) * gK * (1 + gK)
                            + K * tiny(dtype))
            norm = next_up(norm * (1 + gamma(K + 2, _U64)))
    minus = norm * r.unsqueeze(1)
    if sound:
        minus = next_up(minus * (1 + 2 * _U64))
        return _lower(val, minus, e_val)
    return val - minus


def lmt_loss(bm: BoundedModule, x: Tensor, y: Tensor, eps, *, norms: dict, last_layer: str = "lipschitz",
             x_min: float = 0.0, x_max: float = 1.0):
    """LMT's training loss: the cross-entropy of the logits with the certified margin ``sqrt(2) L eps`` (or its
    pairwise form) added to every non-target logit, i.e. ``robust_cross_entropy`` of the margins' lower bounds
    (Tsuzuku et al.'s Eq. 4 with ``c = eps``). Returns ``(loss, lb)``; unwidened (training)."""
    C = margin_spec(y, bm.num_outputs, bm._dtype())
    lb = lmt_bounds(bm, x, eps, C, norms=norms, sound=False, last_layer=last_layer, x_min=x_min, x_max=x_max)
    return robust_cross_entropy(lb), lb
