"""Pure-PyTorch ground truth for every robustkern op (same signatures, float64-capable)."""
from . import attacks, interval, smoothing

__all__ = ["attacks", "interval", "smoothing"]
