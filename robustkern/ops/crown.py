"""Linear-relaxation (CROWN) ops: ``robustkern::crown_relu_backward``, ``robustkern::crown_relu_backward_slopes``
and ``robustkern::crown_concretize``.

The math and the float64 ground truth are in ``robustkern.reference.crown``. Each is an op of the table
``robustkern.ops._registry`` (C++ schema in ``csrc/ops.cpp``): the Triton kernel (``robustkern.kernels.crown``;
CUDA, or CPU under ``TRITON_INTERPRET=1``), the C++ CPU kernel (``csrc/cpu/crown_cpu.cpp``) or the
pure-PyTorch reference. There is no CUDA C++ kernel: on CUDA ``auto`` picks Triton, and requesting ``cuda``
raises ``BackendUnavailable``.

``crown_relu_backward_slopes`` is the ReLU step with explicit (optimisable) lower slopes (alpha-CROWN): a
composite op, its reference only, whatever backend is requested, written in few passes over (B, S, N): forward
``A' = A where(A > 0, d_l, d_u)`` (lower side) and the bias as one batched product, five passes besides
forming ``d_l`` (two over the slopes); its backward op
``crown_relu_backward_slopes_grad`` gives the gradients with respect to ``A`` and the slopes (sharing the sign
split and ``g A``), and those with respect to the bounds are ``crown_relu_backward_grad``'s (through the upper
line alone, whatever the lower slopes). It saves its inputs ``A``, the bounds and the slopes.

Backward passes are the ops ``crown_relu_backward_grad`` and ``crown_concretize_grad``: single-pass C++ kernels
where the compiled backend runs and no double backward is recorded (the concretisation's for the box only),
otherwise their differentiable references (``robustkern.reference.crown``), so double backward works. Both save only the
op's inputs: the ReLU step saves ``A`` and the bounds ``(l, u)``, and recomputes the slopes and the sign split
from them, instead of keeping ``A+``, ``A-`` and four slope tensors as auto_LiRPA's ``ClampedMultiplication``
does. Gradients with respect to ``l, u`` flow through the upper line ``d_u(l, u)``, ``b_u(l, u)`` (and
through ``d_l = d_u`` in the "same-slope" mode; the other lower slopes are piecewise constant).

``crown_concretize`` over a box whose centre and radius need no gradient keeps the signs of ``A`` as int8 (a
quarter of float32's bytes), not ``A``: the gradient ``g (mid -/+ sign(A) rad)`` needs nothing else (the
backward op ``crown_concretize_sign_grad``). ``A`` is kept when the box needs a gradient (``sum_S g A``,
``sum_S g |A|``) or for an L2 ball.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import crown as _ref
from ..reference.crown import RELU_LOWER_MODES
from ._registry import define_op, triton_kernel


__all__ = ["crown_relu_backward", "crown_relu_backward_slopes", "crown_relu_lower_slopes", "crown_concretize",
           "RELU_LOWER_MODES"]

_FLOATS = (torch.float32, torch.float64)



def _no_double_backward(backend, args):
    """The C++ backward kernels are not differentiable: they serve only when no double backward is recorded."""
    return "a double backward is recorded" if torch.is_grad_enabled() else None


def _check(op: str, A: Tensor, **vecs) -> None:
    if A.dtype not in _FLOATS:
        raise TypeError(f"{op}: A must be float32 or float64, got {A.dtype}")
    if A.dim() != 3:
        raise ValueError(f"{op}: A must be (B, S, N), got shape {tuple(A.shape)}")
    B, S, N = A.shape
    for name, (t, shape) in vecs.items():
        if t is None:
            continue
        want = {"BN": (B, N), "BS": (B, S), "B": (B,)}[shape]
        if tuple(t.shape) != want:
            raise ValueError(f"{op}: {name} must have shape {want}, got {tuple(t.shape)}")
        if t.dtype != A.dtype or t.device != A.device:
            raise ValueError(f"{op}: {name} must have A's dtype and device ({A.dtype}, {A.device})")


# ----------------------------------------------------------------------------------------------- relu step
def _relu_fake(A, lower, upper, mode, upper_side):
    return torch.empty_like(A), A.new_empty(A.shape[:2])


def _relu_setup(ctx, inputs, output):
    A, lower, upper, mode, upper_side = inputs
    ctx.mode, ctx.upper_side = mode, upper_side
    ctx.save_for_backward(A, lower, upper)


def _relu_grad_fake(A, lower, upper, mode, upper_side, g_A, g_bias, need_lu):
    lu = (torch.empty_like(lower), torch.empty_like(upper)) if need_lu else (lower.new_empty(0), upper.new_empty(0))
    return (torch.empty_like(A),) + lu


CROWN_RELU_BACKWARD_GRAD = define_op(
    "crown_relu_backward_grad", reference=_ref.crown_relu_backward_grad, cpp=True, public=False,
    serves=_no_double_backward, fake=_relu_grad_fake)


def _relu_backward(ctx, g_A, g_bias):
    A, lower, upper = ctx.saved_tensors
    need_lu = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    g_A = torch.zeros_like(A) if g_A is None else g_A
    g_bias = A.new_zeros(A.shape[:2]) if g_bias is None else g_bias
    grad_A, grad_l, grad_u = CROWN_RELU_BACKWARD_GRAD(A, lower, upper, ctx.mode, ctx.upper_side, g_A, g_bias,
                                                      need_lu)
    return grad_A, (grad_l if need_lu else None), (grad_u if need_lu else None), None, None


CROWN_RELU_BACKWARD = define_op(
    "crown_relu_backward", reference=_ref.crown_relu_backward,
    triton=triton_kernel("crown", "crown_relu_backward"), cpp=True, fake=_relu_fake, setup_context=_relu_setup,
    backward=_relu_backward, keeps=((0, 1, 2), ()))


def crown_relu_backward(A: Tensor, lower: Tensor, upper: Tensor, mode: int | str = "adaptive",
                        upper_side: bool = False) -> tuple[Tensor, Tensor]:
    """One backward step of linear bound propagation through a ReLU, fused: ``A`` (B, S, N) are the
    coefficients of the ReLU's output, ``lower, upper`` (B, N) the bounds of its input. Returns ``(A', bias)``,
    ``A'`` (B, S, N) the coefficients of the input and ``bias`` (B, S) the constant collected, for the lower side
    (``A' = d_l A+ + d_u A-``, ``bias = sum A- b_u``) or the upper side (mirrored). ``mode`` is the lower slope:
    "adaptive" (default), "zero", "one", "same-slope" (or 0..3). See ``robustkern.reference.crown``."""
    op = "crown_relu_backward"
    if isinstance(mode, str):
        if mode not in RELU_LOWER_MODES:
            raise ValueError(f"{op}: mode must be one of {sorted(RELU_LOWER_MODES)}, got {mode!r}")
        mode = RELU_LOWER_MODES[mode]
    if mode not in (0, 1, 2, 3):
        raise ValueError(f"{op}: mode must be 0..3, got {mode}")
    _check(op, A, lower=(lower, "BN"), upper=(upper, "BN"))
    return CROWN_RELU_BACKWARD(A, lower, upper, int(mode), bool(upper_side))


def crown_relu_relaxation(lower: Tensor, upper: Tensor, mode: int | str = "adaptive") -> tuple[Tensor, Tensor, Tensor]:
    """``(d_l, d_u, b_u)``, element-wise: the ReLU relaxation that ``crown_relu_backward`` applies in ``mode`` for
    the ReLU input bounds ``lower, upper`` (lower line ``d_l z``, upper line ``d_u z + b_u``;
    ``robustkern.reference.crown``), for algorithms that apply it to coefficients of another layout."""
    if isinstance(mode, str):
        if mode not in RELU_LOWER_MODES:
            raise ValueError(f"crown_relu_relaxation: mode must be one of {sorted(RELU_LOWER_MODES)}, got {mode!r}")
        mode = RELU_LOWER_MODES[mode]
    return _ref.relu_relaxation(lower, upper, int(mode))


def crown_relu_lower_slopes(lower: Tensor, upper: Tensor, mode: int | str = "adaptive") -> Tensor:
    """The lower slopes (B, N) that ``crown_relu_backward`` uses in ``mode`` for the ReLU input bounds
    ``lower, upper`` (B, N): where alpha-CROWN's optimised slopes start."""
    return crown_relu_relaxation(lower, upper, mode)[0]


def crown_relu_explicit_lower(lower: Tensor, upper: Tensor, slope: Tensor) -> Tensor:
    """The lower slopes that ``crown_relu_backward_slopes`` uses for explicit ``slope``, element-wise (the three
    broadcast): ``clamp(slope, 0, 1)`` on unstable neurons, 1 on active, 0 on inactive ones."""
    return _ref.explicit_lower_slopes(lower, upper, slope)


# ----------------------------------------------------------------------------------------------- relu step, slopes
def _slopes_setup(ctx, inputs, output):
    A, lower, upper, slope, upper_side = inputs
    ctx.upper_side = upper_side
    ctx.save_for_backward(A, lower, upper, slope)


def _slopes_grad_fake(A, lower, upper, slope, upper_side, g_A, g_bias, need_A, need_slope):
    return (torch.empty_like(A) if need_A else A.new_empty(0)), \
        (torch.empty_like(slope) if need_slope else slope.new_empty(0))


CROWN_RELU_BACKWARD_SLOPES_GRAD = define_op(
    "crown_relu_backward_slopes_grad", reference=_ref.crown_relu_backward_slopes_grad, public=False, composite=True,
    schema="crown_relu_backward_slopes_grad(Tensor A, Tensor lower, Tensor upper, Tensor slope, bool upper_side, "
           "Tensor g_A, Tensor g_bias, bool need_A, bool need_slope) -> (Tensor, Tensor)",
    fake=_slopes_grad_fake)


def _slopes_backward(ctx, g_A, g_bias):
    A, lower, upper, slope = ctx.saved_tensors
    need_A, need_lu, need_slope = (bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1] or
                                   ctx.needs_input_grad[2]), bool(ctx.needs_input_grad[3]))
    g_A = torch.zeros_like(A) if g_A is None else g_A
    g_bias = A.new_zeros(A.shape[:2]) if g_bias is None else g_bias
    grad_A = grad_l = grad_u = grad_s = None
    if need_A or need_slope:
        grad_A, grad_s = CROWN_RELU_BACKWARD_SLOPES_GRAD(A, lower, upper, slope, ctx.upper_side, g_A, g_bias, need_A,
                                                         need_slope)
    if need_lu:   # through the upper line alone: those of the step with any lower-slope rule (mode 0's here)
        _, grad_l, grad_u = CROWN_RELU_BACKWARD_GRAD(A, lower, upper, 0, ctx.upper_side, g_A, g_bias, True)
    return (grad_A if need_A else None), grad_l, grad_u, (grad_s if need_slope else None), None


CROWN_RELU_BACKWARD_SLOPES = define_op(
    "crown_relu_backward_slopes", reference=_ref.crown_relu_backward_slopes,
    schema="crown_relu_backward_slopes(Tensor A, Tensor lower, Tensor upper, Tensor slope, bool upper_side) "
           "-> (Tensor, Tensor)",
    fake=lambda A, lower, upper, slope, upper_side: (torch.empty_like(A), A.new_empty(A.shape[:2])),
    setup_context=_slopes_setup, backward=_slopes_backward, composite=True)


def crown_relu_backward_slopes(A: Tensor, lower: Tensor, upper: Tensor, slope: Tensor,
                               upper_side: bool = False) -> tuple[Tensor, Tensor]:
    """``crown_relu_backward`` with the lower slopes given per neuron: ``slope`` (B, 1, N) (one per neuron,
    shared by the specification rows) or (B, S, N) (one per neuron and row), clamped to [0, 1] on the unstable
    neurons (``lower < 0 < upper``); stable neurons take 1 (``lower >= 0``) and 0 (``upper <= 0``). Any slope in
    [0, 1] is a valid lower line, so ``(A', bias)`` is a bound step whatever ``slope`` holds. Differentiable with
    respect to ``A``, ``lower``, ``upper`` and ``slope`` (see ``robustkern.reference.crown``)."""
    op = "crown_relu_backward_slopes"
    _check(op, A, lower=(lower, "BN"), upper=(upper, "BN"))
    B, S, N = A.shape
    if not isinstance(slope, Tensor) or slope.dim() != 3 or slope.shape[0] != B or slope.shape[2] != N or \
            slope.shape[1] not in (1, S):
        got = tuple(slope.shape) if isinstance(slope, Tensor) else type(slope).__name__
        raise ValueError(f"{op}: slope must have shape ({B}, 1, {N}) or ({B}, {S}, {N}), got {got}")
    if slope.dtype != A.dtype or slope.device != A.device:
        raise ValueError(f"{op}: slope must have A's dtype and device ({A.dtype}, {A.device})")
    return CROWN_RELU_BACKWARD_SLOPES(A, lower, upper, slope, bool(upper_side))


# ----------------------------------------------------------------------------------------------- concretize
def _concretize_fake(A, bias, mid, rad, center, eps, upper_side):
    return A.new_empty(A.shape[:2])


def _concretize_grad_fake(A, mid, rad, g, upper_side):
    return torch.empty_like(A), torch.empty_like(mid), torch.empty_like(rad)


CROWN_CONCRETIZE_GRAD = define_op(
    "crown_concretize_grad", reference=_ref.crown_concretize_grad, cpp=True, public=False,
    serves=_no_double_backward, fake=_concretize_grad_fake)

CROWN_CONCRETIZE_SIGN_GRAD = define_op(
    "crown_concretize_sign_grad", reference=_ref.crown_concretize_sign_grad, public=False, composite=True,
    schema="crown_concretize_sign_grad(Tensor signs, Tensor mid, Tensor rad, Tensor g, bool upper_side) -> Tensor",
    fake=lambda signs, mid, rad, g, upper_side: g.new_empty(signs.shape))


def _concretize_setup(ctx, inputs, output):
    A, bias, mid, rad, center, eps, upper_side = inputs
    ctx.upper_side = upper_side
    ctx.l2 = center is not None
    # over a box whose centre and radius need no gradient, the gradient of A needs only A's signs: kept as int8
    ctx.signs_only = not ctx.l2 and not (mid.requires_grad or rad.requires_grad)
    if ctx.signs_only:
        signs = torch.sign(A).to(torch.int8) if A.requires_grad else A.new_empty(0, dtype=torch.int8)
        ctx.save_for_backward(signs, mid, rad)
    else:
        ctx.save_for_backward(A, mid, rad, center, eps)


def _concretize_backward(ctx, g):
    if ctx.signs_only:
        signs, mid, rad = ctx.saved_tensors
        grad_A = CROWN_CONCRETIZE_SIGN_GRAD(signs, mid, rad, g, ctx.upper_side) if ctx.needs_input_grad[0] else None
        return grad_A, g, None, None, None, None, None
    A, mid, rad, center, eps = ctx.saved_tensors
    sign = 1.0 if ctx.upper_side else -1.0
    if not ctx.l2:
        grad_A, g_mid, g_rad = CROWN_CONCRETIZE_GRAD(A, mid, rad, g, ctx.upper_side)
        return grad_A, g, g_mid, g_rad, None, None, None
    # recompute which of the two bounds was taken
    box = (A * mid.unsqueeze(1)).sum(-1) + sign * (A.abs() * rad.unsqueeze(1)).sum(-1)
    nrm = A.norm(dim=-1)
    ball = (A * center.unsqueeze(1)).sum(-1) + sign * eps.unsqueeze(1) * nrm
    take_box = (box <= ball) if ctx.upper_side else (box >= ball)
    gb, gl = torch.where(take_box, g, 0.0), torch.where(take_box, 0.0, g)
    gls = gl.unsqueeze(-1)
    unit = A / nrm.clamp_min(torch.finfo(A.dtype).tiny).unsqueeze(-1)
    grad_A, g_mid, g_rad = CROWN_CONCRETIZE_GRAD(A, mid, rad, gb, ctx.upper_side)
    grad_A = grad_A + gls * (center.unsqueeze(1) + sign * eps.view(-1, 1, 1) * unit)
    g_center = (gls * A).sum(1)
    g_eps = sign * (gl * nrm).sum(1)
    return grad_A, g, g_mid, g_rad, g_center, g_eps, None


CROWN_CONCRETIZE = define_op(
    "crown_concretize", ieee=True, reference=_ref.crown_concretize,
    triton=triton_kernel("crown", "crown_concretize"), cpp=True, fake=_concretize_fake,
    setup_context=_concretize_setup, backward=_concretize_backward)


def crown_concretize(A: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, center: Optional[Tensor] = None,
                     eps: Optional[Tensor] = None, upper_side: bool = False) -> Tensor:
    """The lower (or upper) bound of ``A x + bias`` over the box ``|x - mid| <= rad`` and, when ``center``
    (B, N) and ``eps`` (B,) are given, also over the L2 ball ``||x - center||_2 <= eps``, taking the tighter
    of the two (the box being the ball's clipped bounding box). ``A`` (B, S, N), ``bias`` (B, S),
    ``mid, rad`` (B, N). Returns (B, S)."""
    op = "crown_concretize"
    if (center is None) != (eps is None):
        raise ValueError(f"{op}: give both center and eps (an L2 ball) or neither")
    _check(op, A, bias=(bias, "BS"), mid=(mid, "BN"), rad=(rad, "BN"), center=(center, "BN"), eps=(eps, "B"))
    return CROWN_CONCRETIZE(A, bias, mid, rad, center, eps, bool(upper_side))
