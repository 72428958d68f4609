"""Pure-PyTorch ground truth for every robustkern op (same signatures, float64-capable), and hand-written
oracles of whole computations (``ibp_model``, ``crown.dense_crown``, ``attacks.plain_pgd``); ``published``:
transcriptions of published code, which tests and benchmarks compare robustkern against."""
from . import attacks, crown, flatness_ops, ibp_model, interval, macer, published, smoothing

__all__ = ["attacks", "crown", "flatness_ops", "ibp_model", "interval", "macer", "published", "smoothing"]
