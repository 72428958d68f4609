"""A line-by-line transcription of MACER's training step and certification (Zhai et al., ICLR 2020, "MACER:
Attack-free and Scalable Robust Training via Maximizing Certified Radius"; github.com/RuntianZ/macer ``macer.py``
and ``rs/core.py``, commit 1b6837f), in plain PyTorch: the independent implementation that tests and benchmarks
compare robustkern's MACER against, and the arithmetic of its ``faithful=True`` mode. The math is stated in
``robustkern.reference.macer``."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


__all__ = ["macer_tail_terms_reference", "macer_loss_reference", "macer_train_reference", "MacerSmoothReference"]


def macer_tail_terms_reference(outputs: Tensor, targets: Tensor, sigma: float, gamma: float, beta: float
                               ) -> tuple[Tensor, Tensor]:
    """The original's loss terms from logits ``outputs`` (B, k, C): ``(CL sum, RL sum)``, differentiable, in
    the logits' dtype, with its ``topk`` and ``Normal(0, 1).icdf`` (``sqrt(2) erfinv(2p - 1)``)."""
    def icdf(p):
        return torch.erfinv(2 * p - 1) * math.sqrt(2)

    outputs_softmax = F.softmax(outputs, dim=2).mean(1)
    classification = F.nll_loss(torch.log(outputs_softmax + 1e-10), targets, reduction="sum")
    beta_softmax = F.softmax(outputs * beta, dim=2).mean(1)
    top_score, top_idx = torch.topk(beta_softmax, 2)
    correct = top_idx[:, 0] == targets
    out0, out1 = top_score[correct, 0], top_score[correct, 1]
    neg_xi = icdf(out1) - icdf(out0)
    kept = ~torch.isnan(neg_xi) & ~torch.isinf(neg_xi) & (torch.abs(neg_xi) <= gamma)
    out0, out1 = out0[kept], out1[kept]
    robustness = (icdf(out1) - icdf(out0) + gamma).sum() * sigma / 2
    return classification, robustness


def _noisy_copies(x: Tensor, sigma: float, k: int, noise: Optional[Tensor], generator) -> Tensor:
    b = x.shape[0]
    inputs = x.unsqueeze(1).expand(b, k, *x.shape[1:]).reshape(b * k, *x.shape[1:])
    if noise is None:
        noise = torch.randn(inputs.shape, dtype=inputs.dtype, device=inputs.device, generator=generator) * sigma
    else:
        noise = noise.reshape(inputs.shape).to(inputs.dtype) * sigma
    return inputs + noise


def macer_loss_reference(model, x: Tensor, y: Tensor, sigma: float, k: int = 16, lbd: float = 12.0,
                         gamma: float = 8.0, beta: float = 16.0, noise: Optional[Tensor] = None,
                         generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor, Tensor]:
    """One MACER step's objective as RuntianZ/macer ``macer_train`` computes it, for the batch ``(x, y)``.

    ``noise`` (B, k, *x.shape[1:]): standard-normal draws (multiplied by ``sigma`` here, as the original's
    ``randn_like(inputs) * sigma``); default: ``torch.randn`` of shape (B*k, ...) from ``generator`` (the
    original's order, so ``torch.manual_seed`` replays it). Returns ``(loss, CL / B, RL / B)`` with
    ``loss = (CL + lbd RL) / B`` (the two terms are the per-example averages the original prints)."""
    b = x.shape[0]
    outputs = model(_noisy_copies(x, sigma, k, noise, generator))
    outputs = outputs.reshape(b, k, -1)
    cl, rl = macer_tail_terms_reference(outputs, y, sigma, gamma, beta)
    loss = (cl + lbd * rl) / b
    return loss, cl / b, rl / b


def macer_train_reference(sigma, lbd, gauss_num, beta, gamma, num_classes, model, trainloader, optimizer, device,
                          generator: Optional[torch.Generator] = None) -> tuple[float, float]:
    """One epoch of the original ``macer_train`` (same arguments); returns the epoch's per-example averages
    ``(CL, RL)`` (jh-jeong/smoothing-consistency's version returns them; the original prints them)."""
    cl_total = rl_total = 0.0
    total = 0
    for inputs, targets in trainloader:
        inputs, targets = inputs.to(device), targets.to(device)
        loss, cl, rl = macer_loss_reference(model, inputs, targets, sigma, gauss_num, lbd, gamma, beta,
                                            generator=generator)
        total += len(inputs)
        cl_total += cl.item() * len(inputs)
        rl_total += rl.item() * len(inputs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return cl_total / max(total, 1), rl_total / max(total, 1)


class MacerSmoothReference:
    """MACER's randomized smoothing (RuntianZ/macer ``rs/core.py`` ``Smooth(base, num_classes, sigma, device,
    mode, beta)``), written independently of ``robustkern.compat.macer``: Cohen's sampling loop (torch's global
    generator); per batch the logits times ``beta`` give hard votes (argmax counts) and soft votes (softmax
    sums, taken per batch in the model's precision and accumulated in float64, with the sums of squares). The
    top class is ``argsort()[::-1][0]`` of the votes. The lower bound of p_A is Clopper-Pearson (hard, statsmodels'
    "beta" interval at level 2 alpha: the alpha quantile of Beta(n_A, n - n_A + 1)) or the empirical Bernstein
    bound (soft: mean - sqrt(2 var log(2/alpha) / N) - 7 log(2/alpha) / (3 (N - 1)), the variance from the sums,
    clipped at 0); radius ``sigma Phi^-1(p_A)``, abstaining below 1/2. ``mode`` "hard", "soft" or "both"."""

    ABSTAIN = -1

    def __init__(self, base_classifier: torch.nn.Module, num_classes: int, sigma: float, mode: str = "hard",
                 beta: float = 1.0):
        self.base_classifier, self.num_classes, self.sigma = base_classifier, num_classes, sigma
        self.mode, self.beta = mode, beta

    def votes(self, x: Tensor, num: int, batch_size: int):
        """(hard counts, soft sums, soft sums of squares) of ``num`` noisy copies of ``x``."""
        import numpy as np

        from .smoothing import _noisy_batches

        hard = np.zeros(self.num_classes, dtype=np.int64)
        soft = np.zeros(self.num_classes, dtype=np.float64)
        squares = np.zeros(self.num_classes, dtype=np.float64)
        with torch.no_grad():
            for noisy in _noisy_batches(x, num, batch_size, self.sigma):
                logits = self.base_classifier(noisy) * self.beta
                hard += torch.bincount(logits.argmax(1).cpu(), minlength=self.num_classes).numpy()
                probs = F.softmax(logits, 1)
                soft += probs.sum(0).cpu().numpy()
                squares += (probs ** 2).sum(0).cpu().numpy()
        return hard, soft, squares

    def certify(self, x: Tensor, n0: int, n: int, alpha: float, batch_size: int):
        """``(class, radius)`` per mode asked for: two values, or four for "both" (hard first)."""
        from scipy.stats import beta, norm

        self.base_classifier.eval()
        sel_hard, sel_soft, _ = self.votes(x, n0, batch_size)
        est_hard, est_soft, squares = self.votes(x, n, batch_size)
        out = []
        for mode in ("hard", "soft") if self.mode == "both" else (self.mode,):
            top = int((sel_hard if mode == "hard" else sel_soft).argsort()[::-1][0])
            if mode == "hard":
                n_a = int(est_hard[top])
                p_a = 0.0 if n_a == 0 else float(beta.ppf(alpha, n_a, n - n_a + 1))
            else:
                s = float(est_soft[top])
                var = max((float(squares[top]) - s * s / n) / (n - 1), 0.0)
                t = math.log(2 / alpha)
                p_a = s / n - math.sqrt(2 * var * t / n) - 7 * t / 3 / (n - 1)
            out += [self.ABSTAIN, 0.0] if p_a < 0.5 else [top, self.sigma * float(norm.ppf(p_a))]
        return tuple(out)
