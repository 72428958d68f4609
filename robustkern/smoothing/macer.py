"""MACER training (Zhai, Dan, He, Zhang, Gong, Hopcroft, Lu, Wang; ICLR 2020, "MACER: Attack-free and Scalable
Robust Training via Maximizing Certified Radius"; github.com/RuntianZ/macer ``macer.py``, ``main.py``).

For a batch (x, y) of B examples, k noisy copies ``x_b + sigma * eps_bj`` (eps ~ N(0, I)) go through the model
in ONE forward of B*k samples (the copies of an example contiguous, as in the original), giving logits
z (B, k, C). With ``p_bar = mean_j softmax(z_bj)`` and ``q_bar = mean_j softmax(beta z_bj)``:

    CL = sum_b -log(p_bar[b, y_b] + 1e-10)
    RL = sigma/2 * sum_{b kept} (gamma - xi_b),   xi_b = Phi^-1(q_bar[b, y_b]) - Phi^-1(max_{c != y_b} q_bar[b, c])
    loss = (CL + lbd * RL) / B

where b is kept when the label is q_bar's top-1 and xi_b is finite and <= gamma (the hinge). ``sigma/2 * xi``
is the soft smoothed classifier's certified radius (Cohen et al.'s two-sided bound), so minimising RL pushes
the radius of correctly classified examples up to ``sigma * gamma / 2``. The tail (from z to CL and RL) is the
fused op ``robustkern.ops.macer_tail``; ``robustkern.reference.macer`` has the contract and a transcription of
the original.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..ops.macer import macer_tail
from ..ops.smoothing import smoothing_noise
from ..reference.published.macer import macer_tail_terms_reference

__all__ = ["macer_loss", "macer_train"]

_STREAM_MACER = 3          # counter stream of training noise (certification uses 0..2)


def _finite(name: str, v, *, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"macer: {name} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"macer: {name} must be > 0, got {v}")
    if nonneg and v < 0:
        raise ValueError(f"macer: {name} must be >= 0, got {v}")
    return float(v)


def _noisy_copies(x: Tensor, sigma: float, k: int, seed, noise: Optional[Tensor], generator) -> Tensor:
    """(B*k, ...) noisy copies, copy j of example b at row b*k + j."""
    b, rest = x.shape[0], tuple(x.shape[1:])
    if noise is not None:
        if tuple(noise.shape) != (b, k) + rest:
            raise ValueError(f"macer: noise must have shape {(b, k) + rest} (batch, k, *x.shape[1:]), got "
                             f"{tuple(noise.shape)}")
        return (x.unsqueeze(1) + noise.to(x.dtype) * sigma).reshape((b * k,) + rest)
    if seed is not None:
        src = torch.arange(b, device=x.device).repeat_interleave(k)
        counter = torch.stack([src, torch.arange(k, device=x.device).repeat(b),
                               torch.full_like(src, _STREAM_MACER)], 1)
        return smoothing_noise(x.detach(), src, counter, int(seed), sigma).to(x.dtype)
    inputs = x.unsqueeze(1).expand((b, k) + rest).reshape((b * k,) + rest)
    return inputs + torch.randn(inputs.shape, dtype=x.dtype, device=x.device, generator=generator) * sigma


def macer_loss(model: torch.nn.Module, x: Tensor, y: Tensor, sigma: float, k: int = 16, lbd: float = 12.0,
               gamma: float = 8.0, beta: float = 16.0, *, seed: Optional[int] = None, noise: Optional[Tensor] = None,
               generator: Optional[torch.Generator] = None, faithful: bool = False, check_values: bool = True
               ) -> tuple[Tensor, Tensor, Tensor]:
    """MACER's objective for one batch: ``(loss, CL / B, RL / B)`` with ``loss = (CL + lbd RL) / B`` (module
    docstring); the two terms are the per-example averages the original prints.

    ``x`` (B, ...) float in the model's input space (noise is added in pixel space before the model, as the
    original; put normalisation inside the model); ``y`` (B,) int64 labels. ``k`` is the original's
    ``gauss_num``, ``lbd`` its ``lbd`` (lambda), ``gamma`` the hinge, ``beta`` the inverse softmax temperature of
    the robustness term.

    Noise, in order of precedence: ``noise`` (B, k, *x.shape[1:]) standard-normal draws, multiplied by sigma
    here (replays exactly; ``robustkern.reference.macer.macer_loss_reference`` takes the same argument);
    ``seed``: counter-based (Philox) noise keyed by (seed, example index in the batch, copy index), independent
    of device and batch composition (pass a different seed at each step); else ``torch.randn`` of shape
    (B*k, ...) from ``generator`` (the global generator by default), the same draws in the same order as the
    original's ``torch.randn_like(inputs)``.

    ``faithful``: compute the tail with the original's own arithmetic (``topk``, ``Normal(0, 1).icdf`` =
    ``sqrt(2) erfinv(2p - 1)``, in the logits' dtype) instead of the fused op. Both modes run the model once on
    the B*k noisy copies in the original's order, so BatchNorm sees the same batch and updates its running
    statistics once per step, exactly as the original: the original has no side effect the fast mode skips.
    The modes differ only where the original is ill-defined or inaccurate: ties between the label and another
    class at the top of ``q_bar`` (the fused op gives them to the label), ``Phi^-1`` of values below 3e-8 (the
    fused op is accurate; the original returns -inf and drops the example, which changes nothing at
    gamma = 8, see ``robustkern.reference.macer``) and low-precision logits (the fused op computes in fp32).

    ``check_values=False`` skips the checks that read tensor values (NaN in ``x``, ``0 <= y < C``): each is a
    host-device sync, which stalls a GPU training loop's stream (the CPU waits before it can queue the model's
    forward, and again before the tail), so a loop whose inputs are known to be valid may turn them off, as with
    ``BoundedModule.compute_bounds(..., check_values=False)``. Shapes, dtypes and the numeric arguments (sigma,
    k, lbd, gamma, beta) are always checked. Invalid values are then not diagnosed here: NaN in ``x`` gives a
    NaN loss, an out-of-range label torch's own indexing error (reference) or an out-of-row read (the Triton
    kernel indexes the logits with it). ``faithful`` runs the original's arithmetic as it is either way.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"macer: x must be a float tensor (batch, ...), got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    b = x.shape[0]
    if not isinstance(y, Tensor) or y.dim() != 1 or y.shape[0] != b or y.dtype != torch.int64:
        raise ValueError(f"macer: y must be ({b},) int64 labels, got "
                         f"{tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__}")
    if b == 0:
        raise ValueError("macer: empty batch")
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"macer: k (noisy copies per example) must be an integer >= 1, got {k!r}")
    k = int(k)
    sigma = _finite("sigma", sigma, positive=True)
    lbd = _finite("lbd", lbd, nonneg=True)
    gamma = _finite("gamma", gamma, nonneg=True)
    beta = _finite("beta", beta, positive=True)
    if check_values and bool(torch.isnan(x).any()):
        raise ValueError("macer: x contains NaN")
    if check_values and bool((y < 0).any()):
        raise ValueError(f"macer: labels must be >= 0, got {int(y.min())}")

    logits = model(_noisy_copies(x, sigma, k, seed, noise, generator))
    if logits.dim() != 2 or logits.shape[0] != b * k:
        raise ValueError(f"macer: the model must return (B*k, C) = ({b * k}, C) logits, got {tuple(logits.shape)}")
    c = logits.shape[1]
    if check_values and bool((y >= c).any()):
        raise ValueError(f"macer: labels must be < the number of classes {c}, got {int(y.max())}")
    logits = logits.reshape(b, k, c)
    if faithful:
        cl, rl = macer_tail_terms_reference(logits, y, sigma, gamma, beta)
    else:
        cl_b, rl_b = macer_tail(logits, y, beta=beta, gamma=gamma, sigma=sigma, check_labels=False)
        cl, rl = cl_b.sum(), rl_b.sum()
    loss = (cl + lbd * rl) / b
    return loss, cl / b, rl / b


def macer_train(sigma: float, lbd: float, gauss_num: int, beta: float, gamma: float, num_classes: int,
                model: torch.nn.Module, trainloader, optimizer: torch.optim.Optimizer, device, *,
                epoch: Optional[int] = None, deferred_epochs: int = 0, generator: Optional[torch.Generator] = None,
                faithful: bool = False, check_values: bool = True) -> tuple[float, float]:
    """One epoch of MACER with the original's arguments (RuntianZ/macer ``macer_train(sigma, lbd, gauss_num,
    beta, gamma, num_classes, model, trainloader, optimizer, device)``): for each batch, ``macer_loss``,
    ``optimizer.zero_grad()``, ``loss.backward()``, ``optimizer.step()``. Returns the epoch's per-example
    averages ``(CL, RL)`` (the original prints them; jh-jeong/smoothing-consistency's copy returns them).

    As in the original, the caller steps the LR scheduler and puts the model in training mode (this function
    calls ``model.train()`` too, as the original's main loop does before every epoch). ``deferred_epochs``:
    the "deferred" start of jh-jeong/smoothing-consistency ``train_macer.py --deferred``: ``lbd = 0`` while
    ``epoch < deferred_epochs`` (0-based ``epoch``; that script zeroes lbd for ``epoch <= lr_step_size``, i.e.
    pass ``deferred_epochs = lr_step_size + 1`` to match it). The robustness term is still computed and
    reported then. Noise comes from ``generator`` (default: the global generator) in the original's order;
    ``faithful`` and ``check_values`` as in ``macer_loss``."""
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"macer: num_classes must be an integer >= 2, got {num_classes!r}")
    if deferred_epochs and epoch is None:
        raise ValueError("macer: deferred_epochs needs the current epoch")
    if epoch is not None and epoch < deferred_epochs:
        lbd = 0.0
    model.train()
    cl_total = rl_total = 0.0
    total = 0
    for inputs, targets in trainloader:
        inputs, targets = inputs.to(device), targets.to(device)
        loss, cl, rl = macer_loss(model, inputs, targets, sigma, gauss_num, lbd, gamma, beta, generator=generator,
                                  faithful=faithful, check_values=check_values)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        n = len(inputs)
        total += n
        cl_total += cl.item() * n
        rl_total += rl.item() * n
    return cl_total / max(total, 1), rl_total / max(total, 1)
