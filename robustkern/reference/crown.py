"""Pure-PyTorch ground truth for the linear-relaxation (CROWN) ops, float64-capable, and an independent
dense-matrix CROWN / CROWN-IBP for ``nn.Sequential`` models (the test oracle of ``robustkern.bounds.crown``).

Backward linear bound propagation (Zhang et al. 2018, "Efficient Neural Network Robustness Certification
with General Activation Functions" (CROWN); Zhang et al. 2020, "Towards Stable and Efficient Training of
Verifiably Robust Neural Networks" (CROWN-IBP)). A lower bound on a specification ``f(x)`` is kept as a
linear function ``f >= A h + c`` of a layer's output ``h``; it is pushed backwards layer by layer until ``h``
is the input, where it is concretised over the input set.

ReLU relaxation for a pre-activation ``z`` in ``[l, u]`` (``l- = min(l, 0)``, ``u+ = max(u, 0)`` guarded as
``u+ = max(u+, l- + 1e-8)``)::

    upper line   relu(z) <= d_u z + b_u,   d_u = u+ / (u+ - l-),   b_u = -l- d_u
    lower line   relu(z) >= d_l z,         d_l in [0, 1]

The lower slope ``mode``: 0 "adaptive" ``d_l = 1[u+ > -l-]`` (CROWN-IBP's choice), 1 "zero"
``d_l = 1[l >= 0]``, 2 "one" ``d_l = 1[u > 0]``, 3 "same-slope" ``d_l = d_u``. Any ``d_l`` in [0, 1] is valid;
the stable cases get 1 (active) and 0 (inactive) in every mode.

``crown_relu_backward(A, lower, upper, mode, upper_side)``: ``A`` (B, S, N) coefficients of the ReLU output,
``lower, upper`` (B, N) its input's bounds. For the lower side (a lower bound on ``A h``), positive entries take
the lower line and negative entries the upper line::

    A' = d_l A+ + d_u A-,          bias = sum_N A- b_u

and the upper side mirrors it (``A' = d_u A+ + d_l A-``, ``bias = sum_N A+ b_u``). Returns ``(A', bias)`` with
``bias`` (B, S).

``crown_relu_backward_slopes(A, lower, upper, slope, upper_side)``: the same step with explicit lower slopes
``slope`` (B, 1, N) (one per neuron, shared by the specifications: Lee et al. 2021, "Loss Landscape Matters")
or (B, S, N) (one per neuron and specification row: alpha-CROWN, Xu et al. 2021), for the unstable neurons
(``l < 0 < u``), clamped to [0, 1]; stable neurons get 1 (``l >= 0``) and 0 (``u <= 0``), as auto_LiRPA's
``BoundRelu`` masks its alphas. Every slope in [0, 1] gives a valid lower line, so the result is a bound
whatever ``slope`` holds.

``crown_concretize(A, bias, mid, rad, center, eps, upper_side)``: the bound of ``A x + bias`` over the box
``|x - mid| <= rad`` (L-inf, clipped): ``A mid + bias -/+ |A| rad``; with ``center, eps`` (an L2 ball
``||x - center||_2 <= eps`` whose clipped box is ``(mid, rad)``) also ``A center + bias -/+ eps ||A||_2`` (the
dual norm), and the tighter of the two: both are valid bounds of the same linear function over a superset of
the ball-and-box set, so their max (lower) / min (upper) is too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["RELU_LOWER_MODES", "relu_relaxation", "crown_relu_backward", "crown_concretize", "crown_relu_backward_grad",
           "crown_concretize_grad", "crown_concretize_sign_grad", "slope_lower_line", "crown_relu_backward_slopes",
           "crown_relu_backward_slopes_grad", "dense_crown"]

RELU_LOWER_MODES = {"adaptive": 0, "zero": 1, "one": 2, "same-slope": 3}


def relu_relaxation(lower: Tensor, upper: Tensor, mode: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """``(d_l, d_u, b_u)`` of the ReLU relaxation above, element-wise."""
    lm = torch.clamp(lower, max=0)
    up = torch.maximum(torch.clamp(upper, min=0), lm + 1e-8)
    d_u = up / (up - lm)
    b_u = -lm * d_u
    if mode == 0:
        d_l = (up > -lm).to(lower.dtype)
    elif mode == 1:
        d_l = (lower >= 0).to(lower.dtype)
    elif mode == 2:
        d_l = (upper > 0).to(lower.dtype)
    elif mode == 3:
        d_l = d_u
    else:
        raise ValueError(f"relu lower-slope mode must be 0..3, got {mode}")
    return d_l, d_u, b_u


def crown_relu_backward(A: Tensor, lower: Tensor, upper: Tensor, mode: int, upper_side: bool):
    d_l, d_u, b_u = relu_relaxation(lower, upper, mode)
    d_l, d_u, b_u = d_l.unsqueeze(1), d_u.unsqueeze(1), b_u.unsqueeze(1)
    pos, neg = A.clamp(min=0), A.clamp(max=0)
    if upper_side:
        return pos * d_u + neg * d_l, (pos * b_u).sum(-1)
    return pos * d_l + neg * d_u, (neg * b_u).sum(-1)


def crown_concretize(A: Tensor, bias: Tensor, mid: Tensor, rad: Tensor, center: Tensor | None, eps: Tensor | None,
                     upper_side: bool) -> Tensor:
    sign = 1.0 if upper_side else -1.0
    val = torch.bmm(A, mid.unsqueeze(-1)).squeeze(-1) + bias
    val = val + sign * torch.bmm(A.abs(), rad.unsqueeze(-1)).squeeze(-1)
    if center is not None:
        ball = torch.bmm(A, center.unsqueeze(-1)).squeeze(-1) + bias + sign * eps.unsqueeze(1) * A.norm(dim=-1)
        val = torch.minimum(val, ball) if upper_side else torch.maximum(val, ball)
    return val


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


def _grad_A(pos: Tensor, on_lower: Tensor, d_u: Tensor, b_u: Tensor, upper_side: bool, g_A: Tensor, g_bias: Tensor):
    """The gradient with respect to ``A`` of a ReLU step with lower slopes ``d_l`` and upper line ``d_u, b_u``:
    ``on_lower = g_A d_l`` where ``A`` takes the lower line (``A > 0`` on the lower side, ``A <= 0`` on the upper)
    and ``g_A d_u + g_bias b_u`` where it takes the upper line (three (B, S, N) tensors live at most). Returns
    ``(grad_A, g_bias (B, S, 1))``; ``pos`` is ``A > 0``."""
    gb = g_bias.unsqueeze(-1)
    on_upper = torch.addcmul(g_A * d_u, gb, b_u)
    return (torch.where(pos, on_upper, on_lower) if upper_side else torch.where(pos, on_lower, on_upper)), gb


def crown_relu_backward_grad(A: Tensor, lower: Tensor, upper: Tensor, mode: int, upper_side: bool, g_A: Tensor,
                             g_bias: Tensor, need_lu: bool):
    """The backward pass of ``crown_relu_backward``: ``(grad_A, grad_lower, grad_upper)`` from the gradients
    ``g_A, g_bias`` of its outputs (the bound gradients empty unless ``need_lu``). In differentiable PyTorch ops:
    a double backward runs through it. Gradients w.r.t. ``l, u`` flow through the upper line ``d_u(l, u)``,
    ``b_u(l, u)`` (and ``d_l = d_u`` in the "same-slope" mode; the other lower slopes are piecewise constant)."""
    d_l, d_u, b_u = (t.unsqueeze(1) for t in relu_relaxation(lower, upper, mode))
    pos = A > 0
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    grad_A, gb = _grad_A(pos, g_A * d_l, d_u, b_u, upper_side, g_A, g_bias)
    if not need_lu:
        return grad_A, lower.new_empty(0), upper.new_empty(0)
    gA_A = g_A * A
    Ap, An = torch.where(pos, A, zero), torch.where(pos, zero, A)
    if upper_side:   # d_u multiplies A+, b_u pairs with A+, d_l multiplies A-
        g_du = torch.where(pos, gA_A, zero).sum(1)
        g_bu = (gb * Ap).sum(1)
        g_dl = torch.where(pos, zero, gA_A).sum(1)
    else:
        g_du = torch.where(pos, zero, gA_A).sum(1)
        g_bu = (gb * An).sum(1)
        g_dl = torch.where(pos, gA_A, zero).sum(1)
    if mode == 3:
        g_du = g_du + g_dl
    grad_l, grad_u = _upper_line_grads(lower, upper, g_du, g_bu)
    return grad_A, grad_l, grad_u


def explicit_lower_slopes(lower: Tensor, upper: Tensor, slope: Tensor) -> Tensor:
    """The lower slopes used for explicit ``slope``, element-wise (the three broadcast): ``clamp(slope, 0, 1)``
    where ``lower < 0 < upper``, 1 where ``lower >= 0``, 0 where ``upper <= 0`` (the indicator taken as it is:
    two passes over ``slope``, no float copy of the bounds' masks)."""
    return torch.where((lower < 0) & (upper > 0), slope.clamp(0.0, 1.0), lower >= 0)


def slope_lower_line(lower: Tensor, upper: Tensor, slope: Tensor) -> Tensor:
    """The lower slopes ``d_l`` (B, S', N) used for explicit ``slope`` (B, S', N) with ``lower, upper`` (B, N)
    (``explicit_lower_slopes`` per specification row)."""
    return explicit_lower_slopes(lower.unsqueeze(1), upper.unsqueeze(1), slope)


def crown_relu_backward_slopes(A: Tensor, lower: Tensor, upper: Tensor, slope: Tensor, upper_side: bool):
    """``crown_relu_backward`` with the lower slopes given: ``d_l = slope_lower_line(lower, upper, slope)``.
    Entry by entry ``A' = A d`` with ``d = d_l`` where ``A`` takes the lower line and ``d = d_u`` where it takes
    the upper line (``A+ d_l + A- d_u`` on the lower side: the same products, the other term an exact zero), and
    ``bias = sum_N A- b_u`` (``A+`` on the upper side) as one batched product: five passes over (B, S, N) besides
    forming ``d_l`` (two over the slopes)."""
    _, d_u, b_u = relu_relaxation(lower, upper, 0)
    d_u = d_u.unsqueeze(1)
    pos = A > 0
    d_l = slope_lower_line(lower, upper, slope)
    out = A * (torch.where(pos, d_u, d_l) if upper_side else torch.where(pos, d_l, d_u))
    del d_l, pos                 # (B, S, N) each for per-row slopes: at most three such tensors live
    side = A.clamp(min=0) if upper_side else A.clamp(max=0)
    return out, torch.bmm(side, b_u.unsqueeze(-1)).squeeze(-1)


def crown_relu_backward_slopes_grad(A: Tensor, lower: Tensor, upper: Tensor, slope: Tensor, upper_side: bool,
                                    g_A: Tensor, g_bias: Tensor, need_A: bool, need_slope: bool):
    """The gradients of ``crown_relu_backward_slopes`` with respect to ``A`` and ``slope``: ``(grad_A,
    grad_slope)`` (one not needed is empty), from the gradients ``g_A, g_bias`` of its outputs. In differentiable
    PyTorch ops, so a double backward runs through it. ``d A'/d slope`` is ``A`` where ``A`` takes the lower line
    (``A > 0`` on the lower side, ``A <= 0`` on the upper) on the unstable neurons whose slope lies in [0, 1] (the
    clamp passes the gradient at its ends, as ``torch.clamp`` does; there ``d_l == slope``), summed over the
    specifications for a shared (B, 1, N) slope. The gradients with respect to ``l, u`` are
    ``crown_relu_backward_grad``'s for any lower-slope rule: they enter through the upper line ``d_u, b_u`` alone
    (the lower slope is piecewise constant in them)."""
    _, d_u, b_u = (t.unsqueeze(1) for t in relu_relaxation(lower, upper, 0))
    d_l = slope_lower_line(lower, upper, slope)
    empty = lower.new_empty(0)
    free = ((lower < 0) & (upper > 0)).unsqueeze(1) & (d_l == slope) if need_slope else None
    on_lower = g_A * d_l if need_A else None
    del d_l                      # (B, S, N) for per-row slopes: at most three such tensors live
    pos = A > 0
    grad_A = _grad_A(pos, on_lower, d_u, b_u, upper_side, g_A, g_bias)[0] if need_A else empty
    del on_lower
    if not need_slope:
        return grad_A, empty
    zero = torch.zeros((), dtype=A.dtype, device=A.device)
    g_A_A = g_A * A
    g_slope = torch.where(pos, zero, g_A_A) if upper_side else torch.where(pos, g_A_A, zero)
    del g_A_A
    if slope.shape[1] == 1 and A.shape[1] != 1:
        g_slope = g_slope.sum(1, keepdim=True)
    return grad_A, torch.where(free, g_slope, zero)


def crown_concretize_sign_grad(signs: Tensor, mid: Tensor, rad: Tensor, g: Tensor, upper_side: bool) -> Tensor:
    """The gradient with respect to ``A`` of ``crown_concretize`` over a box, ``g (mid -/+ sign(A) rad)``, from
    ``signs`` (B, S, N), any tensor with the signs of ``A`` (``A`` itself, or its signs as int8: a quarter of
    float32's bytes), and the gradient ``g`` (B, S) of the bound."""
    sign = 1.0 if upper_side else -1.0
    line = torch.addcmul(mid.unsqueeze(1), signs.to(g.dtype) if signs.dtype == torch.int8 else torch.sign(signs),
                         rad.unsqueeze(1), value=sign)      # the float signs die here: two (B, S, N) live at most
    return g.unsqueeze(-1) * line


def crown_concretize_grad(A: Tensor, mid: Tensor, rad: Tensor, g: Tensor, upper_side: bool):
    """The backward pass of ``crown_concretize`` over a box: ``(grad_A, grad_mid, grad_rad)`` from the gradient
    ``g`` (B, S) of the bound ``A mid + bias -/+ |A| rad``."""
    sign = 1.0 if upper_side else -1.0
    gs = g.unsqueeze(-1)
    return crown_concretize_sign_grad(A, mid, rad, g, upper_side), (gs * A).sum(1), sign * (gs * A.abs()).sum(1)


# ----------------------------------------------------------------------------------------------- dense oracle
def _dense_affine(layer: nn.Module, shape: tuple) -> tuple[Tensor, Tensor, tuple]:
    """(J, b, out_shape) with ``layer(h) = J h.flatten() + b`` for inputs of per-example ``shape``."""
    n = 1
    for s in shape:
        n *= s
    dt = next((p.dtype for p in layer.parameters()), torch.float64)
    basis = torch.eye(n, dtype=dt).reshape(n, *shape)
    zero = torch.zeros(1, *shape, dtype=dt)
    with torch.no_grad():
        b = layer(zero)
        J = (layer(basis) - b).reshape(n, -1).t()
    return J, b.reshape(-1), tuple(b.shape[1:])


def dense_crown(model: nn.Sequential, lower: Tensor, upper: Tensor, C: Tensor | None = None,
                method: str = "crown-ibp", relu_lower: str = "adaptive") -> tuple[Tensor, Tensor]:
    """Lower and upper bounds of ``C model(x)`` over the box ``[lower, upper]`` by CROWN-IBP (IBP for the
    intermediate bounds) or CROWN (backward bounds for every pre-activation, intersected with IBP), with
    every affine layer as a dense Jacobian (built by applying the layer to the identity basis). Independent
    of the graph code; meant for float64 and small models (eval-mode BatchNorm, Normalize, Conv2d, Linear,
    AvgPool2d, Flatten, ReLU). ``lower, upper`` (B, ...)."""
    mode = RELU_LOWER_MODES[relu_lower]
    shape = tuple(lower.shape[1:])
    B = lower.shape[0]
    layers: list = []  # ("affine", J, b) or ("relu",)
    for m in model:
        if isinstance(m, nn.ReLU):
            layers.append(("relu",))
            continue
        J, b, shape = _dense_affine(m, shape)
        if layers and layers[-1][0] == "affine":  # merge consecutive affine maps
            _, J0, b0 = layers.pop()
            J, b = J @ J0, J @ b0 + b
        layers.append(("affine", J, b))
    lo, hi = lower.flatten(1), upper.flatten(1)
    mid0, rad0 = (hi + lo) / 2, (hi - lo) / 2
    n_out = layers[-1][1].shape[0] if layers[-1][0] == "affine" else lo.shape[1]
    if C is None:
        C = torch.eye(n_out, dtype=lo.dtype).expand(B, n_out, n_out)

    def backward(Lam: Tensor, upto: int, bounds: list) -> tuple[Tensor, Tensor]:
        """Bounds of ``Lam h_upto`` (h_upto the output of layers[:upto]) over the input box."""
        res = []
        for side in (-1.0, 1.0):
            A, c = Lam.clone(), torch.zeros(Lam.shape[:2], dtype=Lam.dtype)
            for i in range(upto - 1, -1, -1):
                if layers[i][0] == "affine":
                    _, J, b = layers[i]
                    c = c + A @ b
                    A = A @ J
                else:
                    l, u = bounds[i]
                    lm, up = l.clamp(max=0), torch.maximum(u.clamp(min=0), l.clamp(max=0) + 1e-8)
                    du = up / (up - lm)
                    bu = -lm * du
                    dl = [(up > -lm).to(A.dtype), (l >= 0).to(A.dtype), (u > 0).to(A.dtype), du][mode]
                    Ap, An = A.clamp(min=0), A.clamp(max=0)
                    first, second = (dl, du) if side < 0 else (du, dl)
                    c = c + ((An if side < 0 else Ap) * bu.unsqueeze(1)).sum(-1)
                    A = Ap * first.unsqueeze(1) + An * second.unsqueeze(1)
            val = (A @ mid0.unsqueeze(-1)).squeeze(-1) + c + side * (A.abs() @ rad0.unsqueeze(-1)).squeeze(-1)
            res.append(val)
        return res[0], res[1]

    # IBP chain (dense): bounds[i] = bounds of the input of layer i when it is a ReLU
    bounds: list = [None] * len(layers)
    m_, r_ = mid0, rad0
    for i, layer in enumerate(layers):
        if layer[0] == "affine":
            _, J, b = layer
            m_, r_ = m_ @ J.t() + b, r_ @ J.abs().t()
        else:
            l, u = m_ - r_, m_ + r_
            if method == "crown" and i > 0:
                eye = torch.eye(l.shape[1], dtype=l.dtype).expand(B, -1, -1)
                cl, cu = backward(eye, i, bounds)
                l, u = torch.maximum(l, cl), torch.minimum(u, cu)
            bounds[i] = (l, u)
            lo_, hi_ = F.relu(m_ - r_), F.relu(m_ + r_)  # IBP continues from its own boxes
            m_, r_ = (hi_ + lo_) / 2, (hi_ - lo_) / 2
    return backward(C.to(lo.dtype), len(layers), bounds)
