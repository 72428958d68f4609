"""Bound propagation: ``BoundedModule`` (IBP, CROWN-IBP, CROWN), specifications, losses and verification."""
from ..graph import UnsupportedLayerError
from .loss_fusion import fused_robust_ce_upper
from .module import BoundedModule
from .spec import margin_spec, robust_cross_entropy
from .training import crown_ibp_beta, crown_ibp_loss, linear_eps, smoothed_eps, verified_accuracy

__all__ = ["BoundedModule", "UnsupportedLayerError", "margin_spec", "robust_cross_entropy", "crown_ibp_loss",
           "crown_ibp_beta", "smoothed_eps", "linear_eps", "verified_accuracy", "fused_robust_ce_upper"]
