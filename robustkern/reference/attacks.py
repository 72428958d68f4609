"""Pure-PyTorch ground truth for the attack ops, and an independent plain PGD to compare attacks against.

The projected-gradient step (Madry et al. 2018, "Towards Deep Learning Models Resistant to Adversarial
Attacks", Eq. 2), for a batch of rows ``b`` with radius ``eps_b`` and step ``alpha_b``:

    L-inf:  x' = clip_[0,1]( Pi_{|x' - x0|_inf <= eps}( x + alpha sign(g) ) )
            Pi = element-wise min(max(., x0 - eps), x0 + eps)
    L2:     u  = g / (|g|_2 + 1e-10)                         (per-row norm; 1e-10 as torchattacks' PGDL2)
            d  = x + alpha u - x0
            x' = clip_[0,1]( x0 + d * min(1, eps / |d|_2) )

``pgd_step`` is the reference of ``robustkern::pgd_step`` (same signature, float64-capable, differentiable
with PyTorch's autograd, which the op's backward pass uses). ``plain_pgd`` is a deliberately ordinary eager
PGD in the style of torchattacks' ``PGD``/``PGDL2`` (mean cross-entropy, ``torch.autograd.grad`` w.r.t. the
input, one restart): the baseline the tests and benchmarks compare ``robustkern.attacks.pgd`` with.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import L2_DIV_EPS

__all__ = ["pgd_step", "plain_pgd", "L2_DIV_EPS"]


def _rows(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((-1,) + (1,) * (ndim - 1))


def pgd_step(x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps: Tensor, alpha: Tensor, norm: str) -> Tensor:
    """One projected step (module docstring). ``x_adv, grad, x_orig`` (B, ...); ``eps, alpha`` (B,)."""
    nd = x_adv.dim()
    e, a = _rows(eps, nd), _rows(alpha, nd)
    if norm == "linf":
        y = x_adv + a * torch.sign(grad)
        y = torch.min(torch.max(y, x_orig - e), x_orig + e)
        return y.clamp(0.0, 1.0)
    if norm == "l2":
        gn = torch.linalg.vector_norm(grad.flatten(1), dim=1) + L2_DIV_EPS
        d = x_adv + a * (grad / _rows(gn, nd)) - x_orig
        dn = _rows(torch.linalg.vector_norm(d.flatten(1), dim=1), nd)
        big = dn > e
        factor = torch.where(big, e / torch.where(big, dn, torch.ones_like(dn)), torch.ones_like(dn))
        return (x_orig + d * factor).clamp(0.0, 1.0)
    raise ValueError(f"pgd_step: norm must be 'linf' or 'l2', got {norm!r}")


def plain_pgd(model, images: Tensor, labels: Tensor, eps: float, alpha: float, steps: int,
              norm: str = "linf", random_start: bool = True) -> Tensor:
    """Plain eager PGD (torchattacks-like): random start, ``steps`` ascent steps on the mean cross-entropy,
    projection after each step. The model's mode is left as it is."""
    images = images.detach()
    adv = images.clone()
    b = images.shape[0]
    if random_start:
        if norm == "linf":
            adv = (adv + torch.empty_like(adv).uniform_(-eps, eps)).clamp(0, 1)
        else:
            delta = torch.empty_like(adv).normal_()
            n = delta.reshape(b, -1).norm(p=2, dim=1).reshape((b,) + (1,) * (adv.dim() - 1))
            r = torch.zeros_like(n).uniform_(0, 1)
            adv = (adv + delta * r / n * eps).clamp(0, 1)
    for _ in range(steps):
        adv.requires_grad_(True)
        loss = F.cross_entropy(model(adv), labels)
        grad, = torch.autograd.grad(loss, adv)
        with torch.no_grad():
            if norm == "linf":
                adv = adv + alpha * grad.sign()
                delta = torch.clamp(adv - images, -eps, eps)
            else:
                gn = grad.flatten(1).norm(p=2, dim=1) + L2_DIV_EPS
                adv = adv + alpha * grad / gn.reshape((b,) + (1,) * (adv.dim() - 1))
                delta = adv - images
                dn = delta.reshape(b, -1).norm(p=2, dim=1)
                factor = torch.clamp(eps / dn, max=1.0).reshape((b,) + (1,) * (adv.dim() - 1))
                delta = delta * factor
            adv = torch.clamp(images + delta, 0, 1).detach()
    return adv
