"""Randomized smoothing (Cohen, Rosenfeld, Kolter 2019): ``Smooth`` (a drop-in for Cohen's ``core.Smooth``
with batched, counter-based-noise certification), ``certify_batch``, exact ``statistics`` and the dataset
``runner`` (Cohen's TSV, resume, torchrun sharding), and the smoothing-based training losses."""
from . import statistics
from .adversarial import consistency_loss, smoothadv_attack, smoothadv_loss, smoothadv_warmup_eps, trades_rs_loss
from .augment import gaussian_augment
from .core import Smooth, certify_batch
from .macer import macer_loss, macer_train

__all__ = ["Smooth", "certify_batch", "statistics", "runner",
           # training: Gaussian augmentation (Cohen 2019), MACER (Zhai 2020), SmoothAdv (Salman 2019),
           # TRADES+RS (Blum 2020), consistency regularisation (Jeong & Shin 2020)
           "gaussian_augment", "macer_loss", "macer_train", "smoothadv_attack", "smoothadv_loss",
           "smoothadv_warmup_eps", "trades_rs_loss", "consistency_loss"]


def __getattr__(name):  # lazy: the runner imports torch.distributed and tqdm
    if name == "runner":
        import importlib

        return importlib.import_module(".runner", __name__)
    raise AttributeError(f"module 'robustkern.smoothing' has no attribute {name!r}")
