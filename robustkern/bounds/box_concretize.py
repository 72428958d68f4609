"""The concretisation of ``A x + c`` over a box for unsound passes (``sound=False``), keeping one byte per
coefficient for its backward pass instead of the coefficients.

Over the box ``mid +/- rad`` the bound is ``A mid + c -/+ |A| rad`` (lower / upper side), row by row. Its gradient
with respect to ``A`` is ``g (mid -/+ sign(A) rad)``: it needs only the sign of each coefficient, kept as int8
(a quarter of float32's bytes), where autograd over the products would keep ``A`` and ``|A|`` (or the
``robustkern::crown_concretize`` op ``A``). ``A`` itself is kept only when the box's centre or radius needs a
gradient (``sum_S g A`` and ``sum_S g |A|``). Dense rows ``A`` (B, S, N) over a box (B, N) take the op for the
value; window rows (B, R, K) over boxes gathered per row (B, R, K) (``robustkern.bounds.patches``) sum the
products. The bounds are the op's (or the products' sums), up to the summation order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.crown import crown_concretize

__all__ = ["concretize_box"]


class _BoxConcretize(torch.autograd.Function):

    @staticmethod
    def forward(ctx, A: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, upper_side: bool):
        sign = 1.0 if upper_side else -1.0
        if mid.dim() == 2:
            val = crown_concretize(A, bias, mid, rad, None, None, upper_side)
        else:
            val = (A * mid).sum(-1) + bias + sign * (A.abs() * rad).sum(-1)
        need_box = ctx.needs_input_grad[2] or ctx.needs_input_grad[3]
        ctx.save_for_backward(torch.sign(A).to(torch.int8), mid, rad, A if need_box else None)
        ctx.sign = sign
        return val

    @staticmethod
    def backward(ctx, g: Tensor):
        signs, mid, rad, A = ctx.saved_tensors
        dense = mid.dim() == 2
        mid_b, rad_b = (mid.unsqueeze(1), rad.unsqueeze(1)) if dense else (mid, rad)
        gs = g.unsqueeze(-1)
        grad_A = grad_mid = grad_rad = None
        if ctx.needs_input_grad[0]:
            grad_A = gs * torch.addcmul(mid_b, signs.to(g.dtype), rad_b, value=ctx.sign)
        if ctx.needs_input_grad[2]:
            grad_mid = (gs * A).sum(1) if dense else gs * A
        if ctx.needs_input_grad[3]:
            grad_rad = ctx.sign * ((gs * A.abs()).sum(1) if dense else gs * A.abs())
        return grad_A, g, grad_mid, grad_rad, None


def concretize_box(A: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, upper_side: bool) -> Tensor:
    """``A mid + bias -/+ |A| rad`` (B, S) for dense rows ``A`` (B, S, N) with ``mid, rad`` (B, N), or window rows
    ``A`` (B, R, K) with ``mid, rad`` gathered per row (B, R, K); a backward pass that keeps the signs of ``A``
    (module docstring)."""
    if not torch.is_grad_enabled() or not A.requires_grad:
        if mid.dim() == 2:
            return crown_concretize(A, bias, mid, rad, None, None, upper_side)
        sign = 1.0 if upper_side else -1.0
        return (A * mid).sum(-1) + bias + sign * (A.abs() * rad).sum(-1)
    return _BoxConcretize.apply(A, bias, mid, rad, bool(upper_side))
