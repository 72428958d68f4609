"""Triton kernels for the projected-gradient attack step (Madry et al. 2018; L2 variant as torchattacks'
PGDL2). The exact functions are those of ``robustkern.reference.attacks.pgd_step``:

    L-inf:  x' = clip_[0,1]( min(max(x + alpha sign(g), x0 - eps), x0 + eps) )
    L2:     u = g / (|g|_2 + 1e-10);  d = x + alpha u - x0;  x' = clip_[0,1]( x0 + d min(1, eps / |d|_2) )

with ``eps, alpha`` per row (example). Design:
* L-inf is element-wise: one program per ``BLOCK`` elements of the flattened batch; the row of an element is
  ``offset // N`` and its ``eps, alpha`` are gathered from the (B,) vectors. Sign, step, projection and clamp
  happen in registers: one read of each of ``x, g, x0`` and one write, where eager PyTorch makes six passes.
* L2 needs two per-row reductions (``|g|`` then ``|d|``, which depends on ``|g|``): one program per row loops
  over the row three times (sum of ``g^2``; sum of ``d^2``; scale, clamp and store), accumulating in the
  input precision. Rows of a batch are independent, so B programs run in parallel.
* ``sign(0) = 0``, as ``torch.sign``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._numerics import L2_DIV_EPS
from ._config import autotune_configs

__all__ = ["pgd_step"]

Tensor = torch.Tensor


@triton.autotune(configs=autotune_configs([triton.Config({"BLOCK": 1024}, num_warps=4),
                                           triton.Config({"BLOCK": 4096}, num_warps=8),
                                           triton.Config({"BLOCK": 256}, num_warps=2)]),
                 key=["total"])
@triton.jit
def _pgd_step_linf_kernel(xa_ptr, g_ptr, x0_ptr, eps_ptr, alpha_ptr, out_ptr, total, N, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < total
    row = offs // N
    xa = tl.load(xa_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    x0 = tl.load(x0_ptr + offs, mask=mask, other=0.0)
    e = tl.load(eps_ptr + row, mask=mask, other=0.0)
    a = tl.load(alpha_ptr + row, mask=mask, other=0.0)
    s = tl.where(g > 0, 1.0, tl.where(g < 0, -1.0, 0.0)).to(xa.dtype)
    y = xa + a * s
    y = tl.minimum(tl.maximum(y, x0 - e), x0 + e)
    y = tl.minimum(tl.maximum(y, 0.0), 1.0)
    tl.store(out_ptr + offs, y, mask=mask)


@triton.autotune(configs=autotune_configs([triton.Config({"BLOCK": 1024}, num_warps=4),
                                           triton.Config({"BLOCK": 2048}, num_warps=8),
                                           triton.Config({"BLOCK": 512}, num_warps=4)]),
                 key=["N"])
@triton.jit
def _pgd_step_l2_kernel(xa_ptr, g_ptr, x0_ptr, eps_ptr, alpha_ptr, out_ptr, N, div_eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * N
    e = tl.load(eps_ptr + row)
    a = tl.load(alpha_ptr + row)
    cols = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=eps_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        m = start + cols < N
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0)
        acc += g * g
    gn = tl.sqrt(tl.sum(acc, axis=0)) + div_eps
    acc = tl.zeros([BLOCK], dtype=eps_ptr.dtype.element_ty)
    for start in range(0, N, BLOCK):
        m = start + cols < N
        xa = tl.load(xa_ptr + base + start + cols, mask=m, other=0.0)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0)
        x0 = tl.load(x0_ptr + base + start + cols, mask=m, other=0.0)
        d = xa + a * (g / gn) - x0
        acc += d * d
    dn = tl.sqrt(tl.sum(acc, axis=0))
    factor = tl.where(dn > e, e / tl.where(dn > e, dn, 1.0), 1.0)
    for start in range(0, N, BLOCK):
        m = start + cols < N
        xa = tl.load(xa_ptr + base + start + cols, mask=m, other=0.0)
        g = tl.load(g_ptr + base + start + cols, mask=m, other=0.0)
        x0 = tl.load(x0_ptr + base + start + cols, mask=m, other=0.0)
        d = xa + a * (g / gn) - x0
        y = x0 + d * factor
        y = tl.minimum(tl.maximum(y, 0.0), 1.0)
        tl.store(out_ptr + base + start + cols, y, mask=m)


def pgd_step(x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps: Tensor, alpha: Tensor, norm: str) -> Tensor:
    """Launch the fused step (module docstring); inputs already checked by ``robustkern.ops.attacks``."""
    b = x_adv.shape[0]
    out = torch.empty(x_adv.shape, dtype=x_adv.dtype, device=x_adv.device)
    total = x_adv.numel()
    if total == 0:
        return out
    n = total // b
    xa, g, x0 = (t.contiguous() for t in (x_adv, grad, x_orig))
    eps, alpha = eps.contiguous(), alpha.contiguous()
    if norm == "linf":
        grid = lambda meta: (triton.cdiv(total, meta["BLOCK"]),)  # noqa: E731
        _pgd_step_linf_kernel[grid](xa, g, x0, eps, alpha, out, total, n)
    elif norm == "l2":
        _pgd_step_l2_kernel[(b,)](xa, g, x0, eps, alpha, out, n, L2_DIV_EPS)
    else:
        raise ValueError(f"pgd_step: norm must be 'linf' or 'l2', got {norm!r}")
    return out
