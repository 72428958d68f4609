"""TRADES + random smoothing on robustkern (Blum, Dick, Manoj, Zhang, JMLR 2020, "Random Smoothing Might be
Unable to Certify L-inf Robustness for High-Dimensional Images"; hongyanz/TRADES-smoothing ``code/trades.py``,
``code/core.py``): its training and certification scripts run with the imports changed to::

    from robustkern.compat.trades_smoothing import trades_loss     # was: from trades import trades_loss
    from robustkern.compat.trades_smoothing import Smooth          # was: from core import Smooth

* ``trades_loss(model, x_natural, y, optimizer, noise, mask, step_size=0.003, epsilon=0.031, perturb_steps=10,
  beta=6.0, distance='l_inf')``: the original's arguments and defaults; returns the loss. ``noise`` is the
  Gaussian noise tensor (``randn_like(x) * noise_sd``, drawn by the caller), ``mask`` the pixel mask (0/1, as
  the original's ``mask_maker``; ``None`` means all ones). The adversarial search runs on the masked,
  noisy inputs ``model(x_adv * mask + noise * mask)`` in eval mode, then the loss
  ``CE(f(x + n), y) + beta / B KL_sum(softmax f(x + n) || f(x_adv + n))`` in train mode, with the original's
  side effects (``model.eval()`` / ``model.train()``, ``optimizer.zero_grad()`` inside, three train-mode
  forwards). ``distance='l_2'`` (what ``train_trades.py`` uses) is ``robustkern.smoothing.trades_rs_loss``:
  note the original's L2 step rule, kept here: it ignores ``step_size`` and takes steps of ``2 epsilon /
  perturb_steps`` along the normalised gradient. ``distance='l_inf'`` is ``robustkern.attacks.trades_loss``
  (sign steps of ``step_size``). The random start is drawn as the original draws it, ``torch.randn(x.shape)``
  from the CPU generator (for ``l_2`` twice: the original draws an ``l_inf`` start it does not use), so
  ``torch.manual_seed`` replays the original's step exactly.
* ``Smooth(base_classifier, num_classes, sigma)`` with ``certify(x, mask, n0, n, alpha, batch_size)``: Cohen
  et al.'s Monte Carlo certification on ``(x + noise) * mask`` with this project's two-sided radius: the top
  two classes ``c_A, c_B`` of the n0 selection counts (``torch.topk``, as the original), the one-sided
  Clopper-Pearson bounds ``p_A`` (lower) and ``p_B`` (upper) at level alpha each (no union bound, as the
  original), ``ABSTAIN`` when ``p_A < p_B``, else the L2 radius ``sigma / 2 (Phi^-1(p_A) - Phi^-1(p_B))``.
  ``certify_trades.py`` divides it by ``sqrt(mask.sum())`` for the L-inf radius itself. ``predict(x, n,
  alpha, batch_size)`` is Cohen's (the original's ``predict`` fails: it does not pass the mask).
  robustkern's ``Smooth`` options are keyword arguments: ``rng="torch"`` draws the noise as the original
  (``torch.randn_like`` batch by batch: the same counts given the same seed), the default ``rng="philox"``
  uses robustkern's counter-based noise (``seed``, ``index`` per call; faster, other draws).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..attacks import trades_loss as _trades_linf
from ..ops.smoothing import STREAM_ESTIMATION, STREAM_SELECTION
from ..smoothing import Smooth as _Smooth
from ..smoothing import statistics, trades_rs_loss

__all__ = ["trades_loss", "Smooth"]


class _MaskedNoisy(torch.nn.Module):
    """``model(z * mask + noise)`` (``noise`` already masked): the original's ``model(x_adv + noise)`` with
    ``x_adv`` re-masked after every step, since the masked coordinates then get a zero gradient."""

    def __init__(self, model: torch.nn.Module, mask: Optional[Tensor], noise: Tensor):
        super().__init__()
        self.model, self.mask, self.noise = model, mask, noise

    def forward(self, z: Tensor) -> Tensor:
        return self.model((z if self.mask is None else z * self.mask) + self.noise)


def _check_mask(mask: Optional[Tensor], x: Tensor) -> Optional[Tensor]:
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a tensor or None, got {type(mask).__name__}")
    mask = mask.to(x)
    try:
        torch.broadcast_shapes(mask.shape, x.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to x's {tuple(x.shape)}") from None
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must contain only 0 and 1 (a pixel mask, as the original's mask_maker builds)")
    return mask


def trades_loss(model, x_natural: Tensor, y: Tensor, optimizer, noise: Tensor, mask: Optional[Tensor] = None,
                step_size: float = 0.003, epsilon: float = 0.031, perturb_steps: int = 10, beta: float = 6.0,
                distance: str = "l_inf") -> Tensor:
    """TRADES + random smoothing loss of hongyanz/TRADES-smoothing (module docstring)."""
    if distance not in ("l_inf", "l_2"):
        raise ValueError(f"trades_loss: distance must be 'l_inf' or 'l_2', got {distance!r}")
    if not isinstance(noise, Tensor) or noise.shape != x_natural.shape:
        raise ValueError(f"trades_loss: noise must be a tensor of x_natural's shape {tuple(x_natural.shape)} "
                         f"(randn_like(x) * noise_sd), got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
    mask = _check_mask(mask, x_natural)
    x = x_natural if mask is None else x_natural * mask
    noise = (noise if mask is None else noise * mask).detach()
    start = torch.randn(x_natural.shape).to(x)          # the original's CPU draw, then moved
    if distance == "l_inf":
        return _trades_linf(_MaskedNoisy(model, mask, noise), x_natural.detach(), y, optimizer, step_size,
                            epsilon, perturb_steps, beta, "l_inf", faithful=True, noise=start)
    delta = 0.001 * torch.randn(x_natural.shape).to(x)
    if mask is not None:
        delta = delta * mask
    loss, _ = trades_rs_loss(model, x.detach(), y, 1.0, epsilon, None, perturb_steps, beta, noise=noise,
                             delta_init=delta, faithful=True)
    if optimizer is not None:
        optimizer.zero_grad()
    return loss


class Smooth(_Smooth):
    """TRADES-smoothing's ``core.Smooth`` (module docstring); keyword options as ``robustkern.smoothing.Smooth``
    (``cuda_graphs`` is not offered: the mask changes per call)."""

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float, **options):
        if options.get("cuda_graphs"):
            raise ValueError("Smooth: cuda_graphs is not available with a per-call mask")
        super().__init__(base_classifier, num_classes, sigma, **options)
        self._mask: Optional[Tensor] = None

    def certify(self, x: Tensor, mask: Tensor, n0: int, n: int, alpha: float, batch_size: int, *,
                seed: Optional[int] = None, index: int = 0):
        """``(class, L2 radius)`` or ``(Smooth.ABSTAIN, 0.0)`` for one image ``x`` (C, H, W) under ``mask``."""
        self._check_image(x, batched=False)
        self._mask = _check_mask(mask, x)
        try:
            counts = self._counts(x.unsqueeze(0), [(STREAM_SELECTION, n0), (STREAM_ESTIMATION, n)], batch_size,
                                  seed, [index])[0].cpu()
        finally:
            self._mask = None
        top2 = torch.topk(counts[0], 2).indices
        c_a, c_b = int(top2[0]), int(top2[1])
        p_a = statistics.lower_confidence_bound(int(counts[1, c_a]), n, alpha)
        p_b = statistics.upper_confidence_bound(int(counts[1, c_b]), n, alpha)
        if p_a < p_b:
            return Smooth.ABSTAIN, 0.0
        from scipy.stats import norm

        return c_a, float(0.5 * self.sigma * (norm.ppf(p_a) - norm.ppf(p_b)))

    def _forward(self, batch: Tensor, compiled: bool = False) -> Tensor:
        if self._mask is not None:
            batch = batch * self._mask.to(batch.dtype)
        return super()._forward(batch, compiled)
