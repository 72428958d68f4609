"""Linear-relaxation (CROWN) ops: ``robustkern::crown_relu_backward`` and ``robustkern::crown_concretize``.

The math and the float64 ground truth are in ``robustkern.reference.crown``. Each op is a
``torch.library.custom_op`` that runs the Triton kernel (``robustkern.kernels.crown``; CUDA, or CPU under
``TRITON_INTERPRET=1``), the C++ CPU kernel (``csrc/cpu/crown_cpu.cpp``; ``auto`` picks it on CPU when the
extension has the op) or the pure-PyTorch reference. There is no CUDA C++ kernel: on CUDA ``auto`` picks
Triton, and requesting ``cuda`` raises ``BackendUnavailable``.

Backward passes are written with differentiable PyTorch ops (so double backward works); when the ``cpp``
backend runs and no double backward is recorded they call the single-pass C++ backward ops instead
(``robustkern_ext::crown_relu_backward_grad``, ``crown_concretize_grad`` (box only)). Both save only the
op's inputs: the ReLU step saves ``A`` and the bounds ``(l, u)``, and recomputes the slopes and the sign split
from them, instead of keeping ``A+``, ``A-`` and four slope tensors as auto_LiRPA's ``ClampedMultiplication``
does. Gradients with respect to ``l, u`` flow through the upper line ``d_u(l, u)``, ``b_u(l, u)`` (and
through ``d_l = d_u`` in the "same-slope" mode; the other lower slopes are piecewise constant).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..reference.crown import RELU_LOWER_MODES
from .._backend import select
from ._dispatch import fresh, run

__all__ = ["crown_relu_backward", "crown_concretize", "RELU_LOWER_MODES"]

_FLOATS = (torch.float32, torch.float64)


def _run(name: str, device: torch.device, *args):
    return run("crown", name, device, *args)


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
@torch.library.custom_op("robustkern::crown_relu_backward", mutates_args=())
def _crown_relu_backward(A: Tensor, lower: Tensor, upper: Tensor, mode: int, upper_side: bool
                         ) -> Tuple[Tensor, Tensor]:
    return fresh(_run("crown_relu_backward", A.device, A, lower, upper, mode, upper_side), (A, lower, upper))


@_crown_relu_backward.register_fake
def _(A, lower, upper, mode, upper_side):
    return torch.empty_like(A), A.new_empty(A.shape[:2])


def _relu_setup(ctx, inputs, output):
    A, lower, upper, mode, upper_side = inputs
    ctx.mode, ctx.upper_side = mode, upper_side
    ctx.save_for_backward(A, lower, upper)


def _upper_line_grads(lower: Tensor, upper: Tensor, g_du: Tensor, g_bu: Tensor):
    """Gradients of ``d_u = U/(U-L)``, ``b_u = -L d_u`` (``L = min(l,0)``, ``U = max(max(u,0), L+1e-8)``)
    with respect to ``l, u``, given the gradients ``g_du, g_bu`` of the two."""
    L = torch.clamp(lower, max=0)
    up0 = torch.clamp(upper, min=0)
    guard = up0 < L + 1e-8
    U = torch.where(guard, L + 1e-8, up0)
    inv = 1.0 / (U - L) ** 2
    d_u = U / (U - L)
    gU = g_du * (-L * inv) + g_bu * (L * L * inv)
    gL = g_du * (U * inv) + g_bu * (-d_u - L * U * inv)
    gL = gL + torch.where(guard, gU, torch.zeros_like(gU))
    g_u = torch.where(guard | (upper <= 0), torch.zeros_like(gU), gU)
    g_l = torch.where(lower < 0, gL, torch.zeros_like(gL))
    return g_l, g_u


_FUSED_FAKES: set = set()  # the compiled backward ops whose fake kernels are registered


def _fused_backward(device: torch.device, name: str) -> bool:
    """Whether the compiled single-pass backward op ``name`` runs: the backend chosen for ``device`` is
    ``cpp`` and has the op, and no double backward is being recorded (grad mode is off inside a backward
    pass unless ``create_graph=True``; the compiled op is not differentiable). Registers its fake kernel on
    first use (the op exists only once the extension is loaded)."""
    if torch.is_grad_enabled() or select(device, op=name) != "cpp":
        return False
    if name not in _FUSED_FAKES:
        if name == "crown_relu_backward_grad":
            @torch.library.register_fake("robustkern_ext::crown_relu_backward_grad")
            def _(A, lower, upper, mode, upper_side, g_A, g_bias, need_lu):
                lu = (torch.empty_like(lower), torch.empty_like(upper)) if need_lu else \
                    (lower.new_empty(0), upper.new_empty(0))
                return (torch.empty_like(A),) + lu
        else:
            @torch.library.register_fake("robustkern_ext::crown_concretize_grad")
            def _(A, mid, rad, g, upper_side):
                return torch.empty_like(A), torch.empty_like(mid), torch.empty_like(rad)
        _FUSED_FAKES.add(name)
    return True


def _relu_backward(ctx, g_A, g_bias):
    from ..reference.crown import relu_relaxation

    A, lower, upper = ctx.saved_tensors
    if _fused_backward(A.device, "crown_relu_backward_grad"):
        need_lu = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        g_A = torch.zeros_like(A) if g_A is None else g_A
        g_bias = A.new_zeros(A.shape[:2]) if g_bias is None else g_bias
        grad_A, grad_l, grad_u = torch.ops.robustkern_ext.crown_relu_backward_grad(
            A, lower, upper, ctx.mode, ctx.upper_side, g_A, g_bias, need_lu)
        return grad_A, (grad_l if need_lu else None), (grad_u if need_lu else None), None, None
    d_l, d_u, b_u = (t.unsqueeze(1) for t in relu_relaxation(lower, upper, ctx.mode))
    pos = A > 0
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    if ctx.upper_side:
        d_p, d_n, b_p, b_n = d_u, d_l, b_u, zero
    else:
        d_p, d_n, b_p, b_n = d_l, d_u, zero, b_u
    g_A = torch.zeros_like(A) if g_A is None else g_A
    g_bias = torch.zeros(A.shape[:2], dtype=A.dtype, device=A.device) if g_bias is None else g_bias
    gb = g_bias.unsqueeze(-1)
    grad_A = g_A * torch.where(pos, d_p, d_n) + gb * torch.where(pos, b_p, b_n)
    grad_l = grad_u = None
    if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
        gA_A = g_A * A
        Ap, An = torch.where(pos, A, zero), torch.where(pos, zero, A)
        if ctx.upper_side:   # d_u multiplies A+, b_u pairs with A+, d_l multiplies A-
            g_du = torch.where(pos, gA_A, zero).sum(1)
            g_bu = (gb * Ap).sum(1)
            g_dl = torch.where(pos, zero, gA_A).sum(1)
        else:
            g_du = torch.where(pos, zero, gA_A).sum(1)
            g_bu = (gb * An).sum(1)
            g_dl = torch.where(pos, gA_A, zero).sum(1)
        if ctx.mode == 3:
            g_du = g_du + g_dl
        grad_l, grad_u = _upper_line_grads(lower, upper, g_du, g_bu)
    return grad_A, grad_l, grad_u, None, None


_crown_relu_backward.register_autograd(_relu_backward, setup_context=_relu_setup)


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
    return _crown_relu_backward(A, lower, upper, int(mode), bool(upper_side))


# ----------------------------------------------------------------------------------------------- concretize
@torch.library.custom_op("robustkern::crown_concretize", mutates_args=())
def _crown_concretize(A: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, center: Optional[Tensor],
                      eps: Optional[Tensor], upper_side: bool) -> Tensor:
    out = _run("crown_concretize", A.device, A, bias, mid, rad, center, eps, upper_side)
    return fresh((out,), (A, bias, mid, rad, center, eps))[0]


@_crown_concretize.register_fake
def _(A, bias, mid, rad, center, eps, upper_side):
    return A.new_empty(A.shape[:2])


def _concretize_setup(ctx, inputs, output):
    A, bias, mid, rad, center, eps, upper_side = inputs
    ctx.upper_side = upper_side
    ctx.l2 = center is not None
    ctx.save_for_backward(A, mid, rad, center, eps)


def _concretize_backward(ctx, g):
    A, mid, rad, center, eps = ctx.saved_tensors
    sign = 1.0 if ctx.upper_side else -1.0
    gs = g.unsqueeze(-1)
    g_center = g_eps = None
    if not ctx.l2:
        if _fused_backward(A.device, "crown_concretize_grad"):
            grad_A, g_mid, g_rad = torch.ops.robustkern_ext.crown_concretize_grad(A, mid, rad, g, ctx.upper_side)
            return grad_A, g, g_mid, g_rad, None, None, None
        grad_A = gs * (mid.unsqueeze(1) + sign * torch.sign(A) * rad.unsqueeze(1))
        g_mid = (gs * A).sum(1)
        g_rad = sign * (gs * A.abs()).sum(1)
        return grad_A, g, g_mid, g_rad, None, None, None
    # recompute which of the two bounds was taken
    box = (A * mid.unsqueeze(1)).sum(-1) + sign * (A.abs() * rad.unsqueeze(1)).sum(-1)
    nrm = A.norm(dim=-1)
    ball = (A * center.unsqueeze(1)).sum(-1) + sign * eps.unsqueeze(1) * nrm
    take_box = (box <= ball) if ctx.upper_side else (box >= ball)
    gb, gl = torch.where(take_box, g, 0.0), torch.where(take_box, 0.0, g)
    gbs, gls = gb.unsqueeze(-1), gl.unsqueeze(-1)
    unit = A / nrm.clamp_min(torch.finfo(A.dtype).tiny).unsqueeze(-1)
    grad_A = gbs * (mid.unsqueeze(1) + sign * torch.sign(A) * rad.unsqueeze(1)) + \
        gls * (center.unsqueeze(1) + sign * eps.view(-1, 1, 1) * unit)
    g_mid = (gbs * A).sum(1)
    g_rad = sign * (gbs * A.abs()).sum(1)
    g_center = (gls * A).sum(1)
    g_eps = sign * (gl * nrm).sum(1)
    return grad_A, g, g_mid, g_rad, g_center, g_eps, None


_crown_concretize.register_autograd(_concretize_backward, setup_context=_concretize_setup)


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
    return _crown_concretize(A, bias, mid, rad, center, eps, bool(upper_side))
