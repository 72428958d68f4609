"""Faithful copies of published certification loops: Cohen et al.'s ``core.Smooth`` (Cohen, Rosenfeld, Kolter
2019, "Certified Adversarial Robustness via Randomized Smoothing", github.com/locuslab/smoothing ``code/core.py``)
and the two-sided certification of TRADES + random smoothing (hongyanz/TRADES-smoothing ``code/core.py``): the
ground truth that ``robustkern.smoothing.Smooth`` and ``robustkern.compat.trades_smoothing`` are tested and
benchmarked against."""
from __future__ import annotations

import math
import numpy as np
import torch
from torch import Tensor

__all__ = ["CohenSmooth", "TradesSmoothReference"]


class CohenSmooth:
    """Cohen et al.'s ``core.Smooth``, line for line (CUDA hard-coding dropped, the removed
    ``scipy.stats.binom_test`` replaced by ``binomtest(...).pvalue``, statsmodels' ``proportion_confint(...,
    method="beta")`` by the equal Beta quantile). The ground truth that ``Smooth(rng="torch")`` must match."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float):
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = sigma

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int):
        from scipy.stats import norm

        self.base_classifier.eval()
        counts_selection = self._sample_noise(x, n0, batch_size)
        cAHat = counts_selection.argmax().item()
        counts_estimation = self._sample_noise(x, n, batch_size)
        nA = counts_estimation[cAHat].item()
        pABar = self._lower_confidence_bound(nA, n, alpha)
        if pABar < 0.5:
            return CohenSmooth.ABSTAIN, 0.0
        return cAHat, self.sigma * norm.ppf(pABar)

    def predict(self, x: Tensor, n: int, alpha: float, batch_size: int):
        from scipy.stats import binomtest

        self.base_classifier.eval()
        counts = self._sample_noise(x, n, batch_size)
        top2 = counts.argsort()[::-1][:2]
        count1 = counts[top2[0]]
        count2 = counts[top2[1]]
        if binomtest(int(count1), int(count1 + count2), p=0.5).pvalue > alpha:
            return CohenSmooth.ABSTAIN
        return top2[0]

    def _sample_noise(self, x: Tensor, num: int, batch_size: int) -> np.ndarray:
        with torch.no_grad():
            counts = np.zeros(self.num_classes, dtype=int)
            for _ in range(math.ceil(num / batch_size)):
                this_batch_size = min(batch_size, num)
                num -= this_batch_size
                batch = x.repeat((this_batch_size, 1, 1, 1))
                noise = torch.randn_like(batch, device=batch.device) * self.sigma
                predictions = self.base_classifier(batch + noise).argmax(1)
                counts += self._count_arr(predictions.cpu().numpy(), self.num_classes)
            return counts

    def _count_arr(self, arr: np.ndarray, length: int) -> np.ndarray:
        counts = np.zeros(length, dtype=int)
        for idx in arr:
            counts[idx] += 1
        return counts

    def _lower_confidence_bound(self, NA: int, N: int, alpha: float) -> float:
        from scipy.stats import beta

        return 0.0 if NA == 0 else float(beta.ppf(alpha, NA, N - NA + 1))


def _noisy_batches(x: Tensor, num: int, batch_size: int, sigma: float):
    """Cohen's sampling loop: ``ceil(num / batch_size)`` batches of copies of ``x`` plus ``randn_like * sigma``
    (torch's global generator), the last one smaller."""
    while num > 0:
        size = min(batch_size, num)
        num -= size
        copies = x.repeat((size,) + (1,) * x.dim())
        yield copies + torch.randn_like(copies) * sigma


class TradesSmoothReference:
    """The certification of TRADES + random smoothing (Blum et al. 2020; hongyanz/TRADES-smoothing
    ``code/core.py`` ``Smooth.certify(x, mask, n0, n, alpha, batch_size)``): Cohen's sampling on
    ``(x + noise) * mask``, the two most frequent selection classes by ``torch.topk``, the lower
    Clopper-Pearson bound of the first (the alpha quantile of Beta(n_A, n - n_A + 1); 0 for n_A = 0) and the
    upper bound of the second (the 1 - alpha quantile of Beta(n_B + 1, n - n_B); 1 for n_B = n), statsmodels'
    ``proportion_confint(method="beta")`` at level 2 alpha; abstain when the first is below the second, else the
    radius ``sigma / 2 (Phi^-1(p_A) - Phi^-1(p_B))``."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float):
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, sigma

    def counts(self, x: Tensor, mask: Tensor, num: int, batch_size: int) -> Tensor:
        total = torch.zeros(self.num_classes, dtype=torch.int64)
        with torch.no_grad():
            for noisy in _noisy_batches(x, num, batch_size, self.sigma):
                labels = self.base_classifier(noisy * mask).argmax(1).cpu()
                total += torch.bincount(labels, minlength=self.num_classes)
        return total

    def certify(self, x: Tensor, mask: Tensor, n0: int, n: int, alpha: float, batch_size: int):
        from scipy.stats import beta, norm

        self.base_classifier.eval()
        first, second = torch.topk(self.counts(x, mask, n0, batch_size), 2).indices.tolist()
        estimation = self.counts(x, mask, n, batch_size)
        n_a, n_b = int(estimation[first]), int(estimation[second])
        p_a = 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))
        p_b = 1.0 if n_b == n else float(beta.isf(alpha, n_b + 1, n - n_b))
        if p_a < p_b:
            return TradesSmoothReference.ABSTAIN, 0.0
        return first, 0.5 * self.sigma * (float(norm.ppf(p_a)) - float(norm.ppf(p_b)))
