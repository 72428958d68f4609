"""Attack ops: ``robustkern::pgd_step``, the fused projected-gradient step (Madry et al. 2018).

``pgd_step(x_adv, grad, x_orig, eps, alpha, norm)`` computes, per example ``b`` (``eps, alpha`` of shape (B,)):

    L-inf:  clip_[0,1]( min(max(x_adv + alpha sign(grad), x_orig - eps), x_orig + eps) )
    L2:     clip_[0,1]( x_orig + d min(1, eps / |d|_2) ),  d = x_adv + alpha grad / (|grad|_2 + 1e-10) - x_orig

in one pass (Triton: one program per block for L-inf, one per example row for L2; C++ CPU: one pass for
L-inf, three passes over each cache-resident row for L2). It is an op of the table ``robustkern.ops._registry``
(C++ schema in ``csrc/ops.cpp``): the Triton kernel (``robustkern.kernels.attacks``), the compiled CPU kernel
(``csrc/cpu/attacks_cpu.cpp``: L-inf bit-identical to the reference, L2 equal up to the rounding of the two
norms) or the reference
(``robustkern.reference.attacks``). There is no CUDA C++ kernel: on CUDA ``auto`` picks Triton, and an
explicitly requested ``cuda`` backend raises ``BackendUnavailable`` (as ``cpp`` does with an extension built
before the kernel existed). The backward pass is the vector-Jacobian product of the reference formula (first
order only: ``sign`` has zero derivative, so nothing flows into ``grad`` for L-inf).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..reference import attacks as _ref
from ._registry import define_op, triton_kernel

__all__ = ["pgd_step", "NORMS"]

NORMS = ("linf", "l2")
_FLOATS = (torch.float32, torch.float64)


def _fake(x_adv, grad, x_orig, eps, alpha, norm):
    return torch.empty_like(x_adv, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    *tensors, norm = inputs
    ctx.norm = norm
    ctx.save_for_backward(*tensors)


def _backward(ctx, g_out):
    from ..reference.attacks import pgd_step as ref_step

    need = ctx.needs_input_grad[:5]
    with torch.enable_grad():
        leaves = [t.detach().requires_grad_(bool(n)) for t, n in zip(ctx.saved_tensors, need)]
        out = ref_step(*leaves, ctx.norm)
        wrt = [t for t in leaves if t.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, g_out, allow_unused=True) if wrt else ())
    result = []
    for t, n in zip(leaves, need):
        g = next(grads) if n else None
        result.append(torch.zeros_like(t) if n and g is None else g)
    return (*result, None)


PGD_STEP = define_op(
    "pgd_step", reference=_ref.pgd_step, triton=triton_kernel("attacks", "pgd_step"), cpp=True, fake=_fake,
    setup_context=_setup, backward=_backward, keeps=((0, 1, 2, 3, 4), ()))


def _per_row(v, b: int, like: Tensor, name: str) -> Tensor:
    t = torch.as_tensor(v, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(b)
    if t.dim() != 1 or t.shape[0] != b:
        raise ValueError(f"pgd_step: {name} must be a float or a ({b},) tensor, got shape {tuple(t.shape)}")
    return t.contiguous()


def pgd_step(x_adv: Tensor, grad: Tensor, x_orig: Tensor, eps, alpha, norm: str = "linf") -> Tensor:
    """One fused projected-gradient ascent step (module docstring). ``x_adv, grad, x_orig`` share shape
    (B, ...), dtype (float32/float64) and device; ``eps >= 0`` and ``alpha`` are floats or (B,) tensors.
    Returns a new tensor inside the ``norm`` ball of radius ``eps`` around ``x_orig`` and inside [0, 1]."""
    op = "pgd_step"
    if norm not in NORMS:
        raise ValueError(f"{op}: norm must be one of {NORMS}, got {norm!r}")
    for name, t in (("x_adv", x_adv), ("grad", grad), ("x_orig", x_orig)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a tensor")
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")
        if t.shape != x_adv.shape or t.dtype != x_adv.dtype or t.device != x_adv.device:
            raise ValueError(f"{op}: {name} must match x_adv's shape, dtype and device ({tuple(x_adv.shape)}, "
                             f"{x_adv.dtype}, {x_adv.device}); got {tuple(t.shape)}, {t.dtype}, {t.device}")
    if x_adv.dim() < 1:
        raise ValueError(f"{op}: inputs need a batch dimension")
    b = x_adv.shape[0]
    eps = _per_row(eps, b, x_adv, "eps")
    alpha = _per_row(alpha, b, x_adv, "alpha")
    return PGD_STEP(x_adv, grad, x_orig, eps, alpha, norm)
