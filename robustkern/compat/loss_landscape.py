"""Loss Landscape Matters' ``bound_layers`` on robustkern (Lee, Lee, Park, NeurIPS 2021, "Towards Better
Understanding of Training Certifiably Robust Models against Adversarial Examples"; sungyoon-lee/
LossLandscapeMatters ``bound_layers.py``, CROWN-IBP's file extended): its ``train.py`` runs with the import of
``bound_layers`` changed to::

    from robustkern.compat.loss_landscape import BoundSequential, BoundLinear, BoundConv2d, BoundDataParallel

Everything of ``robustkern.compat.crown_ibp`` (same numbers, same differences), plus what this version adds:

* ``define_bound_opts(opts)`` and ``convert_bounds(opts)`` (the latter also sets every layer's options, via
  each layer's ``convert_eval``); ``model.bound_opts``.
* After ``interval_range`` every layer keeps its input's bounds as ``lower_l`` / ``upper_u``.
* After ``backward_range`` (and ``backward_range_frozen``) the model keeps the lower side's decomposition, as
  the original: ``lower_A`` (the coefficients of the input, with gradient), ``A_x`` (``A mid``) and ``A_norm``
  (``-|A| rad``), both (B, S, 1), ``ReLU_lower_b`` and ``not_ReLU_lower_b`` (the ReLU intercepts' and the
  layers' biases' parts of the constant), all four detached on the CPU, and ``lower_d_list``;
  ``upper_sum_b``/``lower_sum_b`` are returned detached.
* ``backward_range_frozen(..., frozen=k)``: the backward pass through the last ``k + 1`` layers only,
  concretised over the IBP box of the input of the first of them.
* The paper's lower slopes, per ReLU layer, after same-slope, zero-lb and one-lb in the original's order:
  ``ours`` draws each backward pass's slopes uniform in [0, 1) (``torch.rand_like`` of a (B, 1, *input shape)
  tensor, the ReLUs in backward order, as the original), sets them to 1 where ``l > 0`` and 0 where ``u < 0``,
  makes them leaves that require grad and keeps them in ``lower_d_list`` (backward order; reset by every
  backward pass), so ``torch.autograd.grad(loss, model.lower_d_list)`` is the original's slope gradient;
  with ``lower_d_list2`` (that list, stepped: ``Train_calloss_ours``) the ``ours`` layers take those slopes
  instead and ``lower_d_list`` stays empty. ``binary`` (0 or 1, ``torch.randint_like``) and ``uniform`` draw
  fresh slopes that are not kept. The slopes of one pass serve both sides. A step is
  ``robustkern.ops.crown_relu_backward_slopes``, which clamps the slopes to [0, 1] and sets stable neurons to
  1 (``l >= 0``) and 0 (``u <= 0``) itself.

What differs from the original: the tensors in ``lower_d_list2`` are not modified (the original sets their
stable entries to 1 and 0 in place); a neuron whose bounds touch 0 (``l = 0`` or ``u = 0`` exactly) takes slope
1 or 0 (the exact line there), where the original keeps the drawn or given slope (also a valid, looser one); a list shorter than the ``ours`` layers of the pass is a ``ValueError``;
the layers keep no ``lower_d`` attribute.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from .crown_ibp import (SLOPE_OPTS, BoundConv2d, BoundDataParallel, BoundFlatten, BoundLinear, BoundReLU, _convert,
                        _returned, check_bound_opts)
from .crown_ibp import BoundSequential as _CrownIbpSequential

__all__ = ["BoundSequential", "BoundLinear", "BoundConv2d", "BoundReLU", "BoundFlatten", "BoundDataParallel"]

class BoundSequential(_CrownIbpSequential):
    """Loss Landscape Matters' ``BoundSequential`` (module docstring)."""

    _TRANSIENT = {**_CrownIbpSequential._TRANSIENT, "lower_A": lambda: None, "A_x": lambda: None,
                  "A_norm": lambda: None}

    def __init__(self, *args):
        super().__init__(*args)
        self.bound_opts: dict = {}
        self.lower_d_list: list = []
        self._given_slopes: list | None = None

    @staticmethod
    def convert(sequential_model, bound_opts=None) -> "BoundSequential":
        model = _convert(BoundSequential, sequential_model, check_bound_opts(bound_opts, slopes=True))
        model.bound_opts = dict(bound_opts or {})
        return model

    def define_bound_opts(self, bound_opts=None) -> None:
        self.bound_opts = check_bound_opts(bound_opts, slopes=True)

    def convert_bounds(self, bound_opt_eval=None) -> None:
        for layer in self:
            layer.convert_eval(bound_opt_eval)
        self.bound_opts = check_bound_opts(bound_opt_eval, slopes=True)

    def __call__(self, *input, **kwargs):
        if kwargs.get("method_opt") == "backward_range_frozen":
            kwargs.pop("method_opt")
            kwargs.pop("disable_multi_gpu", None)
            return self.backward_range_frozen(*input, **kwargs)
        return super().__call__(*input, **kwargs)

    def interval_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None):
        out = super().interval_range(norm, x_U, x_L, eps, C)
        for i, layer in enumerate(self):
            lo, up = self._ibp_box(i)
            vars(layer).update(lower_l=lo, upper_u=up)
        return out

    def backward_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, lower_d_list2=(), upper=False,
                       lower=True, modules=None):
        with self._slopes_given(lower_d_list2):
            sides = self._backward(norm, x_U, x_L, eps, C, upper, lower, self._prefix(modules))
        return self._keep(sides, x_U, x_L)

    def backward_range_frozen(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, lower_d_list2=(),
                              upper=False, lower=True, modules=None, frozen=5):
        """The backward pass through the last ``frozen + 1`` layers, concretised over the IBP box at the input
        of the first of them (the input box when that is the first layer)."""
        stop = self._prefix(modules)
        at = max(stop - int(frozen) - 1, 0)
        with self._slopes_given(lower_d_list2):
            sides = self._backward(norm, x_U, x_L, eps, C, upper, lower, stop, concretize_at=at)
        return self._keep(sides, x_U, x_L, at)

    @contextmanager
    def _slopes_given(self, lower_d_list2):
        self._given_slopes = list(lower_d_list2) if lower_d_list2 is not None and len(lower_d_list2) else None
        self.lower_d_list = []
        try:
            yield
        finally:
            self._given_slopes = None

    def _relu_slopes(self, start: int, stop: int, x_U: Tensor) -> dict:
        """The slopes of the ``ours``/``binary``/``uniform`` ReLUs in layers ``[start, stop)`` for one backward
        pass (module docstring); ``lower_d_list`` is set here."""
        given, out, drawn, j = self._given_slopes, {}, [], 0
        for i in reversed(range(start, stop)):
            m = self[i]
            kind = _slope_kind(m.bound_opts) if isinstance(m, BoundReLU) else None
            if kind is None:
                continue
            if i not in self._relu_bounds:
                raise RuntimeError("backward_range: no ReLU bounds yet; call interval_range (or "
                                   "full_backward_range) first")
            lo, up = (t.unsqueeze(1) for t in self._relu_bounds[i])
            if kind == "ours" and given is not None:
                if j >= len(given):
                    raise ValueError(f"lower_d_list2 has {len(given)} slope tensors; the pass needs one per 'ours' "
                                     f"ReLU layer (more than {len(given)})")
                d = given[j]
                j += 1
                if not isinstance(d, Tensor) or d.numel() != lo.numel():
                    raise ValueError(f"lower_d_list2[{j - 1}] must be a tensor of shape {tuple(lo.shape)}")
                out[i] = d
                continue
            d = torch.randint_like(lo, 0, 2) if kind == "binary" else torch.rand_like(lo)
            with torch.no_grad():
                d[lo > 0] = 1
                d[up < 0] = 0
            if kind == "ours":
                drawn.append(d.requires_grad_(True))
            out[i] = d
        if given is None:
            self.lower_d_list = drawn
        return out

    def _keep(self, sides: dict, x_U: Tensor, x_L: Tensor, at: int = 0):
        lo = sides.get(False)
        zero = x_U.new_zeros((1,))
        if lo is None:
            self.ReLU_lower_b = self.not_ReLU_lower_b = zero.detach().cpu()
            self.A_x = self.A_norm = self.lower_A = None
        else:
            self.ReLU_lower_b = lo.relu_bias.detach().cpu()
            self.not_ReLU_lower_b = lo.layer_bias.detach().cpu()
            self.lower_A = lo.A
            box_lo, box_up = self._ibp_box(at) if at else (x_L, x_U)
            B = box_lo.shape[0]
            A = lo.A.detach().reshape(lo.A.shape[0], lo.A.shape[1], -1).expand(B, -1, -1)
            mid = ((box_up + box_lo) / 2).detach().reshape(B, -1, 1)
            rad = ((box_up - box_lo) / 2).detach().reshape(B, -1, 1)
            self.A_x = A.bmm(mid).cpu()
            self.A_norm = -A.abs().bmm(rad).cpu()
        ub, ub_sum, lb, lb_sum = _returned(sides, x_U)
        return ub, ub_sum.detach(), lb, lb_sum.detach()


def _slope_kind(bound_opts) -> str | None:
    """"ours", "binary", "uniform" or None (a fixed rule) for a layer's ``bound_opts``, in the original's order
    (same-slope, zero-lb and one-lb come first)."""
    opts = bound_opts or {}
    if any(opts.get(k, False) for k in ("same-slope", "zero-lb", "one-lb")):
        return None
    return next((k for k in SLOPE_OPTS if opts.get(k, False)), None)
