"""Perturbation-size schedules for adversarial training at large eps (Shaeiri, Nobahari & Rohban 2020,
"Towards Deep Learning Models Resistant to Large Perturbations", arXiv 2003.13370).

* Extended adversarial training: start from a model adversarially trained at a smaller eps (the
  "initialisation") and continue PGD adversarial training (Madry et al. 2018) at the larger eps, with
  ``steps = int(2.5 eps / alpha)`` PGD iterations (upstream: CIFAR-10 8/255 -> 16/255 or 32/255 for 5 epochs;
  MNIST 0.3 -> 0.4 for 5 epochs with PGD-200, step 0.005).
* IAT (incremental adversarial training; upstream ``MNIST/IAT.ipynb``): no warm start; eps grows by a fixed
  ``eps_step`` per epoch, ``eps_t = eps_step (t + 1)`` (MNIST: 0.01 per epoch for 40 epochs up to 0.40), with
  PGD step ``alpha`` and ``int(2.5 eps_t / alpha)`` iterations.

Upstream generates the attack with the model in train mode; ``attack_mode`` changes that.
"""
from __future__ import annotations

from typing import Iterable

from .losses import pgd_at_loss

__all__ = ["madry_steps", "iat_schedule", "adversarial_training_epoch", "extended_adversarial_training",
           "incremental_adversarial_training"]


def madry_steps(eps: float, alpha: float) -> int:
    """The number of PGD iterations ``int(2.5 eps / alpha)`` (enough to cross the ball and back)."""
    if alpha <= 0 or eps < 0:
        raise ValueError(f"madry_steps: need eps >= 0 and alpha > 0, got eps={eps}, alpha={alpha}")
    return int(2.5 * eps / alpha)


def iat_schedule(epoch: int, eps_step: float = 0.01, alpha: float = 0.01, eps_max: float | None = None):
    """``(eps, steps)`` of IAT epoch ``epoch`` (0-based): ``eps = min(eps_step (epoch + 1), eps_max)``."""
    if epoch < 0 or eps_step <= 0:
        raise ValueError(f"iat_schedule: need epoch >= 0 and eps_step > 0, got {epoch}, {eps_step}")
    eps = eps_step * (epoch + 1)
    if eps_max is not None:
        eps = min(eps, eps_max)
    return eps, madry_steps(eps, alpha)


def adversarial_training_epoch(model, loader: Iterable, optimizer, eps: float, alpha: float, steps: int,
                               norm: str = "linf", random_start: bool = True, attack_mode: str | None = None,
                               device=None) -> dict:
    """One epoch of PGD adversarial training (model in train mode); returns ``{"loss", "n"}`` (the mean
    adversarial loss over the epoch's points, their number)."""
    model.train()
    total = 0
    loss_sum = 0.0
    for x, y in loader:
        if device is not None:
            x, y = x.to(device), y.to(device)
        loss = pgd_at_loss(model, x, y, eps, alpha, steps, norm, random_start, attack_mode=attack_mode)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss_sum += loss.item() * y.numel()
        total += y.numel()
    return {"loss": loss_sum / max(total, 1), "n": total}


def extended_adversarial_training(model, loader: Iterable, optimizer, eps: float, alpha: float, epochs: int,
                                  steps: int | None = None, **kw) -> list[dict]:
    """Continue PGD adversarial training of an eps'-trained ``model`` at the larger ``eps`` for ``epochs``
    epochs, ``steps = int(2.5 eps / alpha)`` unless given. Returns one record per epoch."""
    steps = madry_steps(eps, alpha) if steps is None else steps
    history = []
    for epoch in range(epochs):
        rec = adversarial_training_epoch(model, loader, optimizer, eps, alpha, steps, **kw)
        history.append({"epoch": epoch, "eps": eps, "steps": steps, **rec})
    return history


def incremental_adversarial_training(model, loader: Iterable, optimizer, epochs: int, eps_step: float = 0.01,
                                     alpha: float = 0.01, eps_max: float | None = None, **kw) -> list[dict]:
    """IAT: epoch ``t`` trains at ``eps_t = eps_step (t + 1)`` (capped at ``eps_max``) with
    ``int(2.5 eps_t / alpha)`` PGD steps. Returns one record per epoch."""
    history = []
    for epoch in range(epochs):
        eps, steps = iat_schedule(epoch, eps_step, alpha, eps_max)
        rec = adversarial_training_epoch(model, loader, optimizer, eps, alpha, steps, **kw)
        history.append({"epoch": epoch, "eps": eps, "steps": steps, **rec})
    return history
