"""Bound propagation: ``BoundedModule`` (IBP; CROWN-IBP and CROWN to come), specifications and losses."""
from .graph import UnsupportedLayerError
from .module import BoundedModule
from .spec import margin_spec, robust_cross_entropy

__all__ = ["BoundedModule", "UnsupportedLayerError", "margin_spec", "robust_cross_entropy"]
