"""Pure-PyTorch ground truth for every robustkern op (same signatures, float64-capable), and faithful
transcriptions of the published algorithms the library's losses are tested against."""
from . import attacks, crown, flatness, flatness_ops, ibp_model, interval, macer, smooth_train, smoothing

__all__ = ["attacks", "crown", "flatness", "flatness_ops", "ibp_model", "interval", "macer", "smooth_train",
           "smoothing"]
