"""The ReLU step of a backward pass with explicit lower slopes (alpha-CROWN's optimised slopes) on dense rows, in
the working precision (``sound=False``), with a backward pass written for it.

For coefficients ``A`` (B, S, N) over a ReLU's output, the bounds ``l, u`` (B, N) of its input and slopes ``a``
(B, 1 or S, N), the step is ``robustkern::crown_relu_backward_slopes``'s (``robustkern.reference.crown``): lower
side ``A' = A+ d_l + A- d_u``, bias ``sum A- b_u``; upper side ``A' = A+ d_u + A- d_l``, bias ``sum A+ b_u``,
with the upper line ``d_u = U / (U - L)``, ``b_u = -L d_u`` and the lower slope ``d_l`` 1 on active neurons
(``l >= 0``), 0 on inactive ones (``u <= 0``) and ``clamp(a, 0, 1)`` on unstable ones. The same products are
computed (``A' = where(A > 0, A d_l, A d_u)`` is ``A+ d_l + A- d_u`` entry by entry), and ``d_l`` is
``act + unst a`` (exact for ``a`` in [0, 1]; slopes outside are clamped first).

The op's composite reference makes about ten passes over (B, S, N) tensors forward and some twenty backward; here
the forward makes five and the backward about ten (the gradients of ``A`` and of the slopes share the sign
split ``A > 0`` and the product ``g A``; ``d_l`` is recomputed from the slopes). Saved for the backward: ``A``,
``l``, ``u`` and the slopes, as the op saves. Gradients: ``d A'/d a`` is ``A+`` (lower side) or ``A-`` (upper)
on unstable neurons whose slope lies in [0, 1] (summed over the rows for shared slopes); ``l, u`` enter through
the upper line only, as in the op, so their gradients are those of ``crown_relu_backward``'s backward op (whose
lower slope is piecewise constant in them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..ops.crown import CROWN_RELU_BACKWARD_GRAD, crown_relu_relaxation

__all__ = ["relu_step_with_slopes"]


def _lower_slopes(lower: Tensor, upper: Tensor, slope: Tensor, inside: bool) -> Tensor:
    """``d_l`` (B, S', N): 1 on active, 0 on inactive, the (clamped) slope on unstable neurons."""
    act = (lower >= 0).unsqueeze(1).to(slope.dtype)
    unst = ((lower < 0) & (upper > 0)).unsqueeze(1).to(slope.dtype)
    return torch.addcmul(act, slope if inside else slope.clamp(0.0, 1.0), unst)


class _SlopeStep(torch.autograd.Function):

    @staticmethod
    def forward(ctx, A: Tensor, lower: Tensor, upper: Tensor, slope: Tensor, upper_side: bool):
        lo_s, hi_s = torch.aminmax(slope)
        inside = bool(lo_s >= 0) and bool(hi_s <= 1)
        _, d_u, b_u = crown_relu_relaxation(lower, upper, 0)
        d_u1 = d_u.unsqueeze(1)
        pos = A > 0
        with_dl = _lower_slopes(lower, upper, slope, inside).mul_(A) if slope.shape[1] == A.shape[1] else \
            A * _lower_slopes(lower, upper, slope, inside)
        if upper_side:
            out = torch.where(pos, A * d_u1, with_dl)
            bias = torch.bmm(A.clamp(min=0), b_u.unsqueeze(-1)).squeeze(-1)
        else:
            out = torch.where(pos, with_dl, A * d_u1)
            bias = torch.bmm(A.clamp(max=0), b_u.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(A, lower, upper, slope)
        ctx.upper_side, ctx.inside = upper_side, inside
        return out, bias

    @staticmethod
    def backward(ctx, g_out: Tensor | None, g_bias: Tensor | None):
        A, lower, upper, slope = ctx.saved_tensors
        upper_side = ctx.upper_side
        need_lu = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        need_slope = ctx.needs_input_grad[3]
        if g_out is None:
            g_out = torch.zeros_like(A)
        if g_bias is None:
            g_bias = A.new_zeros(A.shape[:2])
        _, d_u, b_u = crown_relu_relaxation(lower, upper, 0)
        d_u1, b_u1, gb = d_u.unsqueeze(1), b_u.unsqueeze(1), g_bias.unsqueeze(-1)
        pos = A > 0
        zero = A.new_zeros(())
        grad_A = grad_l = grad_u = grad_slope = None
        if ctx.needs_input_grad[0]:
            g_dl = g_out * _lower_slopes(lower, upper, slope, ctx.inside)
            g_line = torch.addcmul(g_out * d_u1, gb, b_u1)       # the upper line's side, with its bias
            grad_A = torch.where(pos, g_line, g_dl) if upper_side else torch.where(pos, g_dl, g_line)
            del g_dl, g_line
        if need_slope:
            gA_A = g_out * A
            g_s = torch.where(pos, zero, gA_A) if upper_side else torch.where(pos, gA_A, zero)
            if slope.shape[1] == 1 and A.shape[1] != 1:
                g_s = g_s.sum(1, keepdim=True)
            free = ((lower < 0) & (upper > 0)).unsqueeze(1)
            if not ctx.inside:
                free = free & (slope >= 0) & (slope <= 1)
            grad_slope = torch.where(free, g_s, zero)
            del g_s, gA_A
        if need_lu:   # through the upper line alone: the bounds' gradients of the step with any lower-slope rule
            _, grad_l, grad_u = CROWN_RELU_BACKWARD_GRAD(A, lower, upper, 0, upper_side, g_out, g_bias, True)
        return grad_A, grad_l, grad_u, grad_slope, None


def relu_step_with_slopes(A: Tensor, lower: Tensor, upper: Tensor, slope: Tensor,
                          upper_side: bool) -> tuple[Tensor, Tensor]:
    """``(A', bias)`` of the ReLU step with explicit lower slopes (module docstring): ``A`` (B, S, N), ``lower,
    upper`` (B, N), ``slope`` (B, 1 or S, N), all of one dtype and device. The bounds of
    ``robustkern.ops.crown.crown_relu_backward_slopes`` up to rounding, computed in fewer passes."""
    B, S, N = A.shape
    if slope.dim() != 3 or slope.shape[0] != B or slope.shape[2] != N or slope.shape[1] not in (1, S):
        raise ValueError(f"relu_step_with_slopes: slope must have shape ({B}, 1, {N}) or ({B}, {S}, {N}), got "
                         f"{tuple(slope.shape)}")
    return _SlopeStep.apply(A, lower, upper, slope, bool(upper_side))
