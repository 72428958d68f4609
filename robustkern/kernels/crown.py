"""Triton kernels for backward linear bound propagation (CROWN / CROWN-IBP): the ReLU relaxation step and the
concretisation. The math (and the float64 ground truth) is ``robustkern.reference.crown``.

Design. Both kernels are row-wise: program ``r`` owns one coefficient row ``A[b, s, :]`` (``b = r // S``) and
walks its ``N`` entries in blocks of ``BLOCK`` with masked loads.
* ``crown_relu_backward``: loads ``A`` and the pre-activation bounds ``l, u`` of example ``b`` once, computes
  the slopes in registers (never stored), writes ``A'`` and accumulates the row's bias term in a register:
  one read of ``A``, one write of ``A'``, instead of the 6-8 full-size passes of the unfused formula
  (clamp, clamp, two products, sum, product with the bias, reduction).
* ``crown_concretize``: one read of ``A`` for ``A mid``, ``|A| rad`` and (L2) ``A center``, ``||A||_2^2``.
Accumulation is in the input precision (fp32 or fp64); no dot products, so no TF32 question arises.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = ["crown_relu_backward", "crown_concretize"]


@triton.jit
def _slopes(l, u, MODE: tl.constexpr):
    lm = tl.minimum(l, 0.0)
    up = tl.maximum(tl.maximum(u, 0.0), lm + 1e-8)
    d_u = up / (up - lm)
    b_u = -lm * d_u
    if MODE == 0:
        d_l = tl.where(up > -lm, 1.0, 0.0).to(l.dtype)
    elif MODE == 1:
        d_l = tl.where(l >= 0, 1.0, 0.0).to(l.dtype)
    elif MODE == 2:
        d_l = tl.where(u > 0, 1.0, 0.0).to(l.dtype)
    else:
        d_l = d_u
    return d_l, d_u, b_u


@triton.jit
def _relu_backward_kernel(a_ptr, l_ptr, u_ptr, out_ptr, bias_ptr, S, N,
                          MODE: tl.constexpr, UPPER: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // S
    row = a_ptr + r.to(tl.int64) * N
    orow = out_ptr + r.to(tl.int64) * N
    brow = b.to(tl.int64) * N
    acc = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        mask = offs < N
        a = tl.load(row + offs, mask=mask, other=0.0)
        l = tl.load(l_ptr + brow + offs, mask=mask, other=0.0)
        u = tl.load(u_ptr + brow + offs, mask=mask, other=0.0)
        d_l, d_u, b_u = _slopes(l, u, MODE)
        pos = a > 0
        if UPPER:
            slope = tl.where(pos, d_u, d_l)
            acc += tl.where(pos, a * b_u, 0.0)
        else:
            slope = tl.where(pos, d_l, d_u)
            acc += tl.where(pos, 0.0, a * b_u)
        tl.store(orow + offs, a * slope, mask=mask)
    tl.store(bias_ptr + r, tl.sum(acc, axis=0))


@triton.jit
def _concretize_kernel(a_ptr, bias_ptr, mid_ptr, rad_ptr, c_ptr, eps_ptr, out_ptr, S, N,
                       L2: tl.constexpr, UPPER: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0)
    b = r // S
    row = a_ptr + r.to(tl.int64) * N
    brow = b.to(tl.int64) * N
    am = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
    ar = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
    ac = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
    a2 = tl.zeros([BLOCK], dtype=a_ptr.dtype.element_ty)
    for n0 in range(0, N, BLOCK):
        offs = n0 + tl.arange(0, BLOCK)
        mask = offs < N
        a = tl.load(row + offs, mask=mask, other=0.0)
        am += a * tl.load(mid_ptr + brow + offs, mask=mask, other=0.0)
        ar += tl.abs(a) * tl.load(rad_ptr + brow + offs, mask=mask, other=0.0)
        if L2:
            ac += a * tl.load(c_ptr + brow + offs, mask=mask, other=0.0)
            a2 += a * a
    bias = tl.load(bias_ptr + r)
    if UPPER:
        val = tl.sum(am, axis=0) + bias + tl.sum(ar, axis=0)
    else:
        val = tl.sum(am, axis=0) + bias - tl.sum(ar, axis=0)
    if L2:
        e = tl.load(eps_ptr + b)
        if UPPER:
            ball = tl.sum(ac, axis=0) + bias + e * tl.sqrt(tl.sum(a2, axis=0))
            val = tl.minimum(val, ball)
        else:
            ball = tl.sum(ac, axis=0) + bias - e * tl.sqrt(tl.sum(a2, axis=0))
            val = tl.maximum(val, ball)
    tl.store(out_ptr + r, val)


def _block(n: int) -> int:
    return max(16, min(1024, triton.next_power_of_2(max(n, 1))))


def crown_relu_backward(A: Tensor, lower: Tensor, upper: Tensor, mode: int, upper_side: bool):
    B, S, N = A.shape
    A, lower, upper = A.contiguous(), lower.contiguous(), upper.contiguous()
    out = torch.empty_like(A)
    bias = A.new_empty((B, S))
    if B * S and N:
        _relu_backward_kernel[(B * S,)](A, lower, upper, out, bias, S, N, MODE=int(mode), UPPER=bool(upper_side),
                                        BLOCK=_block(N))
    elif B * S:
        bias.zero_()
    return out, bias


def crown_concretize(A: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, center, eps, upper_side: bool):
    B, S, N = A.shape
    A, bias, mid, rad = A.contiguous(), bias.contiguous(), mid.contiguous(), rad.contiguous()
    l2 = center is not None
    if l2:
        center, eps = center.contiguous(), eps.contiguous()
    out = A.new_empty((B, S))
    if B * S:
        _concretize_kernel[(B * S,)](A, bias, mid, rad, center if l2 else mid, eps if l2 else bias, out, S, N,
                                     L2=l2, UPPER=bool(upper_side), BLOCK=_block(N))
    return out
