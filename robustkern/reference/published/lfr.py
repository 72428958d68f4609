"""Reference for the flatness losses: a line-by-line transcription of the LFR training step of Xu et al.,
"Adversarial Defense via Local Flatness Regularization" (ICIP 2020; Uooga/Local-Flatness-Regularization
``loss_function/LFR_loss.py``), written independently of ``robustkern.flatness`` (plain autograd, no robustkern
op), with the start noise passed in instead of drawn on the GPU and the cross-entropy fixed (upstream's
default ``criterion``). Side effects as upstream: the model is put in eval mode for the search and left in train
mode, ``optimizer.zero_grad()`` is called when an optimizer is given, and both train-mode forwards update
BatchNorm running statistics. Upstream's debugging prints are left out.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["lfr_loss_reference"]


def _l1_per_example(g: Tensor) -> Tensor:
    return g.abs().flatten(1).sum(1)


def lfr_loss_reference(model, x_natural: Tensor, y: Tensor, lambada: float, noise: Tensor, optimizer=None,
                       step_size: float = 0.007, epsilon: float = 0.031, perturb_steps: int = 7):
    """Upstream's ``LFR_loss``: returns ``(loss, loss_normal, loss_grad, grad_part)`` with
    ``loss = loss_normal + grad_part``, ``grad_part = lambada * loss_grad``; ``noise`` ~ N(0, I), shape of x."""
    model.eval()
    x_adv = torch.clamp(x_natural.detach() + 0.001 * noise.detach(), 0.0, 1.0)
    for _ in range(perturb_steps):
        x_adv.requires_grad_()
        with torch.enable_grad():
            mean_ce = F.cross_entropy(model(x_adv), y)
            g = torch.autograd.grad(mean_ce, x_adv, create_graph=True, retain_graph=True)[0]
            gradient_loss = _l1_per_example(g).mean()        # g is the gradient of the *mean* CE
        direction = torch.autograd.grad(gradient_loss, x_adv)[0]
        x_adv = x_adv.detach() + step_size * torch.sign(direction.detach())
        x_adv = torch.min(torch.max(x_adv, x_natural - epsilon), x_natural + epsilon)
        x_adv = torch.clamp(x_adv, 0.0, 1.0)

    model.train()
    if optimizer is not None:
        optimizer.zero_grad()
    loss_normal = F.cross_entropy(model(x_natural), y)
    x_adv.requires_grad_()
    mean_ce = F.cross_entropy(model(x_adv), y)
    g = torch.autograd.grad(mean_ce, x_adv, create_graph=True, retain_graph=True)[0]
    loss_grad = _l1_per_example(g).mean() * x_adv.size(0)    # upstream: "multiply batch size"
    grad_part = lambada * loss_grad
    return loss_normal + grad_part, loss_normal, loss_grad, grad_part
