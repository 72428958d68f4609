"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", Algorithm 1), following the reference implementation's schedule (fra31/auto-attack,
``autopgd_base.py``), for the L-inf and L2 balls.

Iteration (N iterations, eta_k the per-example step size, initially ``2 eps``):

    z_{k+1} = P( x_k + eta_k s(g_k) )                       s = sign (L-inf) or g/|g|_2 (L2)
    x_{k+1} = P( x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1}) ),   a = 0.75 (momentum), a = 1 at k = 0

with ``P`` the projection onto the ball and [0, 1]. Checkpoints at ``w_j``: first after ``p_1 = 0.22 N``
iterations, then the spacing shrinks by ``0.03 N`` down to ``0.06 N``. At a checkpoint the step size of an
example is halved, and its iterate restarts from its best point, when (1) the loss increased in fewer than
``rho = 0.75`` of the steps since the previous checkpoint, or (2) its step was not halved at the previous
checkpoint and its best loss has not improved since. Losses: cross-entropy (APGD-CE), the difference of
logits ratio (APGD-DLR),

    DLR(z, y)      = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
    DLR_t(z, y, t) = -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4)/2 + 1e-12)          (APGD-T)

(pi = logits sorted in decreasing order), and targeted cross-entropy ``-CE(z, t)``. APGD-T attacks the
``n_target_classes`` classes with the highest logits other than y, one after the other, each only on points
still classified correctly. Only input gradients are computed. The returned point is, per example, the first
misclassified iterate found, else the iterate of highest loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .pgd import Attack, _per_row, _rows, check_budget, check_labels

__all__ = ["apgd", "apgd_targeted", "dlr_loss", "dlr_loss_targeted", "APGD", "APGDT"]


def dlr_loss(logits: Tensor, y: Tensor) -> Tensor:
    s, ind = logits.sort(dim=1)
    top_is_y = (ind[:, -1] == y).to(logits.dtype)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    return -(z_y - s[:, -2] * top_is_y - s[:, -1] * (1.0 - top_is_y)) / (s[:, -1] - s[:, -3] + 1e-12)


def dlr_loss_targeted(logits: Tensor, y: Tensor, target: Tensor) -> Tensor:
    s, _ = logits.sort(dim=1)
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_t = logits.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (s[:, -1] - 0.5 * (s[:, -3] + s[:, -4]) + 1e-12)


def _loss(name: str, logits: Tensor, y: Tensor, target: Tensor | None) -> Tensor:
    if name == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return dlr_loss(logits, y)
    if name == "ce-targeted":
        return -F.cross_entropy(logits, target, reduction="none")
    if name == "dlr-targeted":
        return dlr_loss_targeted(logits, y, target)
    raise ValueError(f"apgd: loss must be 'ce' or 'dlr', got {name!r}")


def _project(x: Tensor, z: Tensor, eps: Tensor, norm: str) -> Tensor:
    e = _rows(eps, x.dim())
    if norm == "linf":
        return torch.min(torch.max(z, x - e), x + e).clamp(0.0, 1.0)
    d = z - x
    n = _rows(torch.linalg.vector_norm(d.reshape(x.shape[0], -1), dim=1), x.dim())
    return (x + d / (n + 1e-12) * torch.min(e, n)).clamp(0.0, 1.0)


def _grad(model, x_adv: Tensor, y: Tensor, loss: str, target):
    x_adv = x_adv.detach().requires_grad_(True)
    logits = model(x_adv)
    li = _loss(loss, logits, y, target)
    g, = torch.autograd.grad(li.sum(), x_adv)
    return logits.detach(), li.detach(), g.detach()


def _single_run(model, x, y, eps, steps, norm, loss, target, rho):
    """One APGD run on (x, y); returns (x_best, still_correct, loss_best, x_best_adv)."""
    b = x.shape[0]
    n2, n_min, size_decr = max(int(0.22 * steps), 1), max(int(0.06 * steps), 1), max(int(0.03 * steps), 1)
    e = _rows(eps, x.dim())
    if norm == "linf":
        t = 2 * torch.rand_like(x) - 1
        x_adv = x + e * t / _rows(t.reshape(b, -1).abs().amax(1), x.dim())
    else:
        t = torch.randn_like(x)
        x_adv = x + e * t / (_rows(torch.linalg.vector_norm(t.reshape(b, -1), dim=1), x.dim()) + 1e-12)
    x_adv = x_adv.clamp(0.0, 1.0)
    x_best, x_best_adv = x_adv.clone(), x_adv.clone()
    loss_steps = torch.zeros(steps, b, dtype=x.dtype, device=x.device)
    logits, li, grad = _grad(model, x_adv, y, loss, target)
    grad_best = grad.clone()
    correct = logits.argmax(1) == y
    loss_best = li.clone()
    step = 2.0 * e * torch.ones_like(e)
    x_old = x_adv.clone()
    k, counter = n2, 0
    loss_best_last = loss_best.clone()
    reduced_last = torch.ones_like(loss_best, dtype=torch.bool)
    for i in range(steps):
        with torch.no_grad():
            grad2 = x_adv - x_old
            x_old = x_adv.clone()
            a = 0.75 if i > 0 else 1.0
            if norm == "linf":
                z = _project(x, x_adv + step * grad.sign(), eps, norm)
            else:
                gn = _rows(torch.linalg.vector_norm(grad.reshape(b, -1), dim=1), x.dim())
                z = _project(x, x_adv + step * grad / (gn + 1e-12), eps, norm)
            x_adv = _project(x, x_adv + (z - x_adv) * a + grad2 * (1 - a), eps, norm)
        logits, li, grad = _grad(model, x_adv, y, loss, target)
        with torch.no_grad():
            fooled = logits.argmax(1) != y
            correct &= ~fooled
            # torch.where, not masked assignment: no host-device sync inside the step loop
            x_best_adv = torch.where(_rows(fooled, x.dim()), x_adv, x_best_adv)
            loss_steps[i] = li
            better = li > loss_best
            better_rows = _rows(better, x.dim())
            x_best = torch.where(better_rows, x_adv, x_best)
            grad_best = torch.where(better_rows, grad, grad_best)
            loss_best = torch.where(better, li, loss_best)
            counter += 1
            if counter == k:
                # oscillation: fewer than rho*k increases over the last k steps (index -1 wraps as upstream)
                incr = sum((loss_steps[i - j] > loss_steps[i - j - 1]).to(x.dtype) for j in range(k))
                osc = incr <= k * rho
                no_impr = ~reduced_last & (loss_best_last >= loss_best)
                osc = osc | no_impr
                reduced_last = osc.clone()
                loss_best_last = loss_best.clone()
                osc_rows = _rows(osc, x.dim())
                step = torch.where(osc_rows, step / 2.0, step)
                x_adv = torch.where(osc_rows, x_best, x_adv)
                grad = torch.where(osc_rows, grad_best, grad)
                k = max(k - size_decr, n_min)
                counter = 0
    return x_best, correct, loss_best, x_best_adv


def _run(fn, model, x, y, eps, steps, norm, loss, restarts, rho, targets_of=None, n_targets=1, seed=None):
    check_budget(fn, x, y, eps, None, steps, norm, restarts)
    if rho is None or not 0 < rho <= 1:
        raise ValueError(f"{fn}: rho must be in (0, 1], got {rho}")
    x = x.detach()
    adv = x.clone()
    if x.shape[0] == 0 or steps == 0:
        return adv
    eps_t = _per_row(eps, x)
    devices = [x.device] if x.is_cuda else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            logits = model(x)
        check_labels(fn, y, logits.shape[1])
        robust = logits.argmax(1) == y
        best_loss = torch.full((x.shape[0],), -float("inf"), dtype=x.dtype, device=x.device)
        for t in range(n_targets):
            for _ in range(restarts):
                idx = robust.nonzero().squeeze(1)
                if idx.numel() == 0:
                    return adv
                target = None if targets_of is None else targets_of(logits[idx], t)
                xb, still, lb, xba = _single_run(model, x[idx], y[idx], eps_t[idx], steps, norm, loss, target,
                                                 rho)
                fooled = ~still
                adv[idx[fooled]] = xba[fooled]
                keep = still & (lb > best_loss[idx])
                adv[idx[keep]], best_loss[idx[keep]] = xb[keep], lb[keep]
                robust[idx[fooled]] = False
    return adv


def apgd(model, x: Tensor, y: Tensor, eps, steps: int = 100, norm: str = "linf", loss: str = "ce",
         restarts: int = 1, rho: float = 0.75, seed: int | None = None) -> Tensor:
    """APGD-CE (``loss="ce"``) or APGD-DLR (``loss="dlr"``), untargeted; ``restarts`` runs, each on the points
    still classified correctly. Returns adversarial examples in the ball and [0, 1] (module docstring)."""
    if loss not in ("ce", "dlr"):
        raise ValueError(f"apgd: loss must be 'ce' or 'dlr', got {loss!r}")
    return _run("apgd", model, x, y, eps, steps, norm, loss, restarts, rho, seed=seed)


def apgd_targeted(model, x: Tensor, y: Tensor, eps, steps: int = 100, norm: str = "linf", loss: str = "dlr",
                  n_target_classes: int = 9, restarts: int = 1, rho: float = 0.75,
                  seed: int | None = None) -> Tensor:
    """APGD-T: targeted DLR (``loss="dlr"``) or targeted CE (``loss="ce"``) towards each of the
    ``n_target_classes`` highest non-true classes (AutoAttack's standard uses 9), on still-robust points."""
    if loss not in ("ce", "dlr"):
        raise ValueError(f"apgd_targeted: loss must be 'ce' or 'dlr', got {loss!r}")
    if not isinstance(n_target_classes, int) or n_target_classes < 1:
        raise ValueError(f"apgd_targeted: n_target_classes must be an int >= 1, got {n_target_classes!r}")

    def targets_of(logits, t):
        if t + 2 > logits.shape[1]:
            raise ValueError(f"apgd_targeted: n_target_classes={n_target_classes} needs more than "
                             f"{logits.shape[1]} classes")
        return logits.sort(dim=1)[1][:, -(t + 2)]

    return _run("apgd_targeted", model, x, y, eps, steps, norm, loss + "-targeted", restarts, rho, targets_of,
                n_target_classes, seed)


class APGD(Attack):
    """torchattacks-style APGD: ``APGD(model, norm='Linf', eps=8/255, steps=10, n_restarts=1, seed=0,
    loss='ce', rho=.75)``."""

    def __init__(self, model, norm="Linf", eps=8 / 255, steps=10, n_restarts=1, seed=0, loss="ce", rho=0.75):
        super().__init__(model)
        self.norm, self.eps, self.steps, self.n_restarts = norm.lower(), eps, steps, n_restarts
        self.seed, self.loss, self.rho = seed, loss, rho

    def forward(self, images, labels):
        return apgd(self.model, images, labels, self.eps, self.steps, self.norm, self.loss, self.n_restarts,
                    self.rho, self.seed)


class APGDT(Attack):
    """torchattacks-style APGD-T (targeted DLR): ``APGDT(model, norm='Linf', eps=8/255, steps=10,
    n_restarts=1, seed=0, n_classes=10)``; attacks ``n_classes - 1`` target classes."""

    def __init__(self, model, norm="Linf", eps=8 / 255, steps=10, n_restarts=1, seed=0, rho=0.75, n_classes=10):
        super().__init__(model)
        self.norm, self.eps, self.steps, self.n_restarts = norm.lower(), eps, steps, n_restarts
        self.seed, self.rho, self.n_target_classes = seed, rho, n_classes - 1

    def forward(self, images, labels):
        return apgd_targeted(self.model, images, labels, self.eps, self.steps, self.norm, "dlr",
                             self.n_target_classes, self.n_restarts, self.rho, self.seed)
