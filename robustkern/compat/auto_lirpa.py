"""A drop-in subset of auto_LiRPA's API on robustkern's bound propagation.

    from robustkern.compat.auto_lirpa import BoundedModule, BoundedTensor, PerturbationLpNorm
    lirpa_model = BoundedModule(model, dummy_input)
    ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=x_L, x_U=x_U)
    lb, ub = lirpa_model.compute_bounds(x=(BoundedTensor(x, ptb),), C=C, method="CROWN-IBP")

Method names as auto_LiRPA's, case-insensitive: "IBP"; "CROWN-IBP" / "IBP+backward" / "ibp+crown";
"CROWN" / "backward"; ``method=None`` with ``IBP=True`` is IBP, and ``IBP=True`` with "backward"/"CROWN"
uses IBP intermediate bounds (= CROWN-IBP), as in auto_LiRPA. ``bound_lower``/``bound_upper`` select the
sides; the other is returned as None.

Perturbations: L-inf with ``x_L``/``x_U`` is the element-wise box ``[x_L, x_U]`` (auto_LiRPA's convention for
clipped, normalised inputs); L-inf without them is ``[x - eps, x + eps]`` (unclipped, as auto_LiRPA); L2 is the
ball ``||x' - x||_2 <= eps`` (unclipped).

``bound_opts`` keys understood: ``activation_bound_option`` ("adaptive", "same-slope", "zero-lb", "one-lb"),
``crown_batch_size``, and robustkern's own ``sound`` (default False: auto_LiRPA's numbers, no rounding-error
widening; set True for certificates, see ``robustkern.bounds.crown``). Other keys (``conv_mode``,
``loss_fusion``, ...) are accepted and ignored. Not supported: alpha-CROWN, forward mode, ``return_A``,
``final_node_name``, ``interm_bounds``, perturbed parameters.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..bounds import BoundedModule as _RKBoundedModule

__all__ = ["BoundedModule", "BoundedTensor", "PerturbationLpNorm"]

_ACT = {"adaptive": "adaptive", "same-slope": "same-slope", "zero-lb": "zero", "one-lb": "one"}
_LIRPA_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "ibp+backward": "CROWN-IBP", "ibp+crown": "CROWN-IBP",
                  "crown": "CROWN", "backward": "CROWN"}


class PerturbationLpNorm:
    """An L-p perturbation: ``norm`` inf or 2, radius ``eps``; for L-inf, ``x_L``/``x_U`` give an explicit
    element-wise box."""

    def __init__(self, eps=0.0, norm=math.inf, x_L=None, x_U=None, eps_min=0.0, **kwargs):
        norm = float(norm)
        if norm not in (math.inf, 2.0):
            raise NotImplementedError(f"PerturbationLpNorm: norm must be inf or 2 in robustkern, got {norm}")
        if (x_L is None) != (x_U is None):
            raise ValueError("PerturbationLpNorm: give both x_L and x_U or neither")
        self.eps, self.norm, self.x_L, self.x_U, self.eps_min = eps, norm, x_L, x_U, eps_min

    def __repr__(self) -> str:
        return f"PerturbationLpNorm(norm={self.norm}, eps={self.eps}, box={'yes' if self.x_L is not None else 'no'})"


class BoundedTensor(Tensor):
    """A tensor carrying a perturbation ``ptb``."""

    @staticmethod
    def __new__(cls, x, ptb=None):
        t = Tensor._make_subclass(cls, x.detach() if not x.requires_grad else x, x.requires_grad)
        return t

    def __init__(self, x, ptb=None):
        self.ptb = ptb

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        # results are plain tensors: the perturbation belongs to this input only
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)


def _plain(x: Tensor) -> Tensor:
    return x.as_subclass(Tensor) if isinstance(x, BoundedTensor) else x


class BoundedModule(nn.Module):
    """auto_LiRPA's ``BoundedModule(model, global_input, bound_opts=None, device="auto")``: shares the model's
    parameters; ``bm(x)`` is the clean forward (and records training-mode BatchNorm statistics)."""

    def __init__(self, model: nn.Module, global_input, bound_opts: dict | None = None, device="auto",
                 verbose: bool = False, custom_ops=None, **kwargs):
        super().__init__()
        x = global_input[0] if isinstance(global_input, (tuple, list)) else global_input
        self.bound_opts = dict(bound_opts or {})
        act = self.bound_opts.get("activation_bound_option", "adaptive")
        if act not in _ACT:
            raise NotImplementedError(f"BoundedModule: activation_bound_option {act!r} is not supported; "
                                      f"use one of {sorted(_ACT)}")
        self._relu_lower = _ACT[act]
        self._sound = bool(self.bound_opts.get("sound", False))
        cbs = self.bound_opts.get("crown_batch_size", math.inf)
        self._crown_batch_size = None if cbs in (None, math.inf) else int(cbs)
        self.bm = _RKBoundedModule(model, _plain(x))
        self._last_x = None
        self._last_plain: Tensor | None = None

    def forward(self, *x, **kwargs):
        x0 = x[0] if len(x) == 1 and isinstance(x[0], (tuple, list)) else x
        inp = x0[0] if isinstance(x0, (tuple, list)) else x0
        return self.bm(self._clean(inp))

    def _clean(self, x: Tensor) -> Tensor:
        if x is self._last_x and self._last_plain is not None:
            return self._last_plain
        self._last_x, self._last_plain = x, _plain(x)
        return self._last_plain

    def compute_bounds(self, x=None, aux=None, C=None, method="backward", IBP=False, forward=False,
                       bound_lower=True, bound_upper=True, reuse_ibp=False, return_A=False, final_node_name=None,
                       **kwargs):
        if forward or return_A or final_node_name is not None or kwargs.get("interm_bounds") is not None:
            raise NotImplementedError("compute_bounds: forward mode, return_A, final_node_name and interm_bounds "
                                      "are not supported by robustkern's facade")
        if method is None:
            if not IBP:
                raise ValueError("compute_bounds: method=None needs IBP=True")
            name = "IBP"
        else:
            key = str(method).strip().lower()
            if key not in _LIRPA_METHODS:
                raise NotImplementedError(f"compute_bounds: method {method!r} is not supported by robustkern's "
                                          f"facade; supported: {sorted(_LIRPA_METHODS)}")
            name = _LIRPA_METHODS[key]
            if IBP and name == "CROWN":
                name = "CROWN-IBP"
        if x is None:
            if self._last_x is None:
                raise ValueError("compute_bounds: no input given and none recorded")
            x = self._last_x
        xt = x[0] if isinstance(x, (tuple, list)) else x
        ptb = getattr(xt, "ptb", None)
        if ptb is None:
            raise ValueError("compute_bounds: x must be a BoundedTensor with a PerturbationLpNorm")
        plain = self._clean(xt)
        opts = dict(method=name, C=C, sound=self._sound, bound_lower=bound_lower, bound_upper=bound_upper,
                    relu_lower=self._relu_lower, crown_batch_size=self._crown_batch_size)
        if ptb.norm == 2:
            return self.bm.compute_bounds(plain, ptb.eps, norm=2, x_min=-math.inf, x_max=math.inf, **opts)
        if ptb.x_L is not None:
            lo, hi = _plain(torch.as_tensor(ptb.x_L)), _plain(torch.as_tensor(ptb.x_U))
        else:
            eps = torch.as_tensor(ptb.eps, dtype=plain.dtype, device=plain.device)
            if eps.dim() == 1 and eps.shape[0] == plain.shape[0]:
                eps = eps.view(-1, *[1] * (plain.dim() - 1))
            lo, hi = plain - eps, plain + eps
        return self.bm.compute_bounds_box(lo.to(plain), hi.to(plain), x=plain, **opts)
