"""Pure-PyTorch ground truth for every robustkern op (same signatures, float64-capable)."""
from . import interval

__all__ = ["interval"]
