"""The MACER loss tail: ``robustkern::macer_tail`` and its backward ``robustkern::macer_tail_backward``.

From the logits of k noisy copies per example (B, k, C) to the per-example classification term
``cl = -log(mean_j softmax(z_j)[y] + 1e-10)`` and robustness term ``rl = sigma/2 (gamma - xi)`` on the examples
MACER keeps (top-1 of ``mean_j softmax(beta z_j)`` is the label, ``xi = Phi^-1(q1) - Phi^-1(q2)`` finite and
``<= gamma``; 0 otherwise). Zhai et al., ICLR 2020, RuntianZ/macer ``macer.py``; the exact contract is
``robustkern.reference.macer``.

Each op is a ``torch.library.custom_op`` whose body runs the implementation ``robustkern._backend.select``
picks: the Triton kernels (``robustkern.kernels.macer``, one program per example, fp32) or the pure-PyTorch
reference (vectorised; float64 for float64 logits). There is no compiled kernel, so ``auto`` runs the reference
on CPU and Triton on CUDA. The backward recomputes the softmax averages from the logits (nothing but the two
(B,) outputs is saved). It is itself an op, without a derivative (MACER needs no double backward).
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from ._dispatch import fresh, run

__all__ = ["macer_tail"]


def _out_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


@torch.library.custom_op("robustkern::macer_tail", mutates_args=())
def _macer_tail(logits: Tensor, labels: Tensor, beta: float, gamma: float, sigma: float) -> tuple[Tensor, Tensor]:
    cl, rl = run("macer", "macer_tail", logits.device, logits, labels, beta, gamma, sigma)
    return fresh((cl, rl), (logits, labels))


@_macer_tail.register_fake
def _(logits, labels, beta, gamma, sigma):
    b = logits.shape[0]
    dt = _out_dtype(logits)
    return logits.new_empty((b,), dtype=dt), logits.new_empty((b,), dtype=dt)


@torch.library.custom_op("robustkern::macer_tail_backward", mutates_args=())
def _macer_tail_backward(grad_cl: Tensor, grad_rl: Tensor, logits: Tensor, labels: Tensor, beta: float,
                         gamma: float, sigma: float) -> Tensor:
    grad = run("macer", "macer_tail_backward", logits.device, grad_cl, grad_rl, logits, labels, beta, gamma, sigma)
    return fresh((grad,), (grad_cl, grad_rl, logits, labels))[0]


@_macer_tail_backward.register_fake
def _(grad_cl, grad_rl, logits, labels, beta, gamma, sigma):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    logits, labels, beta, gamma, sigma = inputs
    ctx.save_for_backward(logits, labels)
    ctx.params = (beta, gamma, sigma)


def _backward(ctx, grad_cl, grad_rl):
    logits, labels = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    dt = _out_dtype(logits)
    grad_cl = torch.zeros(logits.shape[0], dtype=dt, device=logits.device) if grad_cl is None else grad_cl
    grad_rl = torch.zeros(logits.shape[0], dtype=dt, device=logits.device) if grad_rl is None else grad_rl
    grad = _macer_tail_backward(grad_cl.contiguous(), grad_rl.contiguous(), logits, labels, *ctx.params)
    return grad, None, None, None, None


_macer_tail.register_autograd(_backward, setup_context=_setup)


def _check_finite_number(op: str, name: str, v, positive: bool) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ValueError(f"{op}: {name} must be a finite number, got {v!r}")
    if positive and not v > 0:
        raise ValueError(f"{op}: {name} must be > 0, got {v}")
    return float(v)


def macer_tail(logits: Tensor, labels: Tensor, *, beta: float = 16.0, gamma: float = 8.0, sigma: float = 0.25,
               check_labels: bool = True) -> tuple[Tensor, Tensor]:
    """Per-example MACER terms ``(cl, rl)``, each (B,), of ``logits`` (B, k, C) and ``labels`` (B,) int64.

    ``cl[b] = -log(p_bar[b, y] + 1e-10)`` with ``p_bar = mean_j softmax(z[b, j])``; ``rl[b] = sigma/2 (gamma -
    xi_b)`` for kept examples, else 0 (``robustkern.reference.macer`` states the masking and tie rules).
    MACER's objective is ``(cl.sum() + lbd * rl.sum()) / B``. Outputs are float64 for float64 logits, else
    float32 (computed in fp32 whatever the input precision). Differentiable in ``logits``.
    ``check_labels``: verify ``0 <= labels < C`` (one device synchronisation)."""
    op = "macer_tail"
    if not isinstance(logits, Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be a 3-D float tensor (batch, copies, classes), got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
                         f"{' ' + str(logits.dtype) if isinstance(logits, Tensor) else ''}")
    b, k, c = logits.shape
    if k < 1:
        raise ValueError(f"{op}: need at least one noisy copy per example (k >= 1), got k = {k}")
    if c < 2:
        raise ValueError(f"{op}: need at least two classes (MACER takes the top two), got {c}")
    if labels.dim() != 1 or labels.shape[0] != b or labels.dtype != torch.int64:
        raise ValueError(f"{op}: labels must be ({b},) int64, got {tuple(labels.shape)} {labels.dtype}")
    if labels.device != logits.device:
        raise ValueError(f"{op}: labels are on {labels.device}, logits on {logits.device}")
    if check_labels and b and bool(((labels < 0) | (labels >= c)).any()):
        bad = labels[(labels < 0) | (labels >= c)][0].item()
        raise ValueError(f"{op}: labels must be in [0, {c}), got {bad}")
    beta = _check_finite_number(op, "beta", beta, positive=True)
    sigma = _check_finite_number(op, "sigma", sigma, positive=True)
    gamma = _check_finite_number(op, "gamma", gamma, positive=False)
    if gamma < 0:
        raise ValueError(f"{op}: gamma (the hinge) must be >= 0, got {gamma}")
    return _macer_tail(logits, labels, beta, gamma, sigma)
