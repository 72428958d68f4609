"""MACER's training loop and hard / soft randomized smoothing on robustkern (Zhai, Dan, He, Zhang, Gong,
Hopcroft, Lu, Wang, ICLR 2020, "MACER: Attack-free and Scalable Robust Training via Maximizing Certified
Radius"; RuntianZ/macer ``macer.py``, ``rs/core.py``): its ``main.py`` runs with the imports changed to::

    from robustkern.compat.macer import macer_train     # was: from macer import macer_train
    from robustkern.compat.macer import Smooth          # was: from rs.core import Smooth

* ``macer_train(sigma, lbd, gauss_num, beta, gamma, num_classes, model, trainloader, optimizer, device)``: one
  epoch, ``robustkern.smoothing.macer_train`` (the noise drawn as the original's ``randn_like``, so
  ``torch.manual_seed`` replays it); prints the original's line ``Classification Loss: ...  Robustness Loss:
  ...`` (``verbose=False`` turns it off) and returns None, as the original (robustkern's own ``macer_train``
  returns the two averages). It also calls ``model.train()`` first (the original's ``main.py`` does, before
  every epoch).
* ``Smooth(base_classifier, num_classes, sigma, device, mode='hard', beta=1.0)``: ``certify(x, n0, n, alpha,
  batch_size)`` and ``predict(x, n, batch_size)``. ``mode="hard"``: Cohen et al.'s votes of the argmax and the
  Clopper-Pearson lower bound. ``mode="soft"``: the votes are the softmax of ``beta * logits`` summed over the
  noisy samples, and p_A's lower bound is the empirical Bernstein bound ``S/N - sqrt(2 V t / N) - 7 t / (3
  (N - 1))`` with ``t = log(2 / alpha)`` and ``V`` the sample variance of class c_A's softmax output (from its
  sum S and its sum of squares, kept in ``square_sum``); radius ``sigma Phi^-1(p_A)``, ``ABSTAIN`` below
  1/2. ``mode="both"``: one set of samples gives both, ``certify`` returns ``(c_hard, r_hard, c_soft,
  r_soft)`` and ``predict`` ``(c_hard, c_soft)``. The top class is the original's ``argsort()[::-1][0]`` of the
  votes (among equal votes the highest class index). The per-batch sums are taken in the model's precision and
  accumulated in float64, as the original.
  Options of ``robustkern.smoothing.Smooth`` are keyword arguments; ``rng="torch"`` draws the noise as the
  original (``torch.randn_like`` batch by batch: the same votes given the same seed); the default
  ``rng="philox"`` uses robustkern's counter-based noise (``seed``, ``index`` keywords of ``certify`` and
  ``predict``). A model whose forward needs NCHW memory (MACER's ``LeNet``: ``x.view(-1, 4*4*50)``) runs as it is.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.smoothing import STREAM_ESTIMATION, STREAM_PREDICT, STREAM_SELECTION, smoothing_count, smoothing_noise
from ..smoothing import Smooth as _Smooth
from ..smoothing import macer_train as _macer_train
from ..smoothing import statistics

__all__ = ["macer_train", "Smooth"]

_MODES = ("hard", "soft", "both")


def macer_train(sigma, lbd, gauss_num, beta, gamma, num_classes, model, trainloader, optimizer, device, *,
                verbose: bool = True) -> None:
    """One epoch of MACER with the original's arguments (module docstring)."""
    cl, rl = _macer_train(sigma, lbd, gauss_num, beta, gamma, num_classes, model, trainloader, optimizer, device)
    if verbose:
        print("Classification Loss: {}  Robustness Loss: {}".format(cl, rl))


class Smooth(_Smooth):
    """MACER's ``rs.core.Smooth`` (module docstring)."""

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float, device=None,
                 mode: str = "hard", beta: float = 1.0, **options):
        if mode not in _MODES:
            raise ValueError(f"Smooth: mode must be one of {_MODES}, got {mode!r}")
        if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
            raise ValueError(f"Smooth: beta must be a finite number > 0, got {beta!r}")
        super().__init__(base_classifier, num_classes, sigma, **options)
        self.device, self.mode, self.beta = device, mode, float(beta)
        self.square_sum: Optional[np.ndarray] = None
        self.ss = 0.0

    # ------------------------------------------------------------------------------------------ MACER's API
    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int, *, seed: Optional[int] = None,
                index: int = 0):
        statistics._check_alpha(alpha)
        seed = self._seed(seed)
        chosen = self._predict(x, n0, batch_size, seed, index, STREAM_SELECTION)
        observed = self._sample_noise(x, n, batch_size, seed=seed, index=index, stream=STREAM_ESTIMATION)
        if self.mode != "both":
            chosen, observed = (chosen,), (observed,)
        out = []
        for mode, c, votes in zip(("hard", "soft") if self.mode == "both" else (self.mode,), chosen, observed):
            if mode == "soft":
                self.ss = float(self.square_sum[c])
            p_a = self._lower_confidence_bound(float(votes[c]), n, alpha, mode)
            out += [Smooth.ABSTAIN, 0.0] if p_a < 0.5 else [c, float(statistics.radius(p_a, self.sigma))]
        return tuple(out)

    def predict(self, x: Tensor, n: int, batch_size: int, *, seed: Optional[int] = None, index: int = 0):
        """The top class of ``n`` noisy samples (no abstention), ``(hard, soft)`` in mode "both"."""
        return self._predict(x, n, batch_size, self._seed(seed), index, STREAM_PREDICT)

    def _predict(self, x, n, batch_size, seed, index, stream):
        votes = self._sample_noise(x, n, batch_size, seed=seed, index=index, stream=stream)
        if self.mode == "both":
            return _top(votes[0]), _top(votes[1])
        return _top(votes)

    def _sample_noise(self, x: Tensor, num: int, batch_size: int, *, seed: Optional[int] = None, index: int = 0,
                      stream: int = STREAM_ESTIMATION):
        """Votes of ``num`` noisy copies of ``x``: hard counts (int64), soft sums (float64) or both; the soft
        sums of squares go to ``square_sum``."""
        self._check_image(x, batched=False)
        num = int(num)
        batch_size = int(batch_size)
        if num < 1 or batch_size < 1:
            raise ValueError(f"num and batch_size must be >= 1, got {num}, {batch_size}")
        hard = np.zeros(self.num_classes, dtype=np.int64)
        soft = np.zeros(self.num_classes, dtype=np.float64)
        self.square_sum = np.zeros(self.num_classes, dtype=np.float64)
        self.base_classifier.eval()
        seed = self._seed(seed) if self.rng == "philox" else None
        with torch.inference_mode():
            self._sync_copies()
            for lo in range(0, num, batch_size):
                size = min(batch_size, num - lo)
                logits = self._forward(self._noisy(x, lo, size, seed, index, stream)) * self.beta
                if self.mode != "soft":
                    group = torch.zeros(size, dtype=torch.int64, device=logits.device)
                    hard += smoothing_count(logits, group, 1)[0].cpu().numpy()
                if self.mode != "hard":
                    p = F.softmax(logits, 1)
                    soft += p.sum(0).cpu().numpy()
                    self.square_sum += (p * p).sum(0).cpu().numpy()
        return {"hard": hard, "soft": soft, "both": (hard, soft)}[self.mode]

    def _noisy(self, x: Tensor, lo: int, size: int, seed, index: int, stream: int) -> Tensor:
        if self.rng == "torch":
            batch = x.repeat((size,) + (1,) * x.dim())
            return (batch + torch.randn_like(batch) * self.sigma).to(self.dtype)
        xf = x.detach().float().unsqueeze(0).contiguous()
        if self._use_channels_last(xf):
            xf = xf.contiguous(memory_format=torch.channels_last)
        src = torch.zeros(size, dtype=torch.int64, device=x.device)
        counter = torch.stack([src + int(index), torch.arange(lo, lo + size, device=x.device),
                               src + int(stream)], 1)
        return smoothing_noise(xf, src, counter, seed, self.sigma, out_dtype=self.dtype)

    def _seed(self, seed):
        if self.rng != "philox":
            return None
        return int(torch.randint(0, 2 ** 62, (1,)).item()) if seed is None else int(seed)

    def _lower_confidence_bound(self, NA, N, alpha: float, mode) -> float:  # noqa: N803 - the original's names
        """Clopper-Pearson (hard) or the empirical Bernstein bound with ``self.ss`` (soft; module docstring)."""
        if mode == "hard":
            return statistics.lower_confidence_bound(int(NA), int(N), alpha)
        variance = max((self.ss - NA * NA / N) / (N - 1), 0.0) if N > 1 else 0.0
        t = math.log(2 / alpha)
        return NA / N - math.sqrt(2 * variance * t / N) - 7 * t / 3 / max(N - 1, 1)


def _top(votes: np.ndarray) -> int:
    """The original's ``votes.argsort()[::-1][0]``."""
    return int(votes.argsort()[::-1][0])
