"""Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): ``Smooth`` (a drop-in for Cohen's ``core.Smooth``
with batched, counter-based-noise certification), ``certify_batch``, exact ``statistics`` and the dataset
``runner`` (Cohen's TSV, resume, torchrun sharding)."""
from . import statistics
from .core import Smooth, certify_batch

__all__ = ["Smooth", "certify_batch", "statistics", "runner"]


def __getattr__(name):  # lazy: the runner imports torch.distributed and tqdm
    if name == "runner":
        import importlib

        return importlib.import_module(".runner", __name__)
    raise AttributeError(f"module 'robustkern.smoothing' has no attribute {name!r}")
