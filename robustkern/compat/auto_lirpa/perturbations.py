"""auto_LiRPA's perturbation specifications (``auto_LiRPA.perturbations``).

``from robustkern.compat.auto_lirpa.perturbations import *`` gives what auto_LiRPA's star import gives scripts:
the perturbation classes, and ``np``, ``torch``, ``math`` and ``logger`` (its module imports them, and scripts
such as ``examples/vision/simple_training.py`` use ``np.inf`` and ``torch`` from that import alone).

Supported: ``PerturbationLpNorm`` with ``norm`` inf or 2. L-inf with ``x_L``/``x_U`` is the element-wise box
``[x_L, x_U]`` (auto_LiRPA's convention for clipped, normalised inputs; then ``eps`` holds the box
half-width, as in auto_LiRPA); L-inf without them is ``[x - eps, x + eps]`` (unclipped); L2 is the ball
``||x' - x||_2 <= eps`` (unclipped; ``x_L``/``x_U`` do not enter its bounds, as in auto_LiRPA). Other norms,
L0, synonym and linear perturbations and linear constraints raise ``NotImplementedError`` when created.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .utils import logger

__all__ = ["Perturbation", "PerturbationLpNorm", "PerturbationL0Norm", "PerturbationSynonym", "PerturbationLinear",
           "np", "torch", "math", "logger"]


class Perturbation:
    """Base class of the perturbation specifications."""

    def set_eps(self, eps):
        self.eps = eps


class PerturbationLpNorm(Perturbation):
    """An L-p perturbation: ``norm`` inf or 2, radius ``eps``; for L-inf, ``x_L``/``x_U`` give an explicit
    element-wise box (its half-width becomes ``eps``)."""

    def __init__(self, eps=0.0, norm=np.inf, x_L=None, x_U=None, eps_min=0.0, constraints=None, **kwargs):
        p = float(norm)
        if p not in (math.inf, 2.0):
            raise NotImplementedError(f"PerturbationLpNorm: norm must be inf or 2 in robustkern, got {norm}")
        if (x_L is None) != (x_U is None):
            raise ValueError("PerturbationLpNorm: give both x_L and x_U or neither")
        if constraints is not None:
            raise NotImplementedError("PerturbationLpNorm: linear input constraints are not supported by robustkern; "
                                      "bound the box [x_L, x_U] without them")
        self.eps, self.norm, self.x_L, self.x_U, self.eps_min = eps, norm, x_L, x_U, eps_min
        self.x0 = None
        if p == math.inf and x_L is not None:
            self.eps = (x_U - x_L) / 2
            self.x0 = (x_U + x_L) / 2

    def __repr__(self) -> str:
        if self.x_L is None:
            return f"PerturbationLpNorm(norm={self.norm}, eps={self.eps})"
        return f"PerturbationLpNorm(norm={self.norm}, box [x_L, x_U] of shape {tuple(self.x_L.shape)})"


class PerturbationL0Norm(Perturbation):
    """auto_LiRPA's L0 perturbation: not supported."""

    def __init__(self, eps=None, x_L=None, x_U=None, ratio=1.0, **kwargs):
        raise NotImplementedError("PerturbationL0Norm: L0 perturbations are not supported by robustkern; "
                                  "use PerturbationLpNorm(norm=np.inf or 2)")


class PerturbationSynonym(Perturbation):
    """auto_LiRPA's word-substitution perturbation: not supported."""

    def __init__(self, budget=None, eps=1.0, use_simple=False, **kwargs):
        raise NotImplementedError("PerturbationSynonym: word substitutions are not supported by robustkern; "
                                  "use auto_LiRPA itself for language models")


class PerturbationLinear(Perturbation):
    """auto_LiRPA's linear-map perturbation: not supported."""

    def __init__(self, *args, **kwargs):
        raise NotImplementedError("PerturbationLinear: linear input maps are not supported by robustkern; "
                                  "use PerturbationLpNorm with the box [x_L, x_U] they imply")
