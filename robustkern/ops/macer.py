"""The MACER loss tail: ``robustkern::macer_tail`` and its backward ``robustkern::macer_tail_backward``.

From the logits of k noisy copies per example (B, k, C) to the per-example classification term
``cl = -log(mean_j softmax(z_j)[y] + 1e-10)`` and robustness term ``rl = sigma/2 (gamma - xi)`` on the examples
MACER keeps (top-1 of ``mean_j softmax(beta z_j)`` is the label, ``xi = Phi^-1(q1) - Phi^-1(q2)`` finite and
``<= gamma``; 0 otherwise). Zhai et al., ICLR 2020, RuntianZ/macer ``macer.py``; the exact contract is
``robustkern.reference.macer``.

Each is an op of the table ``robustkern.ops._registry`` (schema there: no C++ kernel): the Triton kernels
(``robustkern.kernels.macer``, one program per example, fp32; up to ``MAX_CLASSES`` classes) or the pure-PyTorch
reference (vectorised; float64 for float64 logits), so ``auto`` runs the reference on CPU and Triton on CUDA.
The forward op also returns, per example, the three scalar coefficients of the
gradient and the runner-up's index (``robustkern.reference.macer.macer_tail_fwd``; (B, 3) + (B,), saved for the
backward), so the backward does not recompute the averages, their top-2 and ``Phi^-1``. With ``cache=True``
it also returns the per-copy softmaxes ``softmax(z)``, ``softmax(beta z)`` (B, k, C) (empty otherwise), which
are saved instead of the logits and turned into the gradient by a few elementwise PyTorch ops in the autograd
formula itself: ``macer_tail`` asks for them when a gradient is needed and the op's table entry says the
reference runs (the same two tensors the original's autograd keeps); the fused kernels recompute them on the fly
from the saved logits through the backward op ``robustkern::macer_tail_backward``. That op has no derivative
(MACER needs no double backward).

CPU, one thread, fwd+bwd at (B, k, C) = (64, 16, 10) / (64, 16, 1000): 0.99x / 1.2-1.8x the speed of the
original's autograd, saving 0.08 / 7.8 MB against its 0.08 / 8.3 MB (``benchmarks/bench_macer_tail.py``).
"""
from __future__ import annotations

import math
import torch
from torch import Tensor

from ..reference import macer as _ref
from ._registry import define_op, triton_kernel

__all__ = ["macer_tail"]


def _out_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32



def _serves(backend, args):
    """The Triton kernels hold a row of at most ``MAX_CLASSES`` classes in one program."""
    from ..kernels.macer import MAX_CLASSES
    return f"more than {MAX_CLASSES} classes" if args[0].shape[-1] > MAX_CLASSES else None


def _fwd_fake(logits, labels, beta, gamma, sigma, cache):
    b, k, c = logits.shape
    dt = _out_dtype(logits)
    return (logits.new_empty((b,), dtype=dt), logits.new_empty((b,), dtype=dt), logits.new_empty((b, 3), dtype=dt),
            logits.new_empty((b,), dtype=torch.int64), logits.new_empty((b, k, c) if cache else (0,), dtype=dt),
            logits.new_empty((b, k, c) if cache else (0,), dtype=dt))


MACER_TAIL_BACKWARD = define_op(
    "macer_tail_backward", reference=_ref.macer_tail_bwd, triton=triton_kernel("macer", "macer_tail_bwd"), public=False,
    schema="macer_tail_backward(Tensor grad_cl, Tensor grad_rl, Tensor logits, Tensor labels, Tensor i2, "
           "Tensor coef, Tensor s_cache, Tensor t_cache, float beta) -> Tensor",
    serves=lambda backend, args: _serves(backend, args[2:]) or ("a softmax cache" if args[6].numel() else None),
    fake=lambda grad_cl, grad_rl, logits, labels, i2, coef, s_cache, t_cache, beta:
        torch.empty_like(logits, memory_format=torch.contiguous_format))


def _setup(ctx, inputs, output):
    logits, labels, beta, gamma, sigma, cache = inputs
    _, _, coef, i2, s_cache, t_cache = output
    ctx.mark_non_differentiable(coef, i2, s_cache, t_cache)
    # no zero (B, k, C) gradients for the cache outputs; absent upstream gradients arrive as None
    ctx.set_materialize_grads(False)
    # with the cache the logits are not needed (only their shape and dtype)
    ctx.save_for_backward(logits if s_cache.numel() == 0 else None, labels, i2, coef, s_cache, t_cache)
    ctx.logits_meta = (logits.shape, logits.dtype)
    ctx.beta = beta


def _backward(ctx, grad_cl, grad_rl, *_):
    logits, labels, i2, coef, s_cache, t_cache = ctx.saved_tensors
    if not ctx.needs_input_grad[0] or (grad_cl is None and grad_rl is None):
        return None, None, None, None, None, None
    grad_cl = torch.zeros_like(coef[:, 0]) if grad_cl is None else grad_cl
    grad_rl = torch.zeros_like(coef[:, 0]) if grad_rl is None else grad_rl
    if s_cache.numel():
        # the softmaxes are at hand: the gradient is a few elementwise PyTorch ops (the reference's closed
        # form), run directly rather than through a second custom op, whose dispatch costs as much at small sizes
        shape, dtype = ctx.logits_meta                                # only these are read from the logits
        like = s_cache if s_cache.dtype == dtype else s_cache.new_zeros((), dtype=dtype).expand(shape)
        return (_ref.macer_tail_bwd(grad_cl, grad_rl, like, labels, i2, coef, s_cache, t_cache, ctx.beta),
                None, None, None, None, None)
    grad = MACER_TAIL_BACKWARD(grad_cl.contiguous(), grad_rl.contiguous(), logits, labels, i2, coef, s_cache,
                               t_cache, ctx.beta)
    return grad, None, None, None, None, None


MACER_TAIL = define_op(
    "macer_tail", reference=_ref.macer_tail_fwd, triton=triton_kernel("macer", "macer_tail_fwd"),
    schema="macer_tail(Tensor logits, Tensor labels, float beta, float gamma, float sigma, bool cache) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)",
    serves=lambda backend, args: _serves(backend, args) or ("a softmax cache" if args[5] else None),
    fake=_fwd_fake, setup_context=_setup, backward=_backward)


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
    # keep the per-copy softmaxes for the backward when a gradient will be asked for and the op runs its
    # reference (the fused kernels recompute them: a cache would only add memory traffic there)
    cache = (torch.is_grad_enabled() and logits.requires_grad
             and MACER_TAIL.backend(logits.device) == "reference")
    cl, rl, *_ = MACER_TAIL(logits, labels, beta, gamma, sigma, cache)
    return cl, rl
