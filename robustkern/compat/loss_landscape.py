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
  layers' biases' parts of the constant), all four detached on the CPU, and ``lower_d_list`` (empty);
  ``upper_sum_b``/``lower_sum_b`` are returned detached.
* ``backward_range_frozen(..., frozen=k)``: the backward pass through the last ``k + 1`` layers only,
  concretised over the IBP box of the input of the first of them.

Not available: the optimised lower slopes of the paper (``bound_opts`` ``ours``, ``binary``, ``uniform`` and
the ``lower_d_list2`` argument) raise ``NotImplementedError``; they are planned for robustkern's optimised-slope
relaxations.
"""
from __future__ import annotations

import math

from torch import Tensor

from .crown_ibp import (BoundConv2d, BoundDataParallel, BoundFlatten, BoundLinear, BoundReLU, _convert, _returned,
                        check_bound_opts)
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

    @staticmethod
    def convert(sequential_model, bound_opts=None) -> "BoundSequential":
        model = _convert(BoundSequential, sequential_model, check_bound_opts(bound_opts))
        model.bound_opts = dict(bound_opts or {})
        return model

    def define_bound_opts(self, bound_opts=None) -> None:
        self.bound_opts = check_bound_opts(bound_opts)

    def convert_bounds(self, bound_opt_eval=None) -> None:
        for layer in self:
            layer.convert_eval(bound_opt_eval)
        self.bound_opts = check_bound_opts(bound_opt_eval)

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
        _no_slopes(lower_d_list2)
        sides = self._backward(norm, x_U, x_L, eps, C, upper, lower, self._prefix(modules))
        return self._keep(sides, x_U, x_L)

    def backward_range_frozen(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, lower_d_list2=(),
                              upper=False, lower=True, modules=None, frozen=5):
        """The backward pass through the last ``frozen + 1`` layers, concretised over the IBP box at the input
        of the first of them (the input box when that is the first layer)."""
        _no_slopes(lower_d_list2)
        stop = self._prefix(modules)
        at = max(stop - int(frozen) - 1, 0)
        sides = self._backward(norm, x_U, x_L, eps, C, upper, lower, stop, concretize_at=at)
        return self._keep(sides, x_U, x_L, at)

    def _keep(self, sides: dict, x_U: Tensor, x_L: Tensor, at: int = 0):
        self.lower_d_list = []
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


def _no_slopes(lower_d_list2) -> None:
    if lower_d_list2 is not None and len(lower_d_list2):
        raise NotImplementedError("lower_d_list2: Loss Landscape Matters' optimised lower slopes are not available "
                                  "in robustkern yet (planned)")
