"""Exact statistics of randomized-smoothing certificates (Cohen, Rosenfeld, Kolter 2019).

* ``lower_confidence_bound(n_a, n, alpha)``: the one-sided (1 - alpha) Clopper-Pearson lower bound on the
  success probability after ``n_a`` successes in ``n`` trials, the alpha-quantile of Beta(n_a, n - n_a + 1)
  (0 when n_a = 0); equal to Cohen's ``proportion_confint(n_a, n, alpha=2 alpha, method="beta")[0]``.
* ``radius(p_a_lower, sigma)``: Cohen's Theorem 1 with p_B <= 1 - p_A: ``R = sigma Phi^-1(p_A_lower)``.
* ``two_sided_radius``: the general bound ``R = sigma/2 (Phi^-1(p_A_lower) - Phi^-1(p_B_upper))``; p_A's
  lower and p_B's upper bound are each taken at level alpha/2 (the union bound, so both hold together with
  probability >= 1 - alpha; TRADES + randomized smoothing, Blum et al. 2020, omits this correction).
* ``l2_to_linf(r, d)``: an L2 ball of radius r contains the L-inf ball of radius r / sqrt(d) in d dims.
* ``average_certified_radius`` (ACR; Zhai et al. 2020, MACER) and ``certified_accuracy`` (the fraction of
  images correctly classified with radius >= r, an abstention counting as wrong).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

__all__ = ["lower_confidence_bound", "upper_confidence_bound", "radius", "two_sided_radius",
           "binomial_p_value", "l2_to_linf", "average_certified_radius", "certified_accuracy"]


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")


def _check_counts(n_a, n) -> None:
    if np.any(np.asarray(n) < 1):
        raise ValueError(f"n must be >= 1, got {n}")
    if np.any(np.asarray(n_a) < 0) or np.any(np.asarray(n_a) > np.asarray(n)):
        raise ValueError(f"need 0 <= n_a <= n, got n_a={n_a}, n={n}")


def lower_confidence_bound(n_a, n, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson lower bound: the alpha-quantile of Beta(n_a, n - n_a + 1), 0 for
    n_a = 0. Scalars give a float, arrays an array."""
    from scipy.stats import beta

    _check_alpha(alpha)
    _check_counts(n_a, n)
    n_a, n = np.asarray(n_a, dtype=np.float64), np.asarray(n, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        out = np.where(n_a > 0, beta.ppf(alpha, np.maximum(n_a, 1), n - n_a + 1), 0.0)
    return float(out) if out.ndim == 0 else out


def upper_confidence_bound(n_b, n, alpha: float):
    """One-sided (1 - alpha) Clopper-Pearson upper bound: ``1 - lower_confidence_bound(n - n_b, n, alpha)``."""
    _check_counts(n_b, n)
    out = 1.0 - np.asarray(lower_confidence_bound(np.asarray(n) - np.asarray(n_b), n, alpha))
    return float(out) if out.ndim == 0 else out


def radius(p_a_lower, sigma: float):
    """``sigma * Phi^-1(p_A_lower)`` (Cohen et al., Theorem 1 with p_B = 1 - p_A); meaningful for p_A > 1/2."""
    from scipy.stats import norm

    return sigma * norm.ppf(p_a_lower)


def two_sided_radius(n_a, n_b, n, alpha: float, sigma: float, union_bound: bool = True):
    """``sigma/2 (Phi^-1(p_A_lower) - Phi^-1(p_B_upper))`` from the counts of the top class (n_a) and the
    runner-up (n_b) in n samples. With ``union_bound`` each bound is taken at level alpha/2, so both hold at
    once with probability >= 1 - alpha; negative means no certificate."""
    from scipy.stats import norm

    a = alpha / 2 if union_bound else alpha
    p_a = lower_confidence_bound(n_a, n, a)
    p_b = upper_confidence_bound(n_b, n, a)
    return sigma / 2 * (norm.ppf(p_a) - norm.ppf(p_b))


def binomial_p_value(count1: int, count2: int) -> float:
    """Two-sided exact binomial test of ``count1`` successes in ``count1 + count2`` trials against p = 1/2
    (Cohen's PREDICT; Hung & Fithian 2019). 1.0 when there are no trials."""
    from scipy.stats import binomtest

    if count1 + count2 == 0:
        return 1.0
    return float(binomtest(int(count1), int(count1 + count2), p=0.5).pvalue)


def l2_to_linf(r, d: int):
    """An L2 certificate of radius r implies an L-inf certificate of radius ``r / sqrt(d)`` (d = input
    dimension: the L-inf ball of that radius lies inside the L2 ball)."""
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    return r / math.sqrt(d)


def _np(v) -> np.ndarray:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().double().numpy()
    return np.asarray(v, dtype=np.float64)


def average_certified_radius(radii, correct) -> float:
    """Mean over images of ``radius * correct`` (abstentions and wrong predictions count 0)."""
    r, c = _np(radii), _np(correct)
    if r.shape != c.shape:
        raise ValueError(f"radii and correct must have the same shape, got {r.shape} and {c.shape}")
    return float(np.mean(r * (c > 0))) if r.size else float("nan")


def certified_accuracy(radii, correct, r):
    """Fraction of images that are correct with certified radius >= r (r a float or a sequence)."""
    rad, c = _np(radii), _np(correct) > 0
    if rad.shape != c.shape:
        raise ValueError(f"radii and correct must have the same shape, got {rad.shape} and {c.shape}")
    if isinstance(r, Sequence) or (isinstance(r, np.ndarray) and r.ndim):
        return [certified_accuracy(radii, correct, float(v)) for v in r]
    return float(np.mean(c & (rad >= r))) if rad.size else float("nan")
