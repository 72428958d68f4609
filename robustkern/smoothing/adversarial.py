"""Smoothing-based training losses: SmoothAdv (Salman et al. 2019), TRADES + random smoothing (Blum et al.
2020) and consistency regularisation (Jeong & Shin 2020).

Every function takes the images ``x`` (B, C, ...) in pixel space [0, 1] (normalisation belongs inside the
model), integer labels ``y`` (B,) and the noise level ``sigma``. The noise is ``noise`` when given (already
scaled by sigma; ``seed``/``generator`` then drive only the other random draws: random starts and the
directions of zero-gradient steps), else drawn by :func:`robustkern.smoothing.augment.gaussian_noise` from ``seed``
(counter-based, replayable) or ``generator`` (torch). Noise with several copies per image is (B, m, C, ...).
Each loss returns ``(loss, parts)``: the scalar training loss (differentiable in the model's parameters) and a
dict of detached tensors (logits, adversarial images, loss terms).

Speed, compared with the original training scripts (``robustkern.reference.published.smooth_train`` transcribes them):
the attacks differentiate with respect to the perturbation only (``torch.autograd.grad``, parameters'
``requires_grad`` switched off for the attack and restored after, so no weight gradients are built), the m
noisy copies of an image share one forward and are formed by broadcasting ``x + delta`` (no repeated images),
nothing is computed that the loss does not use, and TRADES+RS evaluates the fixed natural prediction once
instead of once per PGD step, and the natural branch once instead of twice.

``faithful=True`` reproduces the originals' side effects where the fast default differs: the model is left in
train mode after the loss (the originals call ``model.train()``), every parameter has ``requires_grad=True``
afterwards (SmoothAdv's ``requires_grad_(model, True)``), and TRADES+RS runs its duplicated natural forward in
train mode, so BatchNorm running statistics are updated three times per step (natural, adversarial, natural)
instead of twice. The fast default restores the caller's mode and flags and runs the training forward in the
caller's mode. For a model that was in train mode and has no dropout, the two modes give the
same loss and gradients (TRADES+RS up to rounding: its natural branch's gradient is summed at the logits
instead of through two forwards); what differs is the BatchNorm running statistics (TRADES+RS) and the
mode and flags left behind.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import (STREAM_TRADES_INIT, STREAM_ZERO_GRAD, check_images, check_seed, check_sigma,
                      gaussian_noise, philox_normal)

__all__ = ["smoothadv_attack", "smoothadv_loss", "smoothadv_warmup_eps", "trades_rs_loss", "consistency_loss"]


# ----------------------------------------------------------------------------------------------- checks
def _check_common(fn: str, model, x: Tensor, y: Tensor, sigma) -> float:
    if not isinstance(model, nn.Module) and not callable(model):
        raise TypeError(f"{fn}: model must be a torch.nn.Module or callable, got {type(model).__name__}")
    check_images(x, fn)
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ValueError(f"{fn}: y must be int64 labels of shape ({x.shape[0]},), got "
                         f"{(tuple(y.shape), y.dtype) if isinstance(y, Tensor) else type(y).__name__}")
    if x.shape[0] == 0:
        raise ValueError(f"{fn}: empty batch")
    return check_sigma(sigma, fn)


def _check_range(fn: str, x: Tensor) -> None:
    if bool(x.min() < 0) or bool(x.max() > 1):
        raise ValueError(f"{fn}: input values should be in the [0, 1] range (pixel space; put the "
                         f"normalisation inside the model)")


def _check_eps_steps(fn: str, epsilon, num_steps) -> tuple[float, int]:
    eps = float(epsilon)
    if not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{fn}: epsilon must be >= 0 and finite, got {epsilon}")
    if isinstance(num_steps, bool) or int(num_steps) != num_steps or int(num_steps) < 1:
        raise ValueError(f"{fn}: num_steps must be an integer >= 1, got {num_steps}")
    return eps, int(num_steps)


def _check_copies(fn: str, m) -> int:
    if isinstance(m, bool) or int(m) != m or int(m) < 1:
        raise ValueError(f"{fn}: the number of noise copies must be an integer >= 1, got {m}")
    return int(m)


def _noise(fn: str, x: Tensor, sigma: float, m: Optional[int], noise, seed, generator) -> Tensor:
    """The (B, m, ...) noise (or x-shaped when m is None): the given tensor, checked, or a fresh draw."""
    shape = tuple(x.shape) if m is None else (x.shape[0], m) + tuple(x.shape[1:])
    if seed is not None and generator is not None:
        raise ValueError(f"{fn}: give seed or generator, not both")
    if noise is not None:  # seed/generator then only drive the other draws (random starts, zero-gradient steps)
        if tuple(noise.shape) != shape:
            raise ValueError(f"{fn}: noise must have shape {shape}, got {tuple(noise.shape)}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError(f"{fn}: noise contains NaN or inf")
        return noise.to(x.dtype)
    return gaussian_noise(x, sigma, m, seed=seed, generator=generator)


def _epsilon(fn: str, epsilon, eps_units) -> float:
    if eps_units is None:
        return float(epsilon)
    if str(eps_units) == "256":
        return float(epsilon) / 256.0  # train_pgd.py: args.epsilon /= 256.0
    raise ValueError(f"{fn}: eps_units must be None (pixel L2 units) or '256' (SmoothAdv's 1/256 units), "
                     f"got {eps_units!r}")


@contextlib.contextmanager
def _attack_mode(model: nn.Module):
    """Eval mode and no parameter gradients for an attack; the caller's mode and flags are restored after."""
    is_module = isinstance(model, nn.Module)
    params = list(model.parameters()) if is_module else []
    flags = [p.requires_grad for p in params]
    modes = [(mod, mod.training) for mod in model.modules()] if is_module else []
    for p in params:
        p.requires_grad_(False)
    if is_module:
        model.eval()
    try:
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        for mod, training in modes:  # per module: a frozen BatchNorm inside a training model stays frozen
            mod.training = training


def _faithful_after_attack(model: nn.Module, unfreeze: bool) -> None:
    """What the originals do after the attack: ``model.train()``, and with ``unfreeze`` (train_pgd.py)
    ``requires_grad_(model, True)``."""
    if isinstance(model, nn.Module):
        model.train()
        if unfreeze:
            for p in model.parameters():
                p.requires_grad_(True)


def _l2_step(delta: Tensor, grad: Tensor, lr: float, step: int, seed, generator) -> Tensor:
    """Ascent step of PGD-L2 as the originals take it: SGD with learning rate ``lr`` on the negated loss, whose
    gradient is replaced by its per-example unit-normalised version, so ``delta + lr grad / ||grad||``; an
    example whose gradient is exactly 0 gets the SGD gradient ``r ~ N(0, I)`` (unnormalised, ``torch.randn``
    in the originals), i.e. moves to ``delta - lr r``."""
    b = grad.shape[0]
    norms = grad.reshape(b, -1).norm(p=2, dim=1)
    unit = grad / norms.view((-1,) + (1,) * (grad.dim() - 1))
    zero = norms == 0
    if bool(zero.any()):
        idx = zero.nonzero().squeeze(1)
        if seed is not None:
            rand = philox_normal(grad, idx, torch.full_like(idx, step), STREAM_ZERO_GRAD, seed, 1.0).to(grad.dtype)
        else:
            rand = torch.randn((idx.numel(),) + tuple(grad.shape[1:]), generator=generator, dtype=grad.dtype,
                               device=grad.device)
        unit[zero] = -rand
    return delta.add(unit, alpha=lr)


def _project(delta: Tensor, x: Tensor, eps: float) -> Tensor:
    """Clamp x + delta to [0, 1], then scale delta into the L2 ball (``Tensor.renorm``, as the originals)."""
    return (delta + x).clamp_(0, 1).sub_(x).renorm_(p=2, dim=0, maxnorm=eps)


# ----------------------------------------------------------------------------------------------- SmoothAdv
def smoothadv_warmup_eps(epoch: int, warmup: int, epsilon: float) -> float:
    """SmoothAdv's linear epsilon warm-up (train_pgd.py): ``min(epsilon, (epoch + 1) * epsilon / warmup)`` for
    the 0-based ``epoch``; ``warmup = 1`` means no warm-up."""
    if isinstance(warmup, bool) or int(warmup) != warmup or int(warmup) < 1:
        raise ValueError(f"smoothadv_warmup_eps: warmup must be an integer >= 1, got {warmup}")
    if int(epoch) != epoch or epoch < 0:
        raise ValueError(f"smoothadv_warmup_eps: epoch must be an integer >= 0, got {epoch}")
    if not float(epsilon) >= 0:
        raise ValueError(f"smoothadv_warmup_eps: epsilon must be >= 0, got {epsilon}")
    return float(min(float(epsilon), (int(epoch) + 1) * float(epsilon) / int(warmup)))


def _smoothadv_pgd(model, x: Tensor, y: Tensor, noise: Tensor, eps: float, steps: int, seed, generator) -> Tensor:
    """PGD-L2 on the soft smoothed classifier (the model's mode and flags are set by the caller)."""
    b, m = noise.shape[:2]
    lr = eps / steps * 2
    delta = torch.zeros_like(x)
    for t in range(steps):
        delta.requires_grad_(True)
        adv = (x + delta).unsqueeze(1) + noise  # (B, m, ...): the m copies share one delta
        logits = model(adv.reshape((b * m,) + tuple(x.shape[1:])))
        if m == 1:  # PGD_L2._attack: plain cross-entropy on f(x + delta + noise), summed
            loss = F.cross_entropy(logits, y, reduction="sum")
        else:  # PGD_L2._attack_mutlinoise: NLL of the averaged softmax, log clamped at 1e-20
            avg = F.softmax(logits, dim=1).reshape(b, m, -1).mean(1)
            loss = F.nll_loss(torch.log(avg.clamp(min=1e-20)), y)
        (grad,) = torch.autograd.grad(loss, delta)
        with torch.no_grad():
            delta = _project(_l2_step(delta.detach(), grad, lr, t, seed, generator), x, eps)
    return (x + delta).detach()


def smoothadv_attack(model, x: Tensor, y: Tensor, sigma: float, epsilon: float, num_steps: int,
                     num_noise_vec: int = 1, *, noise: Optional[Tensor] = None, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, eps_units: Optional[str] = None) -> Tensor:
    """SmoothAdv's attack (Salman et al. 2019, "Provably Robust Deep Learning via Adversarially Trained
    Smoothed Classifiers", Hadisalman/smoothing-adversarial ``code/attacks.py`` ``PGD_L2``): PGD in the L2
    ball of radius ``epsilon`` on the soft smoothed classifier estimated with m = ``num_noise_vec`` noise draws
    ``n_1..n_m`` (B, m, ...) fixed for all T = ``num_steps`` steps, one perturbation per image shared by its m
    copies, started at 0:

        J(delta) = -log( max(1e-20, (1/m) sum_j softmax(f(x + delta + n_j))_y) )     (m = 1: CE of f(x+delta+n))
        delta <- delta + (2 eps / T) grad J / ||grad J||_2        (a random normal direction if grad J = 0)
        delta <- renorm_eps( clamp(x + delta, 0, 1) - x )

    The model runs in eval mode without parameter gradients during the attack (as train_pgd.py sets it), its
    mode and flags restored after. ``eps_units="256"`` reads ``epsilon`` in SmoothAdv's 1/256 units (64 ->
    0.25). Returns the adversarial images x + delta (B, C, ...); x must lie in [0, 1]."""
    eps, steps, m, noise, seed = _smoothadv_setup("smoothadv_attack", model, x, y, sigma, epsilon, eps_units,
                                                  num_steps, num_noise_vec, noise, seed, generator)
    with _attack_mode(model):
        return _smoothadv_pgd(model, x, y, noise, eps, steps, seed, generator)


def _smoothadv_setup(fn, model, x, y, sigma, epsilon, eps_units, num_steps, num_noise_vec, noise, seed, generator):
    """Checks shared by the SmoothAdv entry points; ``(eps, steps, m, noise (B, m, ...), seed)``."""
    sigma = _check_common(fn, model, x, y, sigma)
    eps, steps = _check_eps_steps(fn, _epsilon(fn, epsilon, eps_units), num_steps)
    m = _check_copies(fn, num_noise_vec)
    _check_range(fn, x)
    if seed is not None:
        seed = check_seed(seed, fn)
    return eps, steps, m, _noise(fn, x, sigma, m, noise, seed, generator), seed


def smoothadv_loss(model, x: Tensor, y: Tensor, sigma: float, epsilon: float, num_steps: int,
                   num_noise_vec: int = 1, *, train_multi_noise: bool = True, eps_units: Optional[str] = None,
                   faithful: bool = False, noise: Optional[Tensor] = None, seed: Optional[int] = None,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, dict]:
    """SmoothAdv's training loss for one of train_pgd.py's mini-batches (``--adv-training --attack PGD``):
    attack with :func:`smoothadv_attack` (the same m noise draws), then in the caller's mode (train mode when
    ``faithful``) the cross-entropy

        train_multi_noise:      mean over all B*m copies of CE(f(x_adv + n_j), y)
        not train_multi_noise:  mean over the B images of CE(f(x_adv + n_1), y)   (the first draw only)

    Batch composition: train_pgd.py splits each loader batch of 256 into m mini-batches of 256/m images and,
    with ``--train-multi-noise``, takes one optimizer step per mini-batch; to reproduce it call this once per
    optimizer step on 256/m images. Without multi-noise it takes one step per loader batch, which equals one
    call on the whole batch (the eval-mode attack treats images independently). The epsilon warm-up is the
    caller's: ``epsilon = smoothadv_warmup_eps(epoch, warmup, eps)``. ``parts``: ``logits`` ((B, m, K) or
    (B, K)) and ``x_adv``."""
    eps, steps, m, noise, seed = _smoothadv_setup("smoothadv_loss", model, x, y, sigma, epsilon, eps_units,
                                                  num_steps, num_noise_vec, noise, seed, generator)
    with _attack_mode(model):
        x_adv = _smoothadv_pgd(model, x, y, noise, eps, steps, seed, generator)
    if faithful:
        _faithful_after_attack(model, unfreeze=True)
    if train_multi_noise:
        b = x.shape[0]
        logits = model((x_adv.unsqueeze(1) + noise).reshape((b * m,) + tuple(x.shape[1:])))
        loss = F.cross_entropy(logits, y.repeat_interleave(m))
        logits = logits.reshape(b, m, -1)
    else:
        logits = model(x_adv + noise[:, 0])
        loss = F.cross_entropy(logits, y)
    return loss, {"logits": logits.detach(), "x_adv": x_adv}


# ----------------------------------------------------------------------------------------------- TRADES + RS
def _kl_sum(log_q: Tensor, p: Tensor) -> Tensor:
    """sum_{b,k} p (log p - log q): ``nn.KLDivLoss(size_average=False)(log_q, p)``."""
    return F.kl_div(log_q, p, reduction="sum")


def trades_rs_loss(model, x: Tensor, y: Tensor, sigma: float, epsilon: float = 0.435,
                   step_size: Optional[float] = None, num_steps: int = 10, beta: float = 6.0, *,
                   noise: Optional[Tensor] = None, delta_init: Optional[Tensor] = None, seed: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, faithful: bool = False) -> tuple[Tensor, dict]:
    """TRADES + random smoothing (Blum, Dick, Manoj, Zhang 2020, "Random Smoothing Might be Unable to Certify
    L-inf Robustness for High-Dimensional Images", hongyanz/TRADES-smoothing ``code/trades.py``,
    ``distance='l_2'``). ONE noise draw n ~ N(0, sigma^2 I) is shared by the natural and adversarial branches:

        inner (eval mode): delta_0 = 0.001 N(0, I); K = ``num_steps`` steps of
            delta <- delta + a grad KL / ||grad KL||_2,  KL = sum_b KL(softmax f(x+n) || softmax f(x+delta+n))
            delta <- renorm_eps( clamp(x + delta, 0, 1) - x ),     a = ``step_size`` or 2 eps / K (the original's
            step: its ``--step-size`` is not used for L2)
        x' = clamp(x + delta, 0, 1)
        loss = CE(f(x+n), y) + beta (1/B) sum_b KL(softmax f(x+n) || softmax f(x'+n))     (no detach)

    The original uses an all-ones mask (a no-op, left out). The fast default computes softmax f(x+n) of the inner
    problem once (the original recomputes it at every step with the same eval-mode model: the same values) and
    the natural branch of the loss once (the original runs it twice in train mode; the same values and
    gradients without dropout, but BatchNorm running statistics are updated 3 times there, 2 times here;
    ``faithful=True`` runs the third forward, in the original's order). ``delta_init`` (B, C, ...) replaces the
    random start; else it is drawn from ``seed`` or ``generator``. ``parts``: ``logits``, ``logits_adv``,
    ``x_adv``, ``natural`` (the CE) and ``robust`` (the KL term before beta)."""
    fn = "trades_rs_loss"
    sigma = _check_common(fn, model, x, y, sigma)
    eps, steps = _check_eps_steps(fn, epsilon, num_steps)
    lr = eps / steps * 2 if step_size is None else float(step_size)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"{fn}: step_size must be >= 0 and finite, got {step_size}")
    if not math.isfinite(float(beta)):
        raise ValueError(f"{fn}: beta must be finite, got {beta}")
    if seed is not None:
        seed = check_seed(seed, fn)
    noise = _noise(fn, x, sigma, None, noise, seed, generator)
    b = x.shape[0]
    if delta_init is None:
        if seed is not None:
            idx = torch.arange(b, device=x.device)
            delta = philox_normal(x, idx, torch.zeros_like(idx), STREAM_TRADES_INIT, seed, 1.0).to(x.dtype)
            delta = delta.view_as(x) * 0.001
        else:
            delta = 0.001 * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    else:
        if tuple(delta_init.shape) != tuple(x.shape):
            raise ValueError(f"{fn}: delta_init must have x's shape {tuple(x.shape)}, got {tuple(delta_init.shape)}")
        delta = delta_init.to(x.dtype)
    x_noisy = x + noise
    with _attack_mode(model):
        with torch.no_grad():
            p_nat = F.softmax(model(x_noisy), dim=1)
        for t in range(steps):
            delta.requires_grad_(True)
            kl = _kl_sum(F.log_softmax(model((x + delta) + noise), dim=1), p_nat)
            (grad,) = torch.autograd.grad(kl, delta)
            with torch.no_grad():
                delta = _project(_l2_step(delta.detach(), grad, lr, t, seed, generator), x, eps)
    x_adv = torch.clamp(x + delta, 0.0, 1.0).detach()
    if faithful:
        _faithful_after_attack(model, unfreeze=False)
    logits = model(x_noisy)
    natural = F.cross_entropy(logits, y)
    logits_adv = model(x_adv + noise)
    target_logits = model(x_noisy) if faithful else logits
    robust = (1.0 / b) * _kl_sum(F.log_softmax(logits_adv, dim=1), F.softmax(target_logits, dim=1))
    loss = natural + beta * robust
    return loss, {"logits": logits.detach(), "logits_adv": logits_adv.detach(), "x_adv": x_adv,
                  "natural": natural.detach(), "robust": robust.detach()}


# ----------------------------------------------------------------------------------------------- consistency
_CONSISTENCY_FORMS = ("default", "xent", "kl", "mse")


def consistency_loss(model, x: Tensor, y: Tensor, sigma: float, m: int = 2, lbd: float = 10.0, eta: float = 0.5,
                     *, noise: Optional[Tensor] = None, seed: Optional[int] = None,
                     generator: Optional[torch.Generator] = None, form: str = "default") -> tuple[Tensor, dict]:
    """Consistency regularisation (Jeong & Shin 2020, "Consistency Regularization for Certified Robustness of
    Smoothed Classifiers", jh-jeong/smoothing-consistency ``code/train_consistency.py`` + ``consistency.py``)
    for one of its mini-batches. The m noisy copies x + n_j go through one forward (copy-major, as the
    original concatenates them); with p_j = softmax f(x + n_j) and p̄ = (1/m) sum_j p_j (not detached):

        loss = mean_{b,j} CE(f(x_b + n_bj), y_b) + mean_b [ lbd (1/m) sum_j KL(p̄ || p_j) + eta H(p̄) ]
        H(p̄) = -sum_k p̄_k log max(p̄_k, 1e-20)

    ``form``: ``"default"`` (above), ``"xent"`` (lbd (KL + H)), ``"kl"`` (lbd KL), ``"mse"`` (lbd ||p_2 - p_1||²,
    the first two copies). The original splits each loader batch of 256 into m mini-batches of 256/m images with
    one optimizer step each: call this once per step on 256/m images. Paper's CIFAR-10 recipe: m = 2, eta = 0.5,
    lbd = 20 (sigma 0.25) or 10 (sigma 0.5, 1.0). ``parts``: ``logits`` (B, m, K), ``xent``, ``consistency``."""
    fn = "consistency_loss"
    sigma = _check_common(fn, model, x, y, sigma)
    m = _check_copies(fn, m)
    if form not in _CONSISTENCY_FORMS:
        raise ValueError(f"{fn}: form must be one of {_CONSISTENCY_FORMS}, got {form!r}")
    if form == "mse" and m < 2:
        raise ValueError(f"{fn}: form 'mse' needs m >= 2 copies")
    for name, v in (("lbd", lbd), ("eta", eta)):
        if not math.isfinite(float(v)):
            raise ValueError(f"{fn}: {name} must be finite, got {v}")
    noise = _noise(fn, x, sigma, m, noise, seed, generator)
    b = x.shape[0]
    inputs = torch.cat([x + noise[:, j] for j in range(m)])  # copy-major, as the original
    logits = model(inputs)
    xent = F.cross_entropy(logits, y.repeat(m))
    lg = logits.reshape(m, b, -1)
    p = F.softmax(lg, dim=2)
    avg = p.sum(0) / m
    if form == "mse":
        reg = lbd * ((p[1] - p[0]) ** 2).sum(1)
    else:
        kl = F.kl_div(F.log_softmax(lg, dim=2), avg.unsqueeze(0).expand_as(p), reduction="none").sum(2).sum(0) / m
        if form == "kl":
            reg = lbd * kl
        else:
            ent = (-avg * torch.log(avg.clamp(min=1e-20))).sum(1)
            reg = lbd * kl + eta * ent if form == "default" else lbd * (kl + ent)
    reg = reg.mean()
    loss = xent + reg
    return loss, {"logits": lg.transpose(0, 1).detach(), "xent": xent.detach(), "consistency": reg.detach()}
