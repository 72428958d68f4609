"""Reference for ``robustkern.compat.crown_ibp``: a plain-PyTorch transcription of the bound computations of
CROWN-IBP's ``bound_layers.BoundSequential`` (Zhang et al., ICLR 2020; huanzhang12/CROWN-IBP
``bound_layers.py``, shared by sungyoon-lee/LossLandscapeMatters), written independently of robustkern's
bound propagation (no robustkern op), for ``nn.Sequential`` models of Linear, Conv2d, ReLU and flatten layers.

What the original computes, per call (``norm`` inf or 2; ``x_L``/``x_U`` the input box, or for L2 ``x_U = x_L =
x`` and radius ``eps``):

* ``interval_range``: IBP layer by layer (centre ``W m + b``, radius ``|W| r``); for L2 the first affine layer
  is ``W x + b -/+ eps ||W_row||_2`` (for a convolution the whole kernel's norm at every position); the
  specification ``C`` is folded into the last Linear (``C W``, ``C b``). Every ReLU keeps its input bounds.
  Returns ``(ub, lb, tightness, unstable, dead, alive)``: the counts over the batch of ReLU inputs with
  ``l < -1e-5 and u > 1e-5`` (the first two), ``u < 0`` and ``l > 0``.
* ``backward_range``: CROWN from ``C`` back to the input with the ReLU bounds kept by the last
  ``interval_range`` (or ``full_backward_range``): upper line ``d u``-slope ``ub_r / (ub_r - lb_r)`` with
  ``lb_r = min(l, 0)``, ``ub_r = max(max(u, 0), lb_r + 1e-8)``, intercept ``-lb_r d``; lower slope
  ``1[d > 0.5]`` (default), ``d`` ("same-slope"), ``1[d >= 1]`` ("zero-lb"), ``1[d > 0]`` ("one-lb").
  Concretised as ``A mid -/+ |A| rad + sum_b`` (L-inf) or ``A x -/+ eps ||A||_2 + sum_b`` (L2). Returns
  ``(ub, upper_sum_b, lb, lower_sum_b)``; a side not asked for is ``[inf]`` / ``[-inf]`` with sum ``[0]``.
* ``full_backward_range``: IBP up to the first ReLU, then the input bounds of every later ReLU by
  ``backward_range`` over the layers before it (not intersected with IBP), then ``backward_range`` with ``C``.

``BoundSequentialReference(model, bound_opts)`` shares ``model``'s parameters (so it can be timed in a training
step) and reads the per-layer input/output shapes from one forward, as the original's layers record them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BoundSequentialReference"]

GUARD = 1e-5     # the original's "unstable" threshold on ReLU input bounds


def _is_flatten(m: nn.Module) -> bool:
    return type(m).__name__ == "Flatten"


class BoundSequentialReference:
    """The original's ``BoundSequential`` bound methods over ``model`` (an ``nn.Sequential``)."""

    def __init__(self, model: nn.Sequential, bound_opts: dict | None = None):
        self.layers = [m for m in model if isinstance(m, (nn.Linear, nn.Conv2d, nn.ReLU)) or _is_flatten(m)]
        self.opts = dict(bound_opts or {})
        self.relu_bounds: dict[int, tuple[Tensor, Tensor]] = {}    # layer index -> (lower, upper) of its input
        self.layer_inputs: dict[int, tuple[Tensor, Tensor]] = {}   # layer index -> IBP (lower, upper) of its input
        self.lower: dict | None = None
        self.shapes: dict[int, tuple[tuple, tuple]] = {}           # layer index -> (input shape, output shape)

    def forward(self, x: Tensor) -> Tensor:
        for i, m in enumerate(self.layers):
            y = x.reshape(x.shape[0], -1) if _is_flatten(m) else m(x)
            self.shapes[i] = (tuple(x.shape[1:]), tuple(y.shape[1:]))
            x = y
        return x

    # ------------------------------------------------------------------------------------------ IBP
    def interval_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None):
        h_U, h_L = x_U, x_L
        tight = unstable = dead = alive = 0
        self.layer_inputs = {}
        for i, m in enumerate(self.layers):
            last = i == len(self.layers) - 1
            self.layer_inputs[i] = (h_L, h_U)
            if isinstance(m, nn.ReLU):
                assert norm == math.inf
                self.relu_bounds[i] = (h_L, h_U)
                unstab = ((h_L < -GUARD) & (h_U > GUARD)).sum()
                tight, unstable = tight + unstab, unstable + unstab
                dead, alive = dead + (h_U < 0).sum(), alive + (h_L > 0).sum()
                h_U, h_L = F.relu(h_U), F.relu(h_L)
            elif _is_flatten(m):
                h_U, h_L = h_U.reshape(h_U.shape[0], -1), h_L.reshape(h_L.shape[0], -1)
            else:
                h_U, h_L = self._affine_interval(m, norm, h_U, h_L, eps, C if last else None)
                norm = math.inf
        return h_U, h_L, tight, unstable, dead, alive

    @staticmethod
    def _affine_interval(m, norm, h_U, h_L, eps, C):
        w, b = m.weight, m.bias
        conv = isinstance(m, nn.Conv2d)
        if C is not None:            # fold the specification into the last linear layer
            w, b = C.matmul(w), C.matmul(b)
        if norm == math.inf:
            mid, rad = (h_U + h_L) / 2, (h_U - h_L) / 2
            if conv:
                center = F.conv2d(mid, w, b, m.stride, m.padding, m.dilation, m.groups)
                dev = F.conv2d(rad, w.abs(), None, m.stride, m.padding, m.dilation, m.groups)
            elif C is not None:
                center = w.matmul(mid.unsqueeze(-1)).squeeze(-1) + b
                dev = w.abs().matmul(rad.unsqueeze(-1)).squeeze(-1)
            else:
                center, dev = torch.addmm(b, mid, w.t()), rad.matmul(w.abs().t())
        else:                        # L2 ball around h_U = h_L = x, only before the first affine layer
            if conv:
                center = F.conv2d(h_U, w, b, m.stride, m.padding, m.dilation, m.groups)
                dev = (w * w).sum((1, 2, 3)).sqrt().mul(eps).view(1, -1, 1, 1)
            else:
                center = (w.matmul(h_U.unsqueeze(-1)).squeeze(-1) + b) if C is not None else torch.addmm(b, h_U, w.t())
                dev = w.norm(2, -1) * eps
        return center + dev, center - dev

    # ------------------------------------------------------------------------------------------ CROWN
    def _relu_slopes(self, i: int):
        lo, up = self.relu_bounds[i]
        lb_r = lo.clamp(max=0)
        ub_r = torch.max(up.clamp(min=0), lb_r + 1e-8)
        d_up = ub_r / (ub_r - lb_r)
        b_up = -lb_r * d_up
        d_up = d_up.unsqueeze(1)
        if self.opts.get("same-slope", False):
            d_lo = d_up
        elif self.opts.get("zero-lb", False):
            d_lo = (d_up >= 1.0).to(d_up.dtype)
        elif self.opts.get("one-lb", False):
            d_lo = (d_up > 0.0).to(d_up.dtype)
        else:
            d_lo = (d_up > 0.5).to(d_up.dtype)
        return d_up, b_up, d_lo

    def _layer_backward(self, i: int, A: Tensor, upper: bool):
        """(A for the layer's input, bias term) for one side (``upper``) of the bound of ``A h_i``."""
        m = self.layers[i]
        if isinstance(m, nn.ReLU):
            d_up, b_up, d_lo = self._relu_slopes(i)
            pos, neg = A.clamp(min=0), A.clamp(max=0)
            if upper:
                return d_up * pos + d_lo * neg, pos.reshape(A.shape[0], A.shape[1], -1).matmul(
                    b_up.reshape(b_up.shape[0], -1, 1)).squeeze(-1)
            return d_up * neg + d_lo * pos, neg.reshape(A.shape[0], A.shape[1], -1).matmul(
                b_up.reshape(b_up.shape[0], -1, 1)).squeeze(-1)
        if _is_flatten(m):
            return A.reshape(A.shape[0], A.shape[1], *self.shapes[i][0]), 0
        if isinstance(m, nn.Linear):
            return A.matmul(m.weight), A.matmul(m.bias)
        (cin, hin, win), (cout, hout, wout) = self.shapes[i]
        k = m.weight.shape[2:]
        opad = tuple(size - (osz - 1) * s + 2 * p - kk for size, osz, s, p, kk in
                     zip((hin, win), (hout, wout), m.stride, m.padding, k))
        flat = A.reshape(A.shape[0] * A.shape[1], *A.shape[2:])
        out = F.conv_transpose2d(flat, m.weight, None, m.stride, m.padding, opad, m.groups, m.dilation)
        return out.reshape(A.shape[0], A.shape[1], *out.shape[1:]), (A.sum((3, 4)) * m.bias).sum(2)

    def backward_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, upper=False, lower=True,
                       layers: int | None = None, first: int = 0):
        """CROWN bounds of ``C h`` where h is the output of the first ``layers`` layers (default: all), through
        the layers from ``first`` on, concretised over the IBP box of layer ``first``'s input (Loss Landscape
        Matters' ``backward_range_frozen``; the input box for 0). Loss Landscape Matters' decomposition of the
        lower side is kept in ``self.lower`` (``A``, ``A_x``, ``A_norm``, ``relu_b``, ``layer_b``)."""
        stop = len(self.layers) if layers is None else layers
        lo_box, up_box = (x_L, x_U) if first == 0 else self.layer_inputs[first]
        out = {}
        self.lower = None
        for side, want in ((True, upper), (False, lower)):
            if not want:
                continue
            A, relu_b, layer_b = C, x_U.new_zeros([1]), x_U.new_zeros([1])
            for i in reversed(range(first, stop)):
                A, b = self._layer_backward(i, A, side)
                if isinstance(self.layers[i], nn.ReLU):
                    relu_b = b + relu_b
                else:
                    layer_b = b + layer_b
            A_in = A
            A = A.reshape(A.shape[0], A.shape[1], -1)
            sign = 1.0 if side else -1.0
            if norm == math.inf:
                mid = ((up_box + lo_box) / 2).reshape(up_box.shape[0], -1, 1)
                rad = ((up_box - lo_box) / 2).reshape(up_box.shape[0], -1, 1)
                a_x, a_norm = A.bmm(mid), sign * A.abs().bmm(rad)
                val = a_x + a_norm
            else:
                a_x = A.bmm(x_U.reshape(x_U.shape[0], -1, 1))
                a_norm = sign * A.norm(2, -1).unsqueeze(-1) * eps
                val = a_x + a_norm
            total = relu_b + layer_b
            out[side] = (val.squeeze(-1) + total, total)
            if not side:
                self.lower = {"A": A_in, "A_x": a_x, "A_norm": a_norm, "relu_b": relu_b, "layer_b": layer_b}
        ub, ub_sum = out.get(True, (x_U.new_tensor([math.inf]), x_U.new_zeros([1])))
        lb, lb_sum = out.get(False, (x_L.new_tensor([-math.inf]), x_L.new_zeros([1])))
        return ub, ub_sum, lb, lb_sum

    def full_backward_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, upper=True, lower=True):
        first = next(i for i, m in enumerate(self.layers) if isinstance(m, nn.ReLU))
        h_U, h_L, n = x_U, x_L, norm
        for i in range(first):
            m = self.layers[i]
            if _is_flatten(m):
                h_U, h_L = h_U.reshape(h_U.shape[0], -1), h_L.reshape(h_L.shape[0], -1)
            else:
                h_U, h_L = self._affine_interval(m, n, h_U, h_L, eps, None)
                n = math.inf
        self.relu_bounds[first] = (h_L, h_U)
        for i in range(first + 1, len(self.layers)):
            if not isinstance(self.layers[i], nn.ReLU):
                continue
            shape = self.shapes[i - 1][1]
            eye = torch.eye(math.prod(shape), dtype=x_U.dtype, device=x_U.device).reshape(1, -1, *shape)
            ub, _, lb, _ = self.backward_range(norm, x_U, x_L, eps, eye, upper=True, lower=True, layers=i)
            self.relu_bounds[i] = (lb.reshape(lb.shape[0], *shape), ub.reshape(ub.shape[0], *shape))
        return self.backward_range(norm, x_U, x_L, eps, C, upper=upper, lower=lower)
