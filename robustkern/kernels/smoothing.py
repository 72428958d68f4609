"""Triton kernels for randomized-smoothing certification (Cohen, Rosenfeld, Kolter 2019, "Certified
Adversarial Robustness via Randomized Smoothing").

``smoothing_noise``: noisy, normalised copies of images, the Gaussian noise generated in the kernel from a
counter-based generator, never materialised in memory on its own. For row ``r`` and flat NCHW element ``e``,
block ``j = e // 4`` and lane ``l = e % 4``:

    (o0, o1, o2, o3) = Philox4x32-10(counter = (j, sample[r], image[r], stream[r]), key = (seed_lo, seed_hi))
    (u, t) = (o0, o1) if l < 2 else (o2, o3);  rho = sqrt(-2 log((u + 1/2) 2^-32)), theta = 2 pi (t + 1/2) 2^-32
    z = fp32( rho cos theta if l is even else rho sin theta )                  (Box-Muller in float64)
    out[r, e] = cast( ((x[src[r], e] + fp32(sigma) z) - mean[c]) / std[c] )   (fp32, IEEE division)

``tl.philox`` is Salmon et al.'s Philox4x32-10 (the Random123 known-answer vectors hold), the same function
as ``robustkern.reference.smoothing.philox4x32``. Box-Muller runs in float64 and is rounded once to fp32 so
that backends whose float64 ``log``/``cos``/``sin`` differ by an ulp still produce the same fp32 noise (except
within an ulp or two of an fp32 rounding boundary, probability ~1e-8 per element). Each program evaluates
Philox per element (four times per block; the CPU kernel shares one call among the block's four elements).
On a GPU the compiler may contract ``x + sigma * z`` into an FMA, a difference of at most one fp32 rounding
from the reference.

``smoothing_count``: argmax of each row of logits (the first maximum, as ``torch.argmax``) and a histogram
per group (``counts[group[r], argmax_r] += 1``) with atomic adds, so votes never leave the device.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._config import autotune_configs

__all__ = ["smoothing_noise", "smoothing_count"]

Tensor = torch.Tensor
_TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
                torch.float64: tl.float64}


# ================================================================================================ device code
@triton.jit
def _normal_from_counter(elem, sample, image, stream, seed):
    """Standard normal (fp32) of element ``elem`` (uint32) of counter (sample, image, stream) under the int64
    seed: lane elem % 4 of Philox block elem // 4."""
    o0, o1, o2, o3 = tl.philox(seed, elem >> 2, sample, image, stream)
    lane = elem & 3
    second = lane >= 2
    u = tl.where(second, o2, o0)
    t = tl.where(second, o3, o1)
    u1 = (u.to(tl.float64) + 0.5) * 2.3283064365386963e-10
    theta = 6.283185307179586 * ((t.to(tl.float64) + 0.5) * 2.3283064365386963e-10)
    rho = tl.sqrt(-2.0 * tl.log(u1))  # float64: IEEE sqrt
    trig = tl.where((lane & 1) == 0, tl.cos(theta), tl.sin(theta))
    return (rho * trig).to(tl.float32)


def _noise_configs():
    return autotune_configs([triton.Config({"BLOCK": 1024}, num_warps=4),
                             triton.Config({"BLOCK": 2048}, num_warps=8),
                             triton.Config({"BLOCK": 4096}, num_warps=8)])


@triton.autotune(configs=_noise_configs(), key=["D"])
@triton.jit
def _noise_kernel(x_ptr, src_ptr, ctr_ptr, seed_ptr, mean_ptr, std_ptr, out_ptr, sigma, D, HW,
                  HAS_NORM: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = e < D
    seed = tl.load(seed_ptr)
    img = tl.load(src_ptr + row)
    key_image = tl.load(ctr_ptr + row * 3).to(tl.uint32)
    sample = tl.load(ctr_ptr + row * 3 + 1).to(tl.uint32)
    stream = tl.load(ctr_ptr + row * 3 + 2).to(tl.uint32)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    z = _normal_from_counter(e.to(tl.uint32), zero + sample, zero + key_image, zero + stream, seed)
    x = tl.load(x_ptr + img * D + e, mask=mask, other=0.0)
    v = x + sigma * z
    if HAS_NORM:
        c = e // HW
        m = tl.load(mean_ptr + c, mask=mask, other=0.0)
        s = tl.load(std_ptr + c, mask=mask, other=1.0)
        v = tl.div_rn(v - m, s)
    if OUT_BF16:  # round to nearest even by hand: triton 3.6's interpreter truncates fp32 -> bf16
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        y = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        y = v.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * D + e, y, mask=mask)


@triton.jit
def _count_kernel(logits_ptr, group_ptr, counts_ptr, R, K, stride_r,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < R
    mask = rmask[:, None] & (cols[None, :] < K)
    vals = tl.load(logits_ptr + rows.to(tl.int64)[:, None] * stride_r + cols[None, :], mask=mask,
                   other=float("-inf")).to(tl.float32)
    best = tl.argmax(vals, axis=1, tie_break_left=True)
    grp = tl.load(group_ptr + rows, mask=rmask, other=0)
    ones = tl.full([BLOCK_R], 1, dtype=tl.int64)
    tl.atomic_add(counts_ptr + grp * K + best, ones, mask=rmask)


# ================================================================================================ launchers
def smoothing_noise(x: Tensor, src: Tensor, counter: Tensor, seed: Tensor, sigma: float,
                    mean: Optional[Tensor], std: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """See ``robustkern.reference.smoothing.smoothing_noise`` (same signature and result)."""
    rows = src.shape[0]
    out = torch.empty((rows,) + tuple(x.shape[1:]), dtype=out_dtype, device=x.device)
    d = out[0].numel() if rows else 0
    if rows == 0 or d == 0:
        return out
    hw = d // x.shape[1] if x.dim() > 1 and x.shape[1] else d
    x = x.float().contiguous()
    has_norm = mean is not None
    mean_t = mean.float().contiguous() if has_norm else x
    std_t = std.float().contiguous() if has_norm else x

    def grid(meta):
        return (rows, triton.cdiv(d, meta["BLOCK"]))

    _noise_kernel[grid](x, src.contiguous(), counter.contiguous(), seed.contiguous(), mean_t, std_t, out,
                        float(sigma), d, hw, HAS_NORM=has_norm,
                        OUT_BF16=out_dtype == torch.bfloat16)
    return out


def smoothing_count(logits: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """See ``robustkern.reference.smoothing.smoothing_count``."""
    r, k = logits.shape
    counts = torch.zeros((num_groups, k), dtype=torch.int64, device=logits.device)
    if r == 0:
        return counts
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    block_k = triton.next_power_of_2(k)
    block_r = max(1, min(64, 4096 // block_k))
    _count_kernel[(triton.cdiv(r, block_r),)](logits, group.contiguous(), counts, r, k, logits.stride(0),
                                              BLOCK_R=block_r, BLOCK_K=block_k)
    return counts
