"""Triton kernels for the tail of the MACER loss (Zhai et al., ICLR 2020; RuntianZ/macer ``macer.py``): from the
logits of k noisy copies per example to the per-example classification and robustness terms, and back.

The math contract (masking, tie rules, the closed-form backward) is ``robustkern.reference.macer``. One program
per example; the k copies are read in blocks of ``BLOCK_K`` rows, all C classes in one block of ``BLOCK_C``
columns (C <= ``MAX_CLASSES``; larger C runs the reference). Everything is computed in fp32 whatever the logits'
dtype. The forward reads the logits once and writes cl, rl and, for the backward, three coefficients and the
runner-up's index per example (``macer_tail_fwd``); the backward reads the logits once more, recomputing the
per-copy softmaxes, and writes the gradient (``macer_tail_bwd``).

``Phi^-1`` (``_ndtri``) is Wichura's algorithm AS241 (Applied Statistics 37, 1988), PPND16 coefficients,
evaluated in fp32: three rational approximations (|p - 1/2| <= 0.425; r = sqrt(-log(min(p, 1-p))) <= 5; r > 5),
``Phi^-1(0) = -inf``, ``Phi^-1(1) = inf``. The approximation error of PPND16 is about 1e-16, so the fp32 result
is limited by fp32 rounding alone: measured against ``scipy.special.ndtri`` in float64 over 2*10^5 fp32 values
of p in [1e-38, 1), the error is below 4e-7 relative (3.5e-6 absolute at |z| ~ 13, 2.5e-7 absolute for
|z| < 1; torch's own fp32 ``ndtri``: 3.5e-7 relative, 1.4e-6 absolute), tests/test_smooth_train_macer.py
``test_ndtri_accuracy``. ``1 - p`` is exact in fp32 for p >= 1/2 (Sterbenz), so no tail accuracy is lost near
p = 1; no refinement step is needed.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


__all__ = ["macer_tail", "macer_tail_backward", "macer_tail_fwd", "macer_tail_bwd", "ndtri", "MAX_CLASSES"]

Tensor = torch.Tensor
MAX_CLASSES = 16384
_TILE = 4096            # BLOCK_K * BLOCK_C elements per loaded tile


# ================================================================================================ device code
@triton.jit
def _poly8(r, c0, c1, c2, c3, c4, c5, c6, c7):
    return ((((((c7 * r + c6) * r + c5) * r + c4) * r + c3) * r + c2) * r + c1) * r + c0


@triton.jit
def _ndtri(p):
    """Phi^-1(p) in fp32 (AS241 PPND16)."""
    q = p - 0.5
    # central region |q| <= 0.425
    r = 0.180625 - q * q
    num = _poly8(r, 3.3871328727963666080, 133.14166789178437745, 1971.5909503065514427, 13731.693765509461125,
                 45921.953931549871457, 67265.770927008700853, 33430.575583588128105, 2509.0809287301226727)
    den = _poly8(r, 1.0, 42.313330701600911252, 687.18700749205790830, 5394.1960214247511077,
                 21213.794301586595867, 39307.895800092710610, 28729.085735721942674, 5226.4952788528545610)
    central = q * num / den
    # tails
    tail_p = tl.minimum(p, 1.0 - p)
    tail_p = tl.where(tail_p > 0.0, tail_p, 1e-30)      # keep log finite; p in {0, 1} is handled below
    rr = tl.sqrt(-tl.log(tail_p))
    r1 = rr - 1.6
    num1 = _poly8(r1, 1.42343711074968357734, 4.63033784615654529590, 5.76949722146069140550,
                  3.64784832476320460504, 1.27045825245236838258, 0.241780725177450611770,
                  0.0227238449892691845833, 7.74545014278341407640e-4)
    den1 = _poly8(r1, 1.0, 2.05319162663775882187, 1.67638483018380384940, 0.689767334985100004550,
                  0.148103976427480074590, 0.0151986665636164571966, 5.47593808499534494600e-4,
                  1.05075007164441684324e-9)
    r2 = rr - 5.0
    num2 = _poly8(r2, 6.65790464350110377720, 5.46378491116411436990, 1.78482653991729133580,
                  0.296560571828504891230, 0.0265321895265761230930, 0.00124266094738807843860,
                  2.71155556874348757815e-5, 2.01033439929228813265e-7)
    den2 = _poly8(r2, 1.0, 0.599832206555887937690, 0.136929880922735805310, 0.0148753612908506148525,
                  7.86869131145613259100e-4, 1.84631831751005468180e-5, 1.42151175831644588870e-7,
                  2.04426310338993978564e-15)
    tail = tl.where(rr <= 5.0, num1 / den1, num2 / den2)
    tail = tl.where(q < 0.0, -tail, tail)
    val = tl.where(tl.abs(q) <= 0.425, central, tail)
    val = tl.where(p <= 0.0, float("-inf"), val)
    val = tl.where(p >= 1.0, float("inf"), val)
    return val


@triton.jit
def _ndtri_kernel(p_ptr, out_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    p = tl.load(p_ptr + offs, mask=mask, other=0.5)
    tl.store(out_ptr + offs, _ndtri(p), mask=mask)


@triton.jit
def _softmax_rows(z, valid, scale):
    """Row softmax of ``scale * z`` over the valid entries of a (BLOCK_K, BLOCK_C) tile (0 elsewhere)."""
    zs = tl.where(valid, z * scale, float("-inf"))
    row_max = tl.max(zs, axis=1)
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)      # padding rows
    e = tl.where(valid, tl.exp(zs - row_max[:, None]), 0.0)
    denom = tl.sum(e, axis=1)
    denom = tl.where(denom > 0.0, denom, 1.0)
    return e / denom[:, None]


@triton.jit
def _averages(z_ptr, b, K, C, stride_b, stride_k, beta, cols, cmask,
              BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """Sums over the k copies of softmax(z) and softmax(beta z) for example b."""
    p_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    q_sum = tl.zeros([BLOCK_C], dtype=tl.float32)
    base = z_ptr + b.to(tl.int64) * stride_b
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        valid = (rows < K)[:, None] & cmask[None, :]
        z = tl.load(base + rows[:, None] * stride_k + cols[None, :], mask=valid, other=0.0).to(tl.float32)
        p_sum += tl.sum(_softmax_rows(z, valid, 1.0), axis=0)
        q_sum += tl.sum(_softmax_rows(z, valid, beta), axis=0)
    return p_sum, q_sum


@triton.jit
def _tail_stats(z_ptr, y_ptr, b, K, C, stride_b, stride_k, beta, gamma, cols, cmask,
                BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    p_sum, q_sum = _averages(z_ptr, b, K, C, stride_b, stride_k, beta, cols, cmask, BLOCK_K, BLOCK_C)
    p_bar = p_sum / K
    q_bar = q_sum / K
    y = tl.load(y_ptr + b).to(tl.int32)
    is_y = cols == y
    p_y = tl.sum(tl.where(is_y, p_bar, 0.0), axis=0)
    q1 = tl.sum(tl.where(is_y, q_bar, 0.0), axis=0)
    others = tl.where(cmask & (cols != y), q_bar, -1.0)
    q2 = tl.max(others, axis=0)
    i2 = tl.argmax(others, axis=0, tie_break_left=True).to(tl.int32)
    z1 = _ndtri(q1)
    z2 = _ndtri(q2)
    xi = z1 - z2
    finite = (q2 > 0.0) & (q1 < 1.0) & (xi == xi)
    keep = (q1 >= q2) & finite & (xi <= gamma)
    return y, p_y, z1, z2, xi, keep, i2


@triton.jit
def _macer_fwd_kernel(z_ptr, y_ptr, cl_ptr, rl_ptr, coef_ptr, i2_ptr, K, C, stride_b, stride_k, beta, gamma,
                      half_sigma, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """cl, rl and the backward's per-example coefficients (``robustkern.reference.macer.macer_tail_fwd``)."""
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    y, p_y, z1, z2, xi, keep, i2 = _tail_stats(z_ptr, y_ptr, b, K, C, stride_b, stride_k, beta, gamma, cols,
                                               cmask, BLOCK_K, BLOCK_C)
    cl = -tl.log(p_y + 1e-10)
    rl = tl.where(keep, half_sigma * (gamma - tl.where(keep, xi, 0.0)), 0.0)
    tl.store(cl_ptr + b, cl)
    tl.store(rl_ptr + b, rl)
    z1s = tl.where(keep, z1, 0.0)
    z2s = tl.where(keep, z2, 0.0)
    inv_sqrt_2pi = 0.3989422804014327
    scale = half_sigma * beta / K
    tl.store(coef_ptr + b * 3, -1.0 / (p_y + 1e-10) / K)
    tl.store(coef_ptr + b * 3 + 1, tl.where(keep, -scale / (tl.exp(-0.5 * z1s * z1s) * inv_sqrt_2pi), 0.0))
    tl.store(coef_ptr + b * 3 + 2, tl.where(keep, scale / (tl.exp(-0.5 * z2s * z2s) * inv_sqrt_2pi), 0.0))
    tl.store(i2_ptr + b, i2.to(tl.int64))


@triton.jit
def _macer_bwd_kernel(z_ptr, y_ptr, i2_ptr, coef_ptr, gcl_ptr, grl_ptr, gz_ptr, K, C, stride_b, stride_k, beta,
                      BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr):
    """One pass over the k copies with the forward's saved coefficients (``macer_tail_bwd``)."""
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    y = tl.load(y_ptr + b).to(tl.int32)
    i2 = tl.load(i2_ptr + b).to(tl.int32)
    g_cl = tl.load(gcl_ptr + b).to(tl.float32)
    g_rl = tl.load(grl_ptr + b).to(tl.float32)
    a = g_cl * tl.load(coef_ptr + b * 3)
    a_y = g_rl * tl.load(coef_ptr + b * 3 + 1)
    a_2 = g_rl * tl.load(coef_ptr + b * 3 + 2)
    is_y = (cols == y)[None, :]
    is_2 = (cols == i2)[None, :]
    base = z_ptr + b.to(tl.int64) * stride_b
    gbase = gz_ptr + b.to(tl.int64) * stride_b
    for k0 in range(0, K, BLOCK_K):
        rows = k0 + tl.arange(0, BLOCK_K)
        valid = (rows < K)[:, None] & cmask[None, :]
        offs = rows[:, None] * stride_k + cols[None, :]
        z = tl.load(base + offs, mask=valid, other=0.0).to(tl.float32)
        s = _softmax_rows(z, valid, 1.0)
        t = _softmax_rows(z, valid, beta)
        s_y = tl.sum(tl.where(is_y, s, 0.0), axis=1)
        t_y = tl.sum(tl.where(is_y, t, 0.0), axis=1)
        t_2 = tl.sum(tl.where(is_2, t, 0.0), axis=1)
        g = (a * s_y)[:, None] * (tl.where(is_y, 1.0, 0.0) - s)
        coef = tl.where(is_y, a_y, 0.0) + tl.where(is_2, a_2, 0.0)
        g += t * (coef - (a_y * t_y + a_2 * t_2)[:, None])
        tl.store(gbase + offs, g.to(gz_ptr.dtype.element_ty), mask=valid)


# ================================================================================================ launchers
def _blocks(k: int, c: int) -> tuple[int, int]:
    block_c = triton.next_power_of_2(c)
    block_k = max(1, min(triton.next_power_of_2(k), _TILE // block_c))
    return block_k, block_c


def _prepare(logits: Tensor) -> Tensor:
    if logits.dtype == torch.float64:    # the kernels compute in fp32 (module docstring)
        logits = logits.float()
    return logits if logits.stride(2) == 1 else logits.contiguous()


def macer_tail_fwd(logits: Tensor, labels: Tensor, beta: float, gamma: float, sigma: float, cache: bool = False
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See ``robustkern.reference.macer.macer_tail_fwd`` (same signature; computed in fp32; at most
    ``MAX_CLASSES`` classes). The kernels recompute the softmaxes in the backward, so they keep no cache
    (``cache`` must be False: the op keeps it on the reference only)."""
    b, k, c = logits.shape
    out_dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    if c > MAX_CLASSES or cache:
        raise ValueError(f"macer_tail_fwd: the kernels take at most {MAX_CLASSES} classes and no cache")
    dev = logits.device
    cl, rl = torch.empty(b, dtype=torch.float32, device=dev), torch.empty(b, dtype=torch.float32, device=dev)
    coef = torch.empty((b, 3), dtype=torch.float32, device=dev)
    i2 = torch.empty(b, dtype=torch.int64, device=dev)
    if b:
        z = _prepare(logits)
        block_k, block_c = _blocks(k, c)
        _macer_fwd_kernel[(b,)](z, labels.contiguous(), cl, rl, coef, i2, k, c, z.stride(0), z.stride(1),
                                float(beta), float(gamma), float(sigma) / 2.0, BLOCK_K=block_k, BLOCK_C=block_c)
    empty = logits.new_empty((0,), dtype=out_dtype)
    return cl.to(out_dtype), rl.to(out_dtype), coef.to(out_dtype), i2, empty, empty.clone()


def macer_tail_bwd(grad_cl: Tensor, grad_rl: Tensor, logits: Tensor, labels: Tensor, i2: Tensor, coef: Tensor,
                   s_cache: Tensor, t_cache: Tensor, beta: float) -> Tensor:
    """See ``robustkern.reference.macer.macer_tail_bwd`` (computed in fp32; at most ``MAX_CLASSES`` classes and
    no softmax cache: the op runs the reference for those)."""
    b, k, c = logits.shape
    if c > MAX_CLASSES or s_cache.numel():
        raise ValueError(f"macer_tail_bwd: the kernels take at most {MAX_CLASSES} classes and no cache")
    if b == 0:
        return torch.zeros_like(logits)
    z = _prepare(logits).contiguous()       # the gradient is written with the logits' strides
    grad = torch.empty_like(z)
    block_k, block_c = _blocks(k, c)
    _macer_bwd_kernel[(b,)](z, labels.contiguous(), i2.contiguous(), coef.float().contiguous(),
                            grad_cl.float().contiguous(), grad_rl.float().contiguous(), grad, k, c, z.stride(0),
                            z.stride(1), float(beta), BLOCK_K=block_k, BLOCK_C=block_c)
    return grad.to(logits.dtype)


def macer_tail(logits: Tensor, labels: Tensor, beta: float, gamma: float, sigma: float) -> tuple[Tensor, Tensor]:
    """See ``robustkern.reference.macer.macer_tail`` (same signature; computed in fp32)."""
    return macer_tail_fwd(logits, labels, beta, gamma, sigma)[:2]


def macer_tail_backward(grad_cl: Tensor, grad_rl: Tensor, logits: Tensor, labels: Tensor, beta: float,
                        gamma: float, sigma: float) -> Tensor:
    """See ``robustkern.reference.macer.macer_tail_backward`` (computed in fp32): the two kernels in turn."""
    _, _, coef, i2, s_cache, t_cache = macer_tail_fwd(logits, labels, beta, gamma, sigma)
    return macer_tail_bwd(grad_cl, grad_rl, logits, labels, i2, coef, s_cache, t_cache, beta)


def ndtri(p: Tensor) -> Tensor:
    """The kernels' fp32 ``Phi^-1`` applied elementwise (for tests)."""
    p = p.float().contiguous()
    out = torch.empty_like(p)
    if p.numel():
        _ndtri_kernel[(triton.cdiv(p.numel(), 1024),)](p, out, p.numel(), BLOCK=1024)
    return out
