"""Local flatness regularisation (Xu, Li, Jiang, Xia, "Adversarial Defense via Local Flatness Regularization",
ICIP 2020; code: Uooga/Local-Flatness-Regularization ``loss_function/LFR_loss.py``).

"Local flatness" at an example is the largest norm of the input gradient of the loss over an eps-ball around it.
With ``ell_i(x) = CE(f(x), y_i)`` and ``g_i(x) = grad_x ell_i(x)`` the training loss is

    loss = CE(f(x), y) + lam * mean_i ||g_i(x'_i)||_p,     x' ~ argmax_{x' in B(x, eps) cap [0,1]^d} ||g(x')||_p

with the maximiser estimated by ``perturb_steps`` sign-gradient ascent steps (L-inf ball, p = 1, the dual norm,
as published):

    x'_0 = clip_[0,1](x + 0.001 n),  n ~ N(0, I)
    x'_{k+1} = clip_[0,1](Pi_{B(x, eps)}(x'_k + step_size sign(d_k))),  d_k = d/dx' sum_i ||g_i(x'_k)||_p

``d_k`` needs a second derivative: double backprop through ``g`` (the original), or, for the piecewise-linear
models ``robustkern.flatness.fused`` supports, ``J^T (diag p - p p^T) J v`` with no stored second-order graph
(``fused.lfr_ascent_direction``). The outer penalty ``mean_i ||g_i(x')||_p`` is trained by double backprop
(through robustkern ops when the fused path supports the model in its outer mode). ``norm="l_2"`` gives the L2
variant: ascent on ``||g||_2`` with normalised-gradient steps in the L2 ball (the upstream ``--norm`` flag exists
but is never used; this is the natural reading of it).

BatchNorm. The published CIFAR-10 run (ResNet-20, lam 0.03) collapses to chance test accuracy around epoch 200
while train accuracy rises: the inner search runs in eval mode (running statistics), the penalty and the clean
loss in train mode (batch statistics), and every train-mode forward updates the running statistics. The modes
are explicit here: ``inner_mode`` (``"eval"`` as published, ``"train"``, or ``"keep"`` the caller's modes),
``outer_mode`` (``"keep"``: the caller's modes, ``"train"``, ``"eval"``) and ``bn_stats``: which train-mode
forwards may update BatchNorm running statistics: ``"clean"`` (default: only the clean forward of the outer
loss), ``"all"`` (every forward, as published), ``"none"``.

``faithful=True`` reproduces ``LFR_loss``'s side effects: ``model.eval()`` for the search, then
``model.train()`` (the model is left in train mode), ``optimizer.zero_grad()`` inside when an optimizer is
given, every train-mode forward updates BatchNorm statistics (``inner_mode="eval", outer_mode="train",
bn_stats="all"``). Without it the caller's train/eval modes are restored on return. The values agree with the
transcription ``robustkern.reference.published.lfr.lfr_loss_reference`` given the same noise (tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops.attacks import pgd_step
from .grad_norm import (BACKENDS, NORMS, _check_choice, _check_inputs, _check_labels, _check_positive,
                        _input_gradient, _norm, _use_fused, frozen_bn_stats)

__all__ = ["lfr_loss", "lfr_perturb", "standard_normal", "frozen_bn_stats"]

_THREATS = {"l_inf": "linf", "linf": "linf", "l_2": "l2", "l2": "l2"}
_DUAL = {"linf": 1, "l2": 2}
_INNER_MODES = ("eval", "train", "keep")
_OUTER_MODES = ("keep", "train", "eval")
_BN_STATS = ("clean", "all", "none")


# ----------------------------------------------------------------------------------------------- helpers
def standard_normal(like: Tensor, noise: Tensor | None = None, generator: torch.Generator | None = None,
                    seed: int | None = None) -> Tensor:
    """``noise`` (checked against ``like``), else N(0, I) drawn from ``generator``, else from a generator seeded
    with ``seed``, else from the global RNG; dtype and device of ``like``."""
    if noise is not None:
        if not isinstance(noise, Tensor) or noise.shape != like.shape:
            raise ValueError(f"noise must be a tensor of the input's shape {tuple(like.shape)}, got "
                             f"{tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__}")
        return noise.detach().to(like.dtype).to(like.device)
    if generator is None and seed is not None:
        generator = torch.Generator(device=like.device).manual_seed(int(seed))
    return torch.randn(like.shape, generator=generator, dtype=like.dtype, device=like.device)


def _modes(model: nn.Module):
    return [(m, m.training) for m in model.modules()]


def _restore(modes) -> None:
    for m, t in modes:
        m.training = t


def _set_mode(model: nn.Module, mode: str) -> None:
    if mode == "train":
        model.train()
    elif mode == "eval":
        model.eval()


def _ascent_direction(model: nn.Module, x_adv: Tensor, y: Tensor, p: int, backend: str) -> Tensor:
    """``d/dx' sum_i ||g_i(x')||_p`` with no graph kept (fused when supported, else double backprop)."""
    if _use_fused(model, backend):
        from . import fused

        return fused.lfr_ascent_direction(model, x_adv.detach(), y, p)
    with torch.enable_grad():
        xa = x_adv.detach().requires_grad_(True)
        _, g = _input_gradient(model, xa, y, create_graph=True, backend="torch")
        d, = torch.autograd.grad(_norm(g, p).sum(), xa)
    return d


def _check_budget(fn, x, epsilon, step_size, perturb_steps):
    eps = _check_positive(fn, "epsilon", epsilon, strict=False)
    alpha = _check_positive(fn, "step_size", step_size)
    if not isinstance(perturb_steps, int) or isinstance(perturb_steps, bool) or perturb_steps < 0:
        raise ValueError(f"{fn}: perturb_steps must be an integer >= 0, got {perturb_steps!r}")
    if x.numel() and (float(x.min()) < 0.0 or float(x.max()) > 1.0):
        raise ValueError(f"{fn}: x must lie in [0, 1] (the search clamps to the image box), got values in "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return eps, alpha


def _threat(fn: str, norm: str, p):
    if norm not in _THREATS:
        raise ValueError(f"{fn}: norm must be one of {tuple(_THREATS)}, got {norm!r}")
    threat = _THREATS[norm]
    p = _DUAL[threat] if p is None else p
    _check_choice(fn, "p", p, NORMS)
    return threat, p


# ----------------------------------------------------------------------------------------------- public API
def lfr_perturb(model: nn.Module, x: Tensor, y: Tensor, epsilon: float = 0.031, step_size: float = 0.007,
                perturb_steps: int = 10, *, norm: str = "l_inf", p: int | None = None, noise: Tensor | None = None,
                generator: torch.Generator | None = None, seed: int | None = None, backend: str = "auto") -> Tensor:
    """The inner search of LFR (module docstring) in the model's current mode: returns ``x'`` (detached),
    a point of ``B(x, epsilon) cap [0,1]^d`` with a large ``||grad_x CE||_p``. ``p`` defaults to the dual of
    ``norm`` (1 for L-inf, 2 for L2). No parameter ``.grad`` and no BatchNorm running statistic is touched."""
    fn = "lfr_perturb"
    y = _check_inputs(fn, model, x, y)
    _check_choice(fn, "backend", backend, BACKENDS)
    threat, p = _threat(fn, norm, p)
    eps, alpha = _check_budget(fn, x, epsilon, step_size, perturb_steps)
    with frozen_bn_stats(model):
        return _search(model, x.detach(), y, eps, alpha, perturb_steps, threat, p,
                       standard_normal(x, noise, generator, seed), backend)


def _search(model, x, y, eps, alpha, steps, threat, p, noise, backend):
    x_adv = (x + 0.001 * noise).clamp(0.0, 1.0)
    for _ in range(steps):
        d = _ascent_direction(model, x_adv, y, p, backend)
        x_adv = pgd_step(x_adv, d.to(x_adv.dtype), x, eps, alpha, threat)
    return x_adv.detach()


def lfr_loss(model: nn.Module, x: Tensor, y: Tensor, epsilon: float = 0.031, step_size: float = 0.007,
             perturb_steps: int = 10, lam: float = 1.0, *, norm: str = "l_inf", p: int | None = None,
             noise: Tensor | None = None, generator: torch.Generator | None = None, seed: int | None = None,
             inner_mode: str = "eval", outer_mode: str = "keep", bn_stats: str = "clean", backend: str = "auto",
             faithful: bool = False, optimizer=None, return_adv: bool = False):
    """LFR training loss (module docstring). Returns ``(loss, loss_natural, loss_grad)`` (and ``x'`` when
    ``return_adv``): ``loss_natural = CE(f(x), y)`` (mean), ``loss_grad = mean_i ||grad_x CE(f(x'_i), y_i)||_p``
    (upstream's ``loss_grad``, the batch mean of per-example norms), ``loss = loss_natural + lam * loss_grad``.
    Arguments as upstream's ``LFR_loss`` (``lam`` is its ``lambada``; defaults are its CIFAR-10 ones, MNIST uses
    epsilon 0.3, step_size 0.01, 40 steps, lam 0.02). ``noise`` (shape of ``x``), ``generator`` or ``seed``
    fixes the start ``x + 0.001 noise``. ``backend``: ``"auto"``, ``"torch"``, ``"fused"``. ``inner_mode``,
    ``outer_mode``, ``bn_stats``, ``faithful`` and ``optimizer`` (faithful only): module docstring."""
    fn = "lfr_loss"
    y = _check_inputs(fn, model, x, y)
    _check_choice(fn, "backend", backend, BACKENDS)
    _check_choice(fn, "inner_mode", inner_mode, _INNER_MODES)
    _check_choice(fn, "outer_mode", outer_mode, _OUTER_MODES)
    _check_choice(fn, "bn_stats", bn_stats, _BN_STATS)
    threat, p = _threat(fn, norm, p)
    eps, alpha = _check_budget(fn, x, epsilon, step_size, perturb_steps)
    lam = _check_positive(fn, "lam", lam, strict=False)
    if optimizer is not None and not faithful:
        raise ValueError(f"{fn}: optimizer is only used by faithful=True (upstream zeroes its gradients inside "
                         f"the loss); zero them in the training loop instead")
    if faithful:
        inner_mode, outer_mode, bn_stats = "eval", "train", "all"
    x = x.detach()
    start = standard_normal(x, noise, generator, seed)

    modes = _modes(model)
    try:
        _set_mode(model, inner_mode)
        with frozen_bn_stats(model, active=bn_stats != "all"):
            x_adv = _search(model, x, y, eps, alpha, perturb_steps, threat, p, start, backend)
    finally:
        if not faithful:
            _restore(modes)

    if faithful:
        model.train()
        if optimizer is not None:
            optimizer.zero_grad()
    outer_modes = _modes(model)
    try:
        _set_mode(model, outer_mode)
        with frozen_bn_stats(model, active=bn_stats == "none"):
            logits = model(x)
        _check_labels(fn, logits, y)
        loss_natural = F.cross_entropy(logits, y)
        with frozen_bn_stats(model, active=bn_stats != "all"):
            _, g = _input_gradient(model, x_adv, y, create_graph=True, backend=backend)
    finally:
        if not faithful:
            _restore(outer_modes)
    loss_grad = _norm(g, p).mean()
    loss = loss_natural + lam * loss_grad
    return (loss, loss_natural, loss_grad, x_adv) if return_adv else (loss, loss_natural, loss_grad)
