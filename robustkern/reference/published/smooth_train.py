"""Faithful plain-PyTorch transcriptions of three smoothing-based training losses, for one batch and explicit
noise: the independent ground truth ``robustkern.smoothing.adversarial`` is tested and benchmarked against.

* SmoothAdv (Salman et al. 2019), Hadisalman/smoothing-adversarial @cff781d ``code/train_pgd.py`` (one
  mini-batch of its ``train`` loop with ``--adv-training --attack PGD``) and ``code/attacks.py``
  (``PGD_L2._attack`` for m = 1, ``PGD_L2._attack_mutlinoise`` for m > 1).
* TRADES + random smoothing (Blum et al. 2020), hongyanz/TRADES-smoothing @6a7f7de ``code/trades.py``
  (``trades_loss``, ``distance='l_2'``) as ``code/train_trades.py`` calls it (all-ones mask).
* Consistency regularisation (Jeong & Shin 2020), jh-jeong/smoothing-consistency @a11954a
  ``code/train_consistency.py`` (one mini-batch, no adversarial training) and ``code/consistency.py``.

They keep the originals' computations and side effects (``model.eval()``/``model.train()``, parameters'
``requires_grad`` toggles, SmoothAdv's ``optim.SGD`` on the perturbation, TRADES's per-step recomputation of
the natural prediction, its weight gradients during the attack and its ``optimizer.zero_grad()`` (here
``model.zero_grad()``), its duplicated natural forward). Deviations, none of which changes a value: noise is
given instead of drawn (``noise`` (B, m, C, ...) with ``noise[b, j]`` the j-th draw for image b, laid out as
each original lays it out); random draws (the zero-gradient directions, TRADES's unused ``x_adv`` start and its
``delta`` start, both drawn only when no ``delta_init`` is given) come from ``generator``; tensors are created in ``x``'s dtype and device instead of float32
on CUDA; losses return ``(loss, logits)`` instead of stepping an optimizer.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn, optim

__all__ = ["smoothadv_attack_reference", "smoothadv_loss_reference", "trades_rs_loss_reference",
           "trades_smoothing_loss_reference", "consistency_loss_reference", "requires_grad_"]


def requires_grad_(model: nn.Module, requires_grad: bool) -> None:
    """smoothing-adversarial ``train_utils.requires_grad_``."""
    for param in model.parameters():
        param.requires_grad_(requires_grad)


def _randn_like(t: Tensor, generator) -> Tensor:
    return torch.randn(t.shape, generator=generator, dtype=t.dtype, device=t.device)


def _l2_delta_step(delta: Tensor, sgd, base: Tensor, max_norm: float, generator=None) -> None:
    """The L2 step that SmoothAdv's ``PGD_L2`` and TRADES+RS both write out after ``backward``: each example's
    gradient scaled to unit L2 norm (a zero gradient replaced by a normal draw), the SGD step, then ``delta``
    projected so that ``base + delta`` lies in [0, 1] and ``delta`` in the L2 ball of radius ``max_norm``."""
    grad_norms = delta.grad.reshape(delta.shape[0], -1).norm(p=2, dim=1)
    delta.grad.div_(grad_norms.view((-1,) + (1,) * (delta.dim() - 1)))
    if (grad_norms == 0).any():
        delta.grad[grad_norms == 0] = _randn_like(delta.grad[grad_norms == 0], generator)
    sgd.step()
    delta.data.add_(base)
    delta.data.clamp_(0, 1).sub_(base)
    delta.data.renorm_(p=2, dim=0, maxnorm=max_norm)


# ----------------------------------------------------------------------------------------------- SmoothAdv
def smoothadv_attack_reference(model: nn.Module, inputs: Tensor, labels: Tensor, noise: Tensor, max_norm: float,
                               steps: int, num_noise_vectors: int = 1, generator=None) -> Tensor:
    """``PGD_L2(steps, max_norm=max_norm).attack(model, inputs, labels, noise, num_noise_vectors)``: ``inputs``
    and ``noise`` are (B*m, ...) with the m copies of an image contiguous, ``labels`` (B,) (m > 1) or (B*m,)."""
    if inputs.min() < 0 or inputs.max() > 1:
        raise ValueError('Input values should be in the [0, 1] range.')
    multiplier = -1
    if num_noise_vectors == 1:  # PGD_L2._attack
        delta = torch.zeros_like(inputs, requires_grad=True)
        optimizer = optim.SGD([delta], lr=max_norm / steps * 2)
        for _ in range(steps):
            adv = inputs + delta
            if noise is not None:
                adv = adv + noise
            logits = model(adv)
            ce_loss = F.cross_entropy(logits, labels, reduction='sum')
            loss = multiplier * ce_loss
            optimizer.zero_grad()
            loss.backward()
            _l2_delta_step(delta, optimizer, inputs, max_norm, generator)
        return inputs + delta
    # PGD_L2._attack_mutlinoise
    delta = torch.zeros((len(labels), *inputs.shape[1:]), requires_grad=True, device=inputs.device,
                        dtype=inputs.dtype)
    optimizer = optim.SGD([delta], lr=max_norm / steps * 2)
    for _ in range(steps):
        adv = inputs + delta.repeat(1, num_noise_vectors, 1, 1).view_as(inputs)
        if noise is not None:
            adv = adv + noise
        logits = model(adv)
        softmax = F.softmax(logits, dim=1)
        average_softmax = softmax.reshape(-1, num_noise_vectors, logits.shape[-1]).mean(1, keepdim=True).squeeze(1)
        logsoftmax = torch.log(average_softmax.clamp(min=1e-20))
        ce_loss = F.nll_loss(logsoftmax, labels)
        loss = multiplier * ce_loss
        optimizer.zero_grad()
        loss.backward()
        _l2_delta_step(delta, optimizer, inputs[::num_noise_vectors], max_norm, generator)
    return inputs + delta.repeat(1, num_noise_vectors, 1, 1).view_as(inputs)


def smoothadv_loss_reference(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, epsilon: float,
                             num_steps: int, train_multi_noise: bool = True, generator=None):
    """One mini-batch of train_pgd.py's ``train`` (``--adv-training --attack PGD``, epsilon in pixel units,
    i.e. after its ``/= 256``): ``x`` (B, ...) the mini-batch, ``noise`` (B, m, ...) (already times
    ``noise_sd``). Returns ``(loss, outputs)``; without multi-noise, the loss of the concatenated first-copy
    inputs of this mini-batch alone (the original concatenates all mini-batches of a loader batch)."""
    num_noise_vec = noise.shape[1]
    shape = (x.shape[0] * num_noise_vec,) + tuple(x.shape[1:])
    inputs = x.repeat((1, num_noise_vec, 1, 1)).view(shape)
    noise = noise.reshape(shape)
    targets = y
    requires_grad_(model, False)
    model.eval()
    inputs = smoothadv_attack_reference(model, inputs, targets, noise, epsilon, num_steps, num_noise_vec, generator)
    model.train()
    requires_grad_(model, True)
    if train_multi_noise:
        noisy_inputs = inputs + noise
        targets = targets.unsqueeze(1).repeat(1, num_noise_vec).reshape(-1, 1).squeeze(1)
        outputs = model(noisy_inputs)
        return F.cross_entropy(outputs, targets), outputs
    inputs = inputs[::num_noise_vec]
    noise = noise[::num_noise_vec]
    outputs = model(torch.cat([inputs + noise]))
    return F.cross_entropy(outputs, y), outputs


# ----------------------------------------------------------------------------------------------- TRADES + RS
def trades_rs_loss_reference(model: nn.Module, x_natural: Tensor, y: Tensor, noise: Tensor,
                             delta_init: Optional[Tensor] = None, epsilon: float = 0.435, perturb_steps: int = 10,
                             beta: float = 6.0, generator=None):
    """trades.py ``trades_loss(..., distance='l_2')`` with an all-ones mask; ``delta_init`` replaces
    ``0.001 * torch.randn(x.shape)`` when given. Returns ``(loss, logits)`` (the natural branch's logits)."""
    criterion_kl = nn.KLDivLoss(reduction='sum')  # size_average=False
    model.eval()
    batch_size = len(x_natural)
    noise = noise.detach()
    if delta_init is None:
        x_adv = x_natural.detach() + 0.001 * _randn_like(x_natural, generator).detach()  # drawn, unused for l_2
        delta = 0.001 * _randn_like(x_natural, generator).detach()
    else:
        delta = delta_init.clone().detach()
    delta.requires_grad_(True)
    optimizer_delta = optim.SGD([delta], lr=epsilon / perturb_steps * 2)
    for _ in range(perturb_steps):
        adv = x_natural + delta
        optimizer_delta.zero_grad()
        with torch.enable_grad():
            loss = (-1) * criterion_kl(F.log_softmax(model(adv + noise), dim=1),
                                       F.softmax(model(x_natural + noise), dim=1))
        loss.backward()
        _l2_delta_step(delta, optimizer_delta, x_natural, epsilon, generator)
    x_adv = (x_natural + delta).detach()
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    model.zero_grad()  # optimizer.zero_grad(): the attack's backward filled the weight gradients
    logits = model(x_natural + noise)
    loss_natural = F.cross_entropy(logits, y)
    loss_robust = (1.0 / batch_size) * criterion_kl(F.log_softmax(model(x_adv + noise), dim=1),
                                                    F.softmax(model(x_natural + noise), dim=1))
    loss = loss_natural + beta * loss_robust
    return loss, logits


# ----------------------------------------------------------------------------------------------- consistency
def _kl_div(input: Tensor, targets: Tensor) -> Tensor:
    return F.kl_div(F.log_softmax(input, dim=1), targets, reduction='none').sum(1)


def _entropy(input: Tensor) -> Tensor:
    logsoftmax = torch.log(input.clamp(min=1e-20))
    return (-input * logsoftmax).sum(1)


def _consistency(logits, lbd, eta=0.5, loss='default'):
    """consistency.py ``consistency_loss``."""
    m = len(logits)
    softmax = [F.softmax(logit, dim=1) for logit in logits]
    avg_softmax = sum(softmax) / m
    loss_kl = [_kl_div(logit, avg_softmax) for logit in logits]
    loss_kl = sum(loss_kl) / m
    if loss == 'default':
        consistency = lbd * loss_kl + eta * _entropy(avg_softmax)
    elif loss == 'xent':
        consistency = lbd * (loss_kl + _entropy(avg_softmax))
    elif loss == 'kl':
        consistency = lbd * loss_kl
    elif loss == 'mse':
        sm1, sm2 = softmax[0], softmax[1]
        consistency = lbd * ((sm2 - sm1) ** 2).sum(1)
    else:
        raise NotImplementedError()
    return consistency.mean()


def consistency_loss_reference(model: nn.Module, x: Tensor, y: Tensor, noise: Tensor, lbd: float,
                               eta: float = 0.5, loss: str = 'default'):
    """One mini-batch of train_consistency.py's ``train`` (no ``--adv-training``): ``noise`` (B, m, ...).
    Returns ``(loss, logits)`` with the copy-major logits (m*B, K)."""
    m = noise.shape[1]
    noises = [noise[:, j] for j in range(m)]
    inputs_c = torch.cat([x + n for n in noises], dim=0)
    targets_c = y.repeat(m)
    logits = model(inputs_c)
    loss_xent = F.cross_entropy(logits, targets_c)
    logits_chunk = torch.chunk(logits, m, dim=0)
    loss_con = _consistency(logits_chunk, lbd, eta, loss)
    return loss_xent + loss_con, logits


def trades_smoothing_loss_reference(model: nn.Module, x_natural: Tensor, y: Tensor, optimizer, noise: Tensor,
                                    mask: Tensor, step_size: float = 0.003, epsilon: float = 0.031,
                                    perturb_steps: int = 10, beta: float = 6.0, distance: str = "l_inf") -> Tensor:
    """trades.py's whole ``trades_loss`` (both distances, any 0/1 ``mask``), drawing its random starts from
    torch's CPU generator as the original does (``torch.randn(shape)``, then moved to ``x``'s device): the
    input is masked, the noise is masked, an L-inf start ``x + 0.001 r`` is drawn (and masked); L-inf: sign
    steps on the KL to the clean noisy prediction, projected to the eps-box and [0, 1] and masked after each;
    L2: SGD on ``delta`` (from ``0.001 r' mask``) with learning rate ``2 epsilon / perturb_steps`` on the
    negated KL, the gradient normalised per example (a zero gradient replaced by ``randn``), then
    ``clamp(x + delta, 0, 1) - x`` and ``renorm`` to the L2 ball (the original's ``delta.data.mul(mask)`` does
    not assign, so later steps are not masked). Then ``model.train()``, ``optimizer.zero_grad()`` and the loss
    ``CE(f(x + n), y) + beta / B KL_sum(softmax f(x + n) || log_softmax f(x_adv + n))``."""
    kl_sum = nn.KLDivLoss(reduction="sum")
    model.eval()
    b = x_natural.shape[0]
    x = x_natural * mask
    start = x.detach() + 0.001 * torch.randn(x.shape).to(x)
    start = start * mask
    noise = (noise * mask).detach()
    if distance == "l_inf":
        x_adv = start
        for _ in range(perturb_steps):
            x_adv.requires_grad_()
            with torch.enable_grad():
                kl = kl_sum(F.log_softmax(model(x_adv + noise), dim=1), F.softmax(model(x + noise), dim=1))
            (grad,) = torch.autograd.grad(kl, [x_adv])
            x_adv = x_adv.detach() + step_size * torch.sign(grad.detach())
            x_adv = torch.clamp(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), 0.0, 1.0) * mask
    else:
        delta = (0.001 * torch.randn(x.shape).to(x) * mask).detach().requires_grad_(True)
        sgd = optim.SGD([delta], lr=epsilon / perturb_steps * 2)
        for _ in range(perturb_steps):
            sgd.zero_grad()
            with torch.enable_grad():
                loss = -kl_sum(F.log_softmax(model(x + delta + noise), dim=1), F.softmax(model(x + noise), dim=1))
            loss.backward()
            _l2_delta_step(delta, sgd, x, epsilon)      # a zero gradient: torch.randn_like, as the original
        x_adv = (x + delta).detach()
    model.train()
    x_adv = torch.clamp(x_adv, 0.0, 1.0).detach()
    optimizer.zero_grad()
    natural = F.cross_entropy(model(x + noise), y)
    robust = (1.0 / b) * kl_sum(F.log_softmax(model(x_adv + noise), dim=1), F.softmax(model(x + noise), dim=1))
    return natural + beta * robust
