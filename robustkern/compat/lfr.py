"""Local Flatness Regularization's training loss on robustkern (Xu, Li, Jiang, Xia, ICIP 2020, "Adversarial
Defense via Local Flatness Regularization"; Uooga/Local-Flatness-Regularization ``loss_function/LFR_loss.py``):
its ``MNIST_defense.py`` / ``cifar_defense.py`` run with the import changed to::

    from robustkern.compat.lfr import LFR_loss        # was: from loss_function.LFR_loss import LFR_loss

``LFR_loss(model, x_natural, y, lambada, optimizer, criterion=nn.CrossEntropyLoss(), step_size=0.007,
epsilon=0.031, perturb_steps=7)`` returns the original's four values ``(loss, loss_normal, loss_grad,
grad_part)``: ``loss_normal = CE(f(x), y)``, ``loss_grad`` the batch mean of ``||grad_x CE(f(x'_i), y_i)||_1``
at the point ``x'`` the sign-gradient search finds in the eps-box (the original's "multiply batch size" turns
its gradient of the mean loss into that), ``grad_part = lambada * loss_grad`` and ``loss = loss_normal +
grad_part``. It is ``robustkern.flatness.lfr_loss(..., faithful=True)``: the original's side effects
(``model.eval()`` for the search, ``model.train()`` after, ``optimizer.zero_grad()`` inside, every train-mode
forward updating BatchNorm statistics), with the search's input-gradient products fused where the model allows.
The start ``x + 0.001 r`` draws ``r = torch.randn(x.shape)`` from the CPU generator, as the original, so
``torch.manual_seed`` replays its step. The original's three prints per call are kept (``verbose=False`` turns
them off).

What differs: ``criterion`` must be the cross-entropy the original uses (an ``nn.CrossEntropyLoss`` with mean
reduction, no class weights, no label smoothing); another criterion raises. Inputs must lie in [0, 1].
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..flatness import lfr_loss

__all__ = ["LFR_loss"]


def _check_criterion(criterion) -> None:
    ok = (isinstance(criterion, nn.CrossEntropyLoss) and criterion.reduction == "mean" and criterion.weight is None
          and criterion.label_smoothing == 0.0)
    if not ok:
        raise NotImplementedError(f"LFR_loss: criterion must be nn.CrossEntropyLoss() (mean reduction, no weight, "
                                  f"no label smoothing), as the original's default; got {criterion!r}")


def LFR_loss(model: nn.Module, x_natural: Tensor, y: Tensor, lambada: float, optimizer,  # noqa: N802 - its name
             criterion: nn.Module = nn.CrossEntropyLoss(), step_size: float = 0.007, epsilon: float = 0.031,
             perturb_steps: int = 7, *, verbose: bool = True):
    """``(loss, loss_normal, loss_grad, grad_part)`` of the original ``LFR_loss`` (module docstring)."""
    _check_criterion(criterion)
    start = torch.randn(x_natural.shape).to(x_natural)      # the original's CPU draw, then moved
    loss, loss_normal, loss_grad = lfr_loss(model, x_natural, y, epsilon=epsilon, step_size=step_size,
                                            perturb_steps=perturb_steps, lam=lambada, noise=start, faithful=True,
                                            optimizer=optimizer)
    grad_part = lambada * loss_grad
    if verbose:
        print("loss normal", loss_normal)
        print("loss grad in iteration", loss_grad)
        print("loss_adversarial", loss)
    return loss, loss_normal, loss_grad, grad_part
