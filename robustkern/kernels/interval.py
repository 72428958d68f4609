"""Triton kernels for interval bound propagation (IBP; Gowal et al. 2018, "On the Effectiveness of Interval
Bound Propagation for Training Verifiably Robust Models").

A box is ``(mid, rad)``, ``rad >= 0``: the real vectors ``z`` with ``|z - mid| <= rad``. Through an affine
layer ``z -> W z + b`` a box maps to ``mid' = W mid + b``, ``rad' = |W| rad``; through a monotone element-wise
function (ReLU) by its end points. The exact functions computed here, including the ``sound=True`` widening
by an a-priori bound on the kernels' own rounding error (Higham 2002, Lemma 3.1 and Eq. 3.5), are those of
``robustkern.reference.interval``; see its docstring for the soundness argument. Float32 boxes with
``sound=True`` run the float64 kernels on their (exact) float64 values and are rounded outwards to float32 once
(``robustkern._numerics.wide_accumulation``; a kernel that loads float32 tiles and accumulates in float64 would
save the float64 copies). With ``u`` the unit roundoff and ``e = gamma_{K+2} = (K+2)u / (1 - (K+2)u)`` for a
reduction of depth ``K``:

    s    = rad + 2 e |mid|                               (in registers, while the tile is loaded)
    mid' = mid W^T + b
    rad' = (s |W|^T) (1 + 3 e) + 2 e |b| + K tiny        (|W| in registers, never stored)

then the optional per-channel epilogue ``y -> relu?(scale * y + shift)`` on the box, each step widened by
``4 u`` times the magnitudes involved plus ``tiny`` (the smallest normal number).

Design.
* One pass over the weights: a program loads a tile of ``W`` once and feeds it to two accumulators, the
  centre (``mid @ W^T``) and the radius (``s @ |W|^T``). All products are IEEE: ``tl.dot(...,
  input_precision="ieee")`` (never TF32), accumulated in the input precision (fp32 or fp64). The bound
  ``gamma_K`` holds for any summation order, with or without fused multiply-adds, so tile order and the
  tree reductions of ``tl.sum`` are covered.
* A second, dot-free path (constexpr ``USE_DOT=False``: broadcast multiply and ``tl.sum``) serves
  matrix-vector shapes, where ``tl.dot``'s 16-row minimum would waste work: per-example weights (a
  specification matrix folded into the last layer; one row per program, weight batch stride ``B``) and
  convolutions with few output channels per group (depthwise).
* The convolution is an implicit GEMM over NCHW input: rows ``m = (b, oh, ow)``, columns ``n`` = output
  channel within the group, depth ``k = (c, r, s)`` over ``C/groups * kh * kw``; the im2col tile is gathered
  on the fly with masks for padding (padded entries are exact zeros, which add no rounding error). The group
  is the third program id.
* Bias, the widening and the epilogue are applied in registers before the single store; when an epilogue is
  present the pre-epilogue box is stored too (the backward pass needs it).
* The widening constants are computed on the host with ``unit_roundoff``/``gamma`` of the reference and
  passed as fp64 scalars, rounded once to the compute dtype inside the kernel (as PyTorch does with a Python
  scalar), so fp64 constants such as ``1 + 3e`` and ``tiny`` keep their value.
* ReLU keeps NaN (``where(x < 0, 0, x)``); clamping keeps NaN as ``torch.clamp`` does.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .._args import pair
from .._numerics import gamma, unit_roundoff, wide_accumulation
from ._config import autotune_configs
from .interval_elementwise import (_box_affine_relu, _check_float, _device_guard, _vec,  # noqa: F401
                                   interval_affine, interval_input_box)

__all__ = ["interval_linear", "interval_conv2d", "interval_affine", "interval_input_box"]

Tensor = torch.Tensor


# ================================================================================================ device code
@triton.jit
def _gemm_finish(acc_m, acc_r, bias, grow, ktiny, two_e, HAS_BIAS: tl.constexpr, SOUND: tl.constexpr):
    """Centre ``acc_m + b`` and radius ``acc_r (1 + 3e) + K tiny + 2e|b|`` of the GEMM box."""
    m = acc_m
    r = acc_r
    if HAS_BIAS:
        m = m + bias
    if SOUND:
        r = r * grow + ktiny
        if HAS_BIAS:
            r = r + two_e * tl.abs(bias)
    return m, r


@triton.jit
def _store_gemm_box(m, r, out_offs, out_mask, chan, mask_chan, out_mid_ptr, out_rad_ptr, pre_mid_ptr, pre_rad_ptr,
                    scale_ptr, shift_ptr, four_u, tiny, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
                    RELU: tl.constexpr, SOUND: tl.constexpr, STORE_PRE: tl.constexpr):
    """Store a GEMM's output box; with an epilogue, store it as the pre-epilogue box and then the box after
    the per-channel affine map (channels ``chan``) and ReLU."""
    if STORE_PRE:
        tl.store(pre_mid_ptr + out_offs, m, mask=out_mask)
        tl.store(pre_rad_ptr + out_offs, r, mask=out_mask)
        a = 0.0
        c = 0.0
        if HAS_SCALE:
            a = tl.load(scale_ptr + chan, mask=mask_chan, other=0.0)[None, :]
        if HAS_SHIFT:
            c = tl.load(shift_ptr + chan, mask=mask_chan, other=0.0)[None, :]
        m, r = _box_affine_relu(m, r, a, c, four_u, tiny, HAS_SCALE, HAS_SHIFT, RELU, SOUND)
    tl.store(out_mid_ptr + out_offs, m, mask=out_mask)
    tl.store(out_rad_ptr + out_offs, r, mask=out_mask)


@triton.jit
def _interval_linear_kernel(
    mid_ptr, rad_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
    out_mid_ptr, out_rad_ptr, pre_mid_ptr, pre_rad_ptr,
    M, N, K,
    s_mg, s_mm, s_mk, s_rg, s_rm, s_rk,  # mid / rad viewed as (G, M, K)
    s_wg, s_wn, s_wk,  # weight viewed as (G, N, K); s_wg = 0 when shared
    s_bg, s_bm,  # bias viewed as (G, M, N) with unit stride in N; zeros where broadcast
    two_e_: tl.float64, grow_: tl.float64, ktiny_: tl.float64, four_u_: tl.float64, tiny_: tl.float64,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    SOUND: tl.constexpr, STORE_PRE: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Batched interval GEMM ``out[g, m, :] = box(W[g] x[g, m] + b)`` with the fused epilogue.
    Program (g * cdiv(M, BLOCK_M) + tile_m, tile_n); the output is contiguous (G, M, N)."""
    DT = mid_ptr.dtype.element_ty
    two_e = tl.full((), two_e_, DT)
    grow = tl.full((), grow_, DT)
    ktiny = tl.full((), ktiny_, DT)
    four_u = tl.full((), four_u_, DT)
    tiny = tl.full((), tiny_, DT)

    num_m_tiles = tl.cdiv(M, BLOCK_M)
    pid = tl.program_id(0)
    g = (pid // num_m_tiles).to(tl.int64)
    pid_m = pid % num_m_tiles
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)

    mid_ptrs = mid_ptr + g * s_mg + rows[:, None] * s_mm + offs_k[None, :] * s_mk
    rad_ptrs = rad_ptr + g * s_rg + rows[:, None] * s_rm + offs_k[None, :] * s_rk
    w_ptrs = w_ptr + g * s_wg + cols[None, :] * s_wn + offs_k[:, None] * s_wk  # (BLOCK_K, BLOCK_N) tile of W^T

    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=DT)
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=DT)
    for k0 in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k0
        x_mask = mask_m[:, None] & mask_k[None, :]
        x = tl.load(mid_ptrs, mask=x_mask, other=0.0)
        s = tl.load(rad_ptrs, mask=x_mask, other=0.0)
        if SOUND:
            s = s + two_e * tl.abs(x)
        w = tl.load(w_ptrs, mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w_abs = tl.abs(w)
        if USE_DOT:
            acc_m = tl.dot(x, w, acc_m, input_precision="ieee", out_dtype=DT)
            acc_r = tl.dot(s, w_abs, acc_r, input_precision="ieee", out_dtype=DT)
        else:
            acc_m += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
            acc_r += tl.sum(s[:, :, None] * w_abs[None, :, :], axis=1)
        mid_ptrs += BLOCK_K * s_mk
        rad_ptrs += BLOCK_K * s_rk
        w_ptrs += BLOCK_K * s_wk

    out_mask = mask_m[:, None] & mask_n[None, :]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + g * s_bg + rows[:, None] * s_bm + cols[None, :], mask=out_mask, other=0.0)
    m, r = _gemm_finish(acc_m, acc_r, bias, grow, ktiny, two_e, HAS_BIAS, SOUND)

    out_offs = (g * M + rows[:, None]) * N + cols[None, :]
    _store_gemm_box(m, r, out_offs, out_mask, offs_n, mask_n, out_mid_ptr, out_rad_ptr, pre_mid_ptr, pre_rad_ptr, scale_ptr, shift_ptr, four_u, tiny,
                        HAS_SCALE, HAS_SHIFT, RELU, SOUND, STORE_PRE)


@triton.jit
def _interval_conv2d_kernel(
    mid_ptr, rad_ptr, w_ptr, bias_ptr, scale_ptr, shift_ptr,
    out_mid_ptr, out_rad_ptr, pre_mid_ptr, pre_rad_ptr,
    H, W, OH, OW, O, Og, Cg, M, Kg,
    s_mb, s_mc, s_mh, s_mw, s_rb, s_rc, s_rh, s_rw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    two_e_: tl.float64, grow_: tl.float64, ktiny_: tl.float64, four_u_: tl.float64, tiny_: tl.float64,
    KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    SOUND: tl.constexpr, STORE_PRE: tl.constexpr,
    USE_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Implicit-GEMM interval convolution for group ``program_id(2)``: rows ``m = (b, oh, ow)`` of the
    output, columns the group's output channels, depth ``k = (c, r, s)``; ``w_ptr`` is the contiguous
    weight viewed as (O, Kg). Input strides are arbitrary; the outputs are contiguous NCHW."""
    DT = mid_ptr.dtype.element_ty
    two_e = tl.full((), two_e_, DT)
    grow = tl.full((), grow_, DT)
    ktiny = tl.full((), ktiny_, DT)
    four_u = tl.full((), four_u_, DT)
    tiny = tl.full((), tiny_, DT)

    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    grp = tl.program_id(2)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    P = OH * OW
    bb = offs_m // P
    p = offs_m % P
    oh = p // OW
    ow = p % OW
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    c0 = (grp * Cg).to(tl.int64)
    mid_base = bb.to(tl.int64) * s_mb + c0 * s_mc  # (BLOCK_M,)
    rad_base = bb.to(tl.int64) * s_rb + c0 * s_rc

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < Og
    chan = grp * Og + offs_n  # global output channel
    w_rows = chan.to(tl.int64) * Kg

    offs_k = tl.arange(0, BLOCK_K)
    acc_m = tl.zeros((BLOCK_M, BLOCK_N), dtype=DT)
    acc_r = tl.zeros((BLOCK_M, BLOCK_N), dtype=DT)
    for k0 in range(0, Kg, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < Kg
        cc = kk // (KH * KW)
        rs = kk % (KH * KW)
        ih = ih0[:, None] + ((rs // KW) * dil_h)[None, :]
        iw = iw0[:, None] + ((rs % KW) * dil_w)[None, :]
        inb = (mask_m[:, None] & mask_k[None, :]) & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x = tl.load(mid_ptr + (mid_base[:, None] + cc[None, :] * s_mc + ih * s_mh + iw * s_mw),
                    mask=inb, other=0.0)
        s = tl.load(rad_ptr + (rad_base[:, None] + cc[None, :] * s_rc + ih * s_rh + iw * s_rw),
                    mask=inb, other=0.0)
        if SOUND:
            s = s + two_e * tl.abs(x)
        w = tl.load(w_ptr + (w_rows[None, :] + kk[:, None]), mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        w_abs = tl.abs(w)
        if USE_DOT:
            acc_m = tl.dot(x, w, acc_m, input_precision="ieee", out_dtype=DT)
            acc_r = tl.dot(s, w_abs, acc_r, input_precision="ieee", out_dtype=DT)
        else:
            acc_m += tl.sum(x[:, :, None] * w[None, :, :], axis=1)
            acc_r += tl.sum(s[:, :, None] * w_abs[None, :, :], axis=1)

    out_mask = mask_m[:, None] & mask_n[None, :]
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(bias_ptr + chan, mask=mask_n, other=0.0)[None, :]
    m, r = _gemm_finish(acc_m, acc_r, bias, grow, ktiny, two_e, HAS_BIAS, SOUND)

    out_offs = (bb.to(tl.int64) * O)[:, None] * P + chan.to(tl.int64)[None, :] * P + p[:, None]
    _store_gemm_box(m, r, out_offs, out_mask, chan, mask_n, out_mid_ptr, out_rad_ptr, pre_mid_ptr, pre_rad_ptr, scale_ptr, shift_ptr, four_u, tiny,
                        HAS_SCALE, HAS_SHIFT, RELU, SOUND, STORE_PRE)


# ================================================================================================ launch configs
# The first config of each list is the one used under the interpreter (and a safe default for small problems
# on a GPU); the rest are autotuning candidates on a GPU. IEEE fp32/fp64 `tl.dot` lowers to FMAs (no tensor
# cores), whose operands live in registers, and each program holds two accumulators: the lists keep
# BLOCK_K = 16 (the minimum of tl.dot) and were chosen from the ptxas resource usage for sm_90 (fp32 and fp64,
# all epilogue flags on): none spills more than a few bytes (40 B for 64x64 in fp64), whereas 64x64x32 or
# 128x128 tiles spill kilobytes. Not yet timed on a GPU: the autotuner picks among them.
def _cfg(num_warps=4, num_stages=2, **kw):
    return triton.Config(kw, num_warps=num_warps, num_stages=num_stages)


_GEMM_DOT_CONFIGS = (
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16),
    dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=16, num_warps=8),
    dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16),
    dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=16),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=16),
    dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, num_stages=1),
)
_LINEAR_GEMV_CONFIGS = (  # one row (example) per program; BLOCK_N x BLOCK_K products in registers
    dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=32),
    dict(BLOCK_M=1, BLOCK_N=64, BLOCK_K=32),
    dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=64),
    dict(BLOCK_M=1, BLOCK_N=16, BLOCK_K=128),
    dict(BLOCK_M=1, BLOCK_N=128, BLOCK_K=32, num_warps=8),
)
_CONV_SMALL_N_CONFIGS = (  # < 16 output channels per group (depthwise...): BLOCK_N (<= 8) set by the launcher
    dict(BLOCK_M=64, BLOCK_K=16),
    dict(BLOCK_M=128, BLOCK_K=8),
    dict(BLOCK_M=32, BLOCK_K=16),
    dict(BLOCK_M=256, BLOCK_K=8, num_warps=8),
    dict(BLOCK_M=128, BLOCK_K=16, num_warps=8),
)


@functools.lru_cache(maxsize=None)
def _tuned(kernel_name: str, path: str):
    """The autotuned launcher of a kernel for one path (built on first use, so that the config list reflects
    the interpreter state at call time and nothing touches a driver at import)."""
    kernel, key = {
        "linear": (_interval_linear_kernel, ["M", "N", "K"]),
        "conv2d": (_interval_conv2d_kernel, ["M", "Og", "Kg", "KH", "KW"]),
    }[kernel_name]
    table = {"dot": _GEMM_DOT_CONFIGS, "gemv": _LINEAR_GEMV_CONFIGS, "small_n": _CONV_SMALL_N_CONFIGS}[path]
    use_dot = path == "dot"
    configs = [_cfg(USE_DOT=use_dot, **c) for c in table]
    return triton.autotune(configs=autotune_configs(configs), key=key)(kernel)


# ================================================================================================ host helpers
def _gemm_constants(dtype: torch.dtype, K: int, sound: bool):
    """(2e, 1 + 3e, K tiny, 4u, tiny) of the widening, as Python floats (fp64)."""
    u = unit_roundoff(dtype)
    tiny = torch.finfo(dtype).tiny
    if not sound:
        return 0.0, 1.0, 0.0, 4 * u, tiny
    e = gamma(K + 2, u)
    return 2 * e, 1.0 + 3 * e, K * tiny, 4 * u, tiny


def _outputs(shape, like: Tensor, epilogue: bool):
    out_mid = like.new_empty(shape)
    out_rad = like.new_empty(shape)
    if epilogue:
        return out_mid, out_rad, like.new_empty(shape), like.new_empty(shape)
    return out_mid, out_rad, like.new_empty(0), like.new_empty(0)


# ================================================================================================ launchers
def interval_linear(mid: Tensor, rad: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    sound: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Interval image of ``x -> W x + b`` (IBP, Gowal et al. 2018), then the optional per-feature epilogue
    ``y -> relu?(scale * y + shift)``, in one kernel and one pass over ``W``:

        s = rad + 2e|mid|,  mid' = mid W^T + b,  rad' = (s |W|^T)(1 + 3e) + 2e|b| + K tiny   (e = gamma_{K+2})

    (the widening terms only when ``sound``). Shapes: ``mid, rad`` (B, K) (or (..., K) with a shared
    weight); ``weight`` (N, K) shared, or (B, N, K) per example; ``bias`` (N,) or (B, N); ``scale, shift``
    (N,). Returns ``(mid_out, rad_out, pre_mid, pre_rad)``; ``pre_*`` is the box after the GEMM alone when
    an epilogue is present, else empty tensors. Same contract as ``robustkern.reference.interval``.
    """
    op = "interval_linear"
    dtype = _check_float(op, mid=mid, rad=rad, weight=weight)
    if sound and dtype == torch.float32:    # float64 accumulation, rounded outwards (module docstring)
        return wide_accumulation(lambda *t, sound: interval_linear(*t, relu=relu, sound=sound),
                                 (mid, rad, weight, bias, scale, shift))
    if mid.shape != rad.shape or mid.dim() < 1:
        raise ValueError(f"{op}: mid and rad must have the same shape (..., K), got {tuple(mid.shape)}, "
                         f"{tuple(rad.shape)}")
    K = mid.shape[-1]
    per_example = weight.dim() == 3
    if per_example:
        if mid.dim() != 2 or weight.shape[0] != mid.shape[0] or weight.shape[2] != K:
            raise ValueError(f"{op}: per-example weight must be (B, N, K) for mid (B, K), got "
                             f"{tuple(weight.shape)} and {tuple(mid.shape)}")
        B, N = mid.shape[0], weight.shape[1]
        G, M = B, 1
        x, xr = mid, rad
        s_mg, s_mm, s_mk = mid.stride(0), 0, mid.stride(1)
        s_rg, s_rm, s_rk = rad.stride(0), 0, rad.stride(1)
        s_wg, s_wn, s_wk = weight.stride()
        out_shape = (B, N)
    elif weight.dim() == 2:
        if weight.shape[1] != K:
            raise ValueError(f"{op}: weight (N, K) does not match mid (..., K): {tuple(weight.shape)}, "
                             f"{tuple(mid.shape)}")
        N = weight.shape[0]
        x, xr = mid.reshape(-1, K), rad.reshape(-1, K)
        G, M = 1, x.shape[0]
        B = M
        s_mg, (s_mm, s_mk) = 0, x.stride()
        s_rg, (s_rm, s_rk) = 0, xr.stride()
        s_wg, (s_wn, s_wk) = 0, weight.stride()
        out_shape = tuple(mid.shape[:-1]) + (N,)
    else:
        raise ValueError(f"{op}: weight must be (N, K) or (B, N, K), got {tuple(weight.shape)}")

    s_bg = s_bm = 0
    if bias is not None:
        if bias.dim() == 1 and bias.shape[0] == N:
            bias = bias.to(dtype).contiguous()
        elif bias.dim() == 2 and tuple(bias.shape) == (B, N) and (per_example or mid.dim() == 2):
            bias = bias.to(dtype).contiguous()
            s_bg, s_bm = (N, 0) if per_example else (0, N)
        else:
            raise ValueError(f"{op}: bias must be (N,) or (B, N) with N={N}, B={B}, got {tuple(bias.shape)}")
    scale = _vec(scale, dtype, N, "scale", op)
    shift = _vec(shift, dtype, N, "shift", op)
    epilogue = scale is not None or shift is not None or bool(relu)

    out_mid, out_rad, pre_mid, pre_rad = _outputs(out_shape, mid, epilogue)
    if out_mid.numel() == 0:
        return out_mid, out_rad, pre_mid, pre_rad
    two_e, grow, ktiny, four_u, tiny = _gemm_constants(dtype, K, sound)

    path = "gemv" if (per_example or M == 1) else "dot"
    kernel = _tuned("linear", path)

    def grid(meta):
        num_m = triton.cdiv(M, meta["BLOCK_M"])
        return G * num_m, triton.cdiv(N, meta["BLOCK_N"])

    dummy = x  # never read: its HAS_* flag is off
    with _device_guard(mid):
        kernel[grid](
            x, xr, weight,
            bias if bias is not None else dummy,
            scale if scale is not None else dummy,
            shift if shift is not None else dummy,
            out_mid, out_rad,
            pre_mid if epilogue else out_mid, pre_rad if epilogue else out_rad,
            M, N, K,
            s_mg, s_mm, s_mk, s_rg, s_rm, s_rk, s_wg, s_wn, s_wk, s_bg, s_bm,
            two_e, grow, ktiny, four_u, tiny,
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            RELU=bool(relu), SOUND=bool(sound), STORE_PRE=epilogue,
        )
    return out_mid, out_rad, pre_mid, pre_rad


def interval_conv2d(mid: Tensor, rad: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                    stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    sound: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Interval image of a 2-D convolution (IBP, Gowal et al. 2018), then the optional per-channel epilogue
    ``y -> relu?(scale * y + shift)`` (a folded BatchNorm and ReLU), as one implicit-GEMM launch that
    computes centre and radius from the same weight tiles:

        s = rad + 2e|mid|,  mid' = conv(mid, W) + b,  rad' = conv(s, |W|)(1 + 3e) + 2e|b| + K tiny

    with ``K = C/groups * kh * kw`` and ``e = gamma_{K+2}`` (widening only when ``sound``). ``mid, rad``
    (B, C, H, W), any strides; ``weight`` (O, C/groups, kh, kw); ``bias, scale, shift`` (O,). Returns
    ``(mid_out, rad_out, pre_mid, pre_rad)`` (contiguous NCHW) as ``interval_linear``.
    """
    op = "interval_conv2d"
    dtype = _check_float(op, mid=mid, rad=rad, weight=weight)
    if sound and dtype == torch.float32:    # float64 accumulation, rounded outwards (module docstring)
        return wide_accumulation(
            lambda m_, r_, w_, b_, a_, c_, sound: interval_conv2d(m_, r_, w_, b_, stride, padding, dilation, groups,
                                                                 a_, c_, relu, sound),
            (mid, rad, weight, bias, scale, shift))
    if mid.dim() != 4 or mid.shape != rad.shape:
        raise ValueError(f"{op}: mid and rad must both be (B, C, H, W), got {tuple(mid.shape)}, "
                         f"{tuple(rad.shape)}")
    if weight.dim() != 4:
        raise ValueError(f"{op}: weight must be (O, C/groups, kh, kw), got {tuple(weight.shape)}")
    (sh, sw), (ph, pw), (dh, dw) = (pair(stride, "stride", op), pair(padding, "padding", op),
                                    pair(dilation, "dilation", op))
    groups = int(groups)
    B, C, H, W = mid.shape
    O, Cg, KH, KW = weight.shape
    if groups < 1 or C != Cg * groups or O % groups != 0:
        raise ValueError(f"{op}: input channels {C} / weight {tuple(weight.shape)} do not match groups={groups}")
    if min(sh, sw, dh, dw) < 1 or min(ph, pw) < 0:
        raise ValueError(f"{op}: stride and dilation must be >= 1 and padding >= 0")
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    if OH < 1 or OW < 1:
        raise ValueError(f"{op}: kernel ({KH}x{KW}, dilation {dh}x{dw}) larger than the padded input "
                         f"({H + 2 * ph}x{W + 2 * pw})")
    Og = O // groups
    Kg = Cg * KH * KW
    if bias is not None:
        bias = _vec(bias, dtype, O, "bias", op)
    scale = _vec(scale, dtype, O, "scale", op)
    shift = _vec(shift, dtype, O, "shift", op)
    epilogue = scale is not None or shift is not None or bool(relu)

    out_mid, out_rad, pre_mid, pre_rad = _outputs((B, O, OH, OW), mid, epilogue)
    if out_mid.numel() == 0:
        return out_mid, out_rad, pre_mid, pre_rad
    two_e, grow, ktiny, four_u, tiny = _gemm_constants(dtype, Kg, sound)
    w = weight.contiguous()
    M = B * OH * OW

    extra = {}
    if Og > 8:  # tl.dot needs BLOCK_N >= 16; narrower groups use the dot-free path
        path = "dot"
    else:
        path = "small_n"
        extra["BLOCK_N"] = triton.next_power_of_2(Og)
    kernel = _tuned("conv2d", path)

    def grid(meta):
        return triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(Og, meta["BLOCK_N"]), groups

    dummy = w  # never read: its HAS_* flag is off
    with _device_guard(mid):
        kernel[grid](
            mid, rad, w,
            bias if bias is not None else dummy,
            scale if scale is not None else dummy,
            shift if shift is not None else dummy,
            out_mid, out_rad,
            pre_mid if epilogue else out_mid, pre_rad if epilogue else out_rad,
            H, W, OH, OW, O, Og, Cg, M, Kg,
            *mid.stride(), *rad.stride(),
            sh, sw, ph, pw, dh, dw,
            two_e, grow, ktiny, four_u, tiny,
            KH=KH, KW=KW,
            HAS_BIAS=bias is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            RELU=bool(relu), SOUND=bool(sound), STORE_PRE=epilogue,
            **extra,
        )
    return out_mid, out_rad, pre_mid, pre_rad
