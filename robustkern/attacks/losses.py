"""Adversarial training losses: PGD adversarial training (Madry et al. 2018) and TRADES (Zhang et al. 2019,
"Theoretically Principled Trade-off between Robustness and Accuracy").

PGD-AT minimises the robust risk ``E max_{x' in B(x, eps)} CE(f(x'), y)``, the inner maximum approximated by
PGD (``robustkern.attacks.pgd``): the loss is ``CE(f(x_adv), y)``.

TRADES minimises ``CE(f(x), y) + beta max_{x' in B(x, eps)} KL(softmax f(x) || softmax f(x'))``. The inner
maximum: start ``x' = x + 0.001 N(0, I)``, then ``perturb_steps`` steps on ``KL_sum(p_nat || f(x'))``:

    L-inf: x' <- clip_[0,1]( Pi_B( x' + step_size sign(g) ) )
    L2:    x' <- normalised-gradient step of length 2 eps / perturb_steps, then ball and [0, 1]

with the model in eval mode. The outer loss is ``CE(f(x), y) + beta / B * KL_sum(softmax f(x) || f(x'))`` in
train mode, with gradients flowing through both sides of the KL, as in TRADES' ``trades.py``.

``trades_loss(faithful=False)`` (default) is the same mathematics with less work and no side effects:
``p_nat = softmax f(x)`` is computed once before the inner loop (the upstream code recomputes it every step;
in eval mode that is the same value), the outer loss reuses one clean forward for the CE and the KL (upstream
runs two; only BatchNorm running-statistic update counts differ), steps are the fused ``pgd_step`` op, only
input gradients are taken, and every module's train/eval mode is restored afterwards (for L2 the step is
``robustkern.ops.pgd_step``'s: project to the ball, then clamp, where upstream clamps first and renormalises
after). ``faithful=True`` reproduces ``trades.py`` step by step, side effects included: the model is left in
train mode (``model.eval()`` for the attack, ``model.train()`` after), ``optimizer.zero_grad()`` is called
inside when an optimizer is given, and the clean softmax is recomputed at every inner step.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attacks import PGD_STEP
from .pgd import _per_row, check_budget, check_labels, pgd

__all__ = ["pgd_at_loss", "trades_loss"]

_DISTANCES = {"l_inf": "linf", "l_2": "l2", "linf": "linf", "l2": "l2"}


def _modes(model):
    return [(m, m.training) for m in model.modules()]


def _restore(modes):
    for m, t in modes:
        m.training = t


def pgd_at_loss(model, x: Tensor, y: Tensor, eps, alpha, steps: int, norm: str = "linf",
                random_start: bool = True, restarts: int = 1, attack_mode: str | None = None,
                reduction: str = "mean", return_adv: bool = False):
    """Madry et al. 2018 PGD adversarial training loss ``CE(f(x_adv), y)``, ``x_adv = pgd(model, x, y, eps,
    alpha, steps, norm, random_start, restarts)``. ``attack_mode``: None runs the attack in the model's current
    mode (Madry; Shaeiri et al. 2020 attack in train mode), ``"eval"`` runs it in eval mode and restores the
    modes before the training forward. Returns the loss (and ``x_adv`` when ``return_adv``)."""
    if attack_mode not in (None, "eval", "train"):
        raise ValueError(f"pgd_at_loss: attack_mode must be None, 'eval' or 'train', got {attack_mode!r}")
    modes = _modes(model)
    if attack_mode is not None:
        model.train(attack_mode == "train")
    try:
        x_adv = pgd(model, x, y, eps, alpha, steps, norm, random_start, restarts)
    finally:
        _restore(modes)
    loss = F.cross_entropy(model(x_adv), y, reduction=reduction)
    return (loss, x_adv) if return_adv else loss


def _kl_sum(log_q: Tensor, p: Tensor) -> Tensor:
    """``sum p (log p - log q)``, as ``nn.KLDivLoss(reduction="sum")(log_q, p)``."""
    return F.kl_div(log_q, p, reduction="sum")


def trades_loss(model, x_natural: Tensor, y: Tensor, optimizer=None, step_size: float = 0.003,
                epsilon: float = 0.031, perturb_steps: int = 10, beta: float = 1.0, distance: str = "l_inf",
                faithful: bool = False, return_parts: bool = False, noise: Tensor | None = None):
    """TRADES loss (module docstring); arguments as TRADES' ``trades_loss``. ``distance``: ``"l_inf"`` or
    ``"l_2"``. ``noise``: the N(0, I) draw of the random start ``x + 0.001 noise`` (shape of ``x_natural``;
    default ``torch.randn_like(x_natural)``). Returns the loss, or ``(loss, loss_natural, loss_robust)`` when
    ``return_parts``."""
    if distance not in _DISTANCES:
        raise ValueError(f"trades_loss: distance must be 'l_inf' or 'l_2', got {distance!r}")
    norm = _DISTANCES[distance]
    check_budget("trades_loss", x_natural, y, epsilon, step_size, perturb_steps, norm)
    if beta < 0:
        raise ValueError(f"trades_loss: beta must be >= 0, got {beta}")
    x = x_natural.detach()
    b = x.shape[0]
    alpha = step_size if norm == "linf" else 2.0 * epsilon / max(perturb_steps, 1)
    if noise is None:
        noise = torch.randn_like(x)
    elif not isinstance(noise, Tensor) or noise.shape != x.shape:
        raise ValueError(f"trades_loss: noise must have the shape of x_natural {tuple(x.shape)}, got "
                         f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
    noise = noise.detach().to(x)
    if faithful:
        x_adv = _faithful_attack(model, x, noise, epsilon, step_size, perturb_steps, norm)
        model.train()
        if optimizer is not None:
            optimizer.zero_grad()
        logits = model(x_natural)
        check_labels("trades_loss", y, logits.shape[1])
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / b) * _kl_sum(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x_natural), dim=1))
    else:
        modes = _modes(model)
        model.eval()
        try:
            with torch.no_grad():
                p_nat = F.softmax(model(x), dim=1)
            check_labels("trades_loss", y, p_nat.shape[1])
            x_adv = x + 0.001 * noise
            step, eps_t, alpha_t = PGD_STEP, _per_row(epsilon, x), _per_row(alpha, x)  # checked above
            for _ in range(perturb_steps):
                x_adv = x_adv.detach().requires_grad_(True)
                g, = torch.autograd.grad(_kl_sum(F.log_softmax(model(x_adv), dim=1), p_nat), x_adv)
                x_adv = step(x_adv.detach(), g, x, eps_t, alpha_t, norm)
            x_adv = x_adv.detach().clamp(0.0, 1.0)
        finally:
            _restore(modes)
        logits = model(x_natural)
        loss_natural = F.cross_entropy(logits, y)
        loss_robust = (1.0 / b) * _kl_sum(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1))
    loss = loss_natural + beta * loss_robust
    return (loss, loss_natural, loss_robust) if return_parts else loss


def _faithful_attack(model, x, noise, epsilon, step_size, perturb_steps, norm):
    """The inner maximisation of TRADES' ``trades.py``, line for line, from the start draw ``noise`` (model
    left in eval mode)."""
    model.eval()
    b = x.shape[0]
    if norm == "linf":
        x_adv = x + 0.001 * noise
        for _ in range(perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                loss_kl = _kl_sum(F.log_softmax(model(x_adv), dim=1), F.softmax(model(x), dim=1))
            grad = torch.autograd.grad(loss_kl, [x_adv])[0]
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.min(torch.max(x_adv, x - epsilon), x + epsilon)
            x_adv = torch.clamp(x_adv, 0.0, 1.0)
        return torch.clamp(x_adv, 0.0, 1.0).detach()
    delta = 0.001 * noise
    lr = epsilon / perturb_steps * 2 if perturb_steps else 0.0
    for _ in range(perturb_steps):
        delta.requires_grad_(True)
        with torch.enable_grad():
            loss = -_kl_sum(F.log_softmax(model(x + delta), dim=1), F.softmax(model(x), dim=1))
        grad, = torch.autograd.grad(loss, delta)  # upstream: loss.backward() (also fills weight grads)
        with torch.no_grad():
            norms = grad.reshape(b, -1).norm(p=2, dim=1)
            grad = grad / norms.reshape((-1,) + (1,) * (x.dim() - 1))
            zero = norms == 0
            if bool(zero.any()):
                grad[zero] = torch.randn_like(grad[zero])
            delta = delta.detach() - lr * grad           # optimizer_delta.step() (plain SGD)
            delta = (delta + x).clamp(0, 1) - x
            delta = delta.renorm(p=2, dim=0, maxnorm=epsilon)
    return torch.clamp(x + delta.detach(), 0.0, 1.0)
