"""Pure-PyTorch ground truth for MACER (Zhai et al., ICLR 2020, "MACER: Attack-free and Scalable Robust Training
via Maximizing Certified Radius"; github.com/RuntianZ/macer ``macer.py``, commit 1b6837f).

The transcription of the original (``macer_loss_reference``, ``macer_train_reference``, the certification
``MacerSmoothReference``) is in ``robustkern.reference.published.macer``. The original training step, for a batch of B
images, k noisy copies each (copies of one image contiguous, noise ``sigma * N(0, I)`` drawn for the
(B*k, ...) tensor at once, as ``torch.randn_like``), one forward gives logits z (B, k, C) and

    p_bar = mean_j softmax(z_j)                        CL = sum_b -log(p_bar[b, y_b] + 1e-10)
    q_bar = mean_j softmax(beta z_j)                   (q1, q2), (i1, i2) = topk(q_bar, 2)
    G     = {b : i1_b == y_b}                          xi_b = Phi^-1(q1_b) - Phi^-1(q2_b)
    kept  = {b in G : xi_b is finite (not inf/NaN) and |xi_b| <= gamma}
    RL    = sigma / 2 * sum_{b in kept} (gamma - xi_b)
    loss  = (CL + lbd * RL) / B

with ``Phi^-1(p) = sqrt(2) erfinv(2p - 1)`` exactly as ``torch.distributions.Normal(0, 1).icdf``. Nothing is
detached; gradients flow through both terms of the shared forward.

``macer_tail`` / ``macer_tail_backward``: the math contract of the fused op ``robustkern::macer_tail`` (the same
CL/RL per example, float64-capable, computed in fp32 for fp16/bf16/fp32 logits), with three precise choices
where the original leaves things to ``torch.topk`` and fp32 ``erfinv``:

* the true label counts as top-1 when ``q_bar[y] >= q_bar[c]`` for every other c (ties go to the label; the
  original's ``topk`` orders ties arbitrarily), and ``q2`` is the largest other entry, its index the first one
  attaining it. Ties are not rare: at beta = 16 the softmax of a confident copy is exactly one-hot in fp32, so
  q_bar is often a multiple of 1/k (e.g. two of four copies for the label, two for another class). Such a
  tie gives xi = 0, rl = sigma/2 gamma and a zero gradient (saturated softmax), so it changes the reported
  loss but hardly the training;
* ``Phi^-1`` is accurate in the tails (``torch.special.ndtri`` here, Wichura's AS241 in the Triton kernel),
  where the original's ``erfinv(2p - 1)`` rounds ``2p - 1`` to -1 for ``p < 2^-25`` and returns -inf. The
  masks then differ only when ``q2 < 3e-8`` and ``xi <= gamma``; since ``q2 >= (1 - q1) / (C - 1)`` this
  needs ``Phi^-1(q1) - Phi^-1(3e-8) <= gamma`` with ``1 - q1 <= 3e-8 (C - 1)``, impossible at the default
  gamma = 8 for C < 10^5;
* ``xi`` finite means ``0 < q2`` and ``q1 < 1`` (``Phi^-1(0) = -inf``, ``Phi^-1(1) = inf``), as in the original.

Per example: ``cl[b] = -log(p_bar[b, y] + 1e-10)`` and ``rl[b] = sigma / 2 (gamma - xi_b)`` if b is kept else 0.
The backward (for upstream gradients ``g_cl``, ``g_rl``) is, with ``s = softmax(z_j)``, ``t = softmax(beta z_j)``,
``A_y = -g_rl sigma / 2 / phi(Phi^-1(q1))``, ``A_2 = g_rl sigma / 2 / phi(Phi^-1(q2))`` on kept examples (0
otherwise) and ``a = -g_cl / (p_bar_y + 1e-10)``:

    dL/dz[j, c] = a / k * s_y (delta_cy - s_c) + beta / k * t_c (A_y delta_cy + A_2 delta_c,i2 - A_y t_y - A_2 t_i2)

using ``d Phi^-1(p) / dp = 1 / phi(Phi^-1(p))``.

``macer_tail_fwd`` / ``macer_tail_bwd``: the same two functions split the way the op runs them (and the CPU
implementation of ``robustkern::macer_tail`` / ``macer_tail_backward``): the forward also returns the three
per-example scalars of the gradient, ``a / k``, ``beta / k A_y``, ``beta / k A_2`` for unit upstream gradients,
the runner-up's index ``i2`` and optionally the per-copy softmaxes ``s``, ``t``; the backward scales the scalars
by ``g_cl``, ``g_rl`` and forms the gradient from ``s`` and ``t`` (recomputed when not kept) in a few passes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

__all__ = ["macer_tail", "macer_tail_backward", "macer_tail_fwd", "macer_tail_bwd"]

_EPS_LOG = 1e-10          # the original's guard in log(p_bar + 1e-10)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _compute_dtype(logits: Tensor) -> torch.dtype:
    return torch.float64 if logits.dtype == torch.float64 else torch.float32


def _stats(logits: Tensor, labels: Tensor, beta: float, gamma: float):
    """Softmax averages and the masking of the contract (module docstring), in the compute dtype."""
    z = logits.to(_compute_dtype(logits))
    k = z.shape[1]
    s = torch.softmax(z, dim=2)
    t = torch.softmax(z * beta, dim=2)
    p_bar = s.sum(1) / k
    q_bar = t.sum(1) / k
    y = labels.view(-1, 1)
    p_y = p_bar.gather(1, y).squeeze(1)
    q1 = q_bar.gather(1, y).squeeze(1)
    others = q_bar.scatter(1, y, -1.0)          # the label excluded (probabilities are >= 0)
    q2, i2 = others.max(dim=1)                  # first maximum on ties, as torch.max on CPU and CUDA
    correct = q1 >= q2
    z1, z2 = torch.special.ndtri(q1), torch.special.ndtri(q2)
    xi = z1 - z2
    keep = correct & torch.isfinite(xi) & (xi <= gamma)
    return z, s, t, p_y, q1, q2, i2, z1, z2, xi, keep


def macer_tail(logits: Tensor, labels: Tensor, beta: float, gamma: float, sigma: float) -> tuple[Tensor, Tensor]:
    """Per-example MACER terms ``(cl (B,), rl (B,))`` of logits (B, k, C) (module docstring); float64 for
    float64 logits, else float32."""
    if logits.shape[0] == 0:
        dt = _compute_dtype(logits)
        return logits.new_zeros(0, dtype=dt), logits.new_zeros(0, dtype=dt)
    _, _, _, p_y, _, _, _, _, _, xi, keep = _stats(logits, labels, beta, gamma)
    cl = -torch.log(p_y + _EPS_LOG)
    rl = torch.where(keep, (sigma / 2.0) * (gamma - torch.where(keep, xi, 0.0)), 0.0)
    return cl, rl


def macer_tail_backward(grad_cl: Optional[Tensor], grad_rl: Optional[Tensor], logits: Tensor, labels: Tensor,
                        beta: float, gamma: float, sigma: float) -> Tensor:
    """Gradient of ``sum(grad_cl * cl + grad_rl * rl)`` with respect to ``logits`` (closed form, module
    docstring); same dtype as ``logits``."""
    if logits.shape[0] == 0:
        return torch.zeros_like(logits)
    z, s, t, p_y, q1, q2, i2, z1, z2, xi, keep = _stats(logits, labels, beta, gamma)
    dt, k = z.dtype, z.shape[1]
    g_cl = torch.zeros_like(p_y) if grad_cl is None else grad_cl.to(dt)
    g_rl = torch.zeros_like(p_y) if grad_rl is None else grad_rl.to(dt)
    y = labels.view(-1, 1, 1).expand(-1, k, 1)
    j2 = i2.view(-1, 1, 1).expand(-1, k, 1)
    half = sigma / 2.0
    z1s, z2s = torch.where(keep, z1, 0.0), torch.where(keep, z2, 0.0)
    a_y = torch.where(keep, -g_rl * half / (torch.exp(-0.5 * z1s * z1s) * _INV_SQRT_2PI), 0.0).view(-1, 1, 1)
    a_2 = torch.where(keep, g_rl * half / (torch.exp(-0.5 * z2s * z2s) * _INV_SQRT_2PI), 0.0).view(-1, 1, 1)
    t_y, t_2 = t.gather(2, y), t.gather(2, j2)
    coef_s = (-g_cl / (p_y + _EPS_LOG) / k).view(-1, 1, 1) * s.gather(2, y)      # a / k * s_y
    coef_t = (beta / k) * (a_y * t_y + a_2 * t_2)
    grad = s.mul_(-coef_s).sub_(t.mul_(coef_t))                                   # s, t are fresh: reuse them
    grad.scatter_add_(2, y, coef_s + (beta / k) * t_y * a_y)
    grad.scatter_add_(2, j2, (beta / k) * t_2 * a_2)
    return grad.to(logits.dtype)


def macer_tail_fwd(logits: Tensor, labels: Tensor, beta: float, gamma: float, sigma: float, cache: bool
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``macer_tail`` plus what its backward needs: ``(cl, rl, coef (B, 3), i2 (B,) int64, s, t)`` with
    ``coef[b] = (-1 / (k (p_y + 1e-10)), -beta/k sigma/2 / phi(Phi^-1(q1)), beta/k sigma/2 / phi(Phi^-1(q2)))``
    (the last two 0 where b is not kept), ``i2`` the index of ``q2``, and, when ``cache``, the per-copy softmaxes
    ``s = softmax(z)``, ``t = softmax(beta z)`` (B, k, C) (else two empty tensors).
    ``macer_tail_bwd`` turns them into the gradient without recomputing the averages, their top-2 and
    ``Phi^-1`` (nor, with the cache, the softmaxes: the original's autograd keeps the same two tensors)."""
    dt = _compute_dtype(logits)
    b, k, c = logits.shape
    if b == 0:
        empty = (0, k, c) if cache else (0,)
        return (logits.new_zeros(0, dtype=dt), logits.new_zeros(0, dtype=dt), logits.new_zeros((0, 3), dtype=dt),
                logits.new_zeros(0, dtype=torch.int64), logits.new_zeros(empty, dtype=dt),
                logits.new_zeros(empty, dtype=dt))
    z = logits if logits.dtype == dt else logits.to(dt)
    s = torch.softmax(z, dim=2)
    t = torch.softmax(z * beta, dim=2)
    yv = labels.view(-1, 1)
    p_y = s.mean(1).gather(1, yv).squeeze(1)
    q_bar = t.mean(1)
    q1 = q_bar.gather(1, yv).squeeze(1)
    q2, i2 = q_bar.scatter_(1, yv, -1.0).max(dim=1)                             # label excluded; first max
    zz = torch.special.ndtri(torch.stack([q1, q2], 1))                          # (Phi^-1(q1), Phi^-1(q2))
    xi = zz[:, 0] - zz[:, 1]
    # given q1 >= q2, xi is finite, +inf or NaN (never -inf), and ``xi <= gamma`` is False for the last two
    keep = (q1 >= q2) & (xi <= gamma)
    half = sigma / 2.0
    p_eps = p_y + _EPS_LOG
    cl = p_eps.log().neg_()
    rl = torch.where(keep, (gamma - xi) * half, 0.0)
    w = zz.square().mul_(0.5).exp_().mul_(beta / k * half / _INV_SQRT_2PI)   # beta/k sigma/2 / phi(Phi^-1(q))
    w[:, 0].neg_()
    w = torch.where(keep.unsqueeze(1), w, 0.0)
    coef = torch.cat([p_eps.reciprocal_().mul_(-1.0 / k).unsqueeze(1), w], 1)
    if not cache:
        s, t = logits.new_empty((0,), dtype=dt), logits.new_empty((0,), dtype=dt)
    return cl, rl, coef, i2, s, t


def macer_tail_bwd(grad_cl: Tensor, grad_rl: Tensor, logits: Tensor, labels: Tensor, i2: Tensor, coef: Tensor,
                   s_cache: Tensor, t_cache: Tensor, beta: float) -> Tensor:
    """The gradient of ``sum(grad_cl * cl + grad_rl * rl)`` with respect to ``logits`` from ``macer_tail_fwd``'s
    ``i2``, ``coef`` and softmaxes (recomputed from ``logits`` when the cache is empty); with
    ``a / k = grad_cl coef[:, 0]``, ``beta / k A_y = grad_rl coef[:, 1]``, ``beta / k A_2 = grad_rl coef[:, 2]``
    it is the module docstring's closed form. Same dtype as ``logits``."""
    b, k, c = logits.shape
    if b == 0:
        return torch.zeros_like(logits)
    dt = coef.dtype
    if s_cache.numel():
        s, t = s_cache, t_cache
    else:
        z = logits.to(dt)
        s, t = torch.softmax(z, dim=2), torch.softmax(z * beta, dim=2)
    idx = torch.stack([labels, i2], 1).unsqueeze(1).expand(b, k, 2)       # (label, runner-up) per copy
    g = torch.stack([grad_cl, grad_rl, grad_rl], 1).to(dt).mul_(coef)     # (a / k, beta/k A_y, beta/k A_2)
    a_sel = t.gather(2, idx).mul_(g[:, 1:].unsqueeze(1))                  # (beta/k A_y t_y, beta/k A_2 t_2)
    coef_s = s.gather(2, idx[..., :1]).mul_(g[:, :1].unsqueeze(1))        # a / k * s_y
    grad = (t * a_sel.sum(2, keepdim=True).neg_()).addcmul_(s, coef_s, value=-1.0)
    a_sel[..., :1] += coef_s
    grad.scatter_add_(2, idx, a_sel)
    return grad.to(logits.dtype)
