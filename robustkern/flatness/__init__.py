"""Flatness regularisers: input-gradient norms, LFR, GradAlign, F-GR.

* ``input_grad_norm(model, x, y, p, method, h, backend)``: per-example ``||grad_x CE||_p`` by double backprop or
  finite differences (Drucker & LeCun; Ross & Doshi-Velez 2018; Finlay & Oberman 2019)
  (``robustkern.flatness.grad_norm``)
* ``lfr_loss``, ``lfr_perturb``: local flatness regularisation (Xu et al., ICIP 2020) (``robustkern.flatness.lfr``)
* ``gradalign_penalty`` (Andriushchenko & Flammarion 2020) and ``fgr_penalty``, the finite-difference gradient
  regulariser of the weights (Karakida et al. 2023) (``robustkern.flatness.gradalign``)
* ``fused`` (imported lazily): the second-order path built from robustkern ops that the functions above use when
  it supports the model (``backend="auto"``).
"""
from .grad_norm import input_grad_norm
from .gradalign import fgr_penalty, gradalign_penalty
from .lfr import lfr_loss, lfr_perturb

__all__ = ["input_grad_norm", "lfr_loss", "lfr_perturb", "gradalign_penalty", "fgr_penalty", "fused"]


def __getattr__(name):
    if name == "fused":
        import importlib

        return importlib.import_module(".fused", __name__)
    raise AttributeError(f"module 'robustkern.flatness' has no attribute {name!r}")
