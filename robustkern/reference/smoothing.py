"""Pure-PyTorch ground truth for the randomized-smoothing ops (the copies of Cohen et al.'s certification loop
and of TRADES + random smoothing's are in ``robustkern.reference.published.smoothing``).

Counter-based Gaussian noise (``smoothing_noise``)
--------------------------------------------------
Every noise element is a pure function of ``(seed, image key, sample index, stream, element index)``, so
certificates do not depend on batch size, on how images are packed into forwards, or on how many processes
share the work. For output row ``r`` (one noisy copy of image ``src[r]``) and element ``e`` (the flat NCHW
index inside one image), one Philox call gives the four elements of block ``j = e // 4`` (two Box-Muller
pairs, both outputs of each, as cuRAND's ``curand_normal4``):

    (o0, o1, o2, o3) = Philox4x32-10(counter = (j, sample[r], image[r], stream[r]), key = (seed_lo, seed_hi))
    U(o) = (o + 1/2) 2^-32                                            (exact in float64, in (0, 1))
    rho_A = sqrt(-2 log U(o0)), theta_A = fl(2 pi U(o1)); rho_B, theta_B likewise from (o2, o3)
    (z[4j], z[4j+1], z[4j+2], z[4j+3]) = fp32( rho_A cos theta_A, rho_A sin theta_A,
                                               rho_B cos theta_B, rho_B sin theta_B )   (float64, rounded once)
    v  = x[src[r], e] + fp32(sigma) * z[e]                            (fp32, before any cast)
    out[r, e] = cast_out( (v - mean[c]) / std[c] )                    (optional per-channel normalisation)

Philox4x32-10 is Salmon et al. 2011 ("Parallel random numbers: as easy as 1, 2, 3"), the generator of
cuRAND/``tl.randn``; its 32x32-bit products are split into 16-bit halves here so int64 tensors never overflow.
The Box-Muller transform runs in float64 and is rounded once to fp32, so implementations whose float64
``log``/``cos``/``sin`` are within an ulp or two agree bit-for-bit except when the float64 value falls within
those ulps of an fp32 rounding boundary (probability ~1e-8 per element); |z| <= sqrt(2 * 33 ln 2) = 6.76 (the
tails beyond are truncated, at probability ~1e-11). The two outputs of a Box-Muller pair are independent
standard normals, so the four elements of a block are independent. (Until this revision each element took
its own Philox call, ``counter = (e, ...)``, and only ``rho_A cos theta_A``: four times the Philox work and
twice the transcendental work for the same distribution; the noise of a given seed changed with it.)

Counting (``smoothing_count``)
------------------------------
``counts[g, k] = #{r : group[r] = g and argmax_j logits[r, j] = k}`` with ``torch.argmax``'s tie rule (the
first maximum).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

__all__ = ["philox4x32", "normals_from_block", "normal_from_counter", "smoothing_noise", "smoothing_count"]

_M0, _M1 = 0xD2511F53, 0xCD9E8D57          # Philox4x32 multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85          # Weyl key increments
_MASK = 0xFFFFFFFF
TWO_PI = 2.0 * math.pi
INV_2_32 = 2.0 ** -32


def _mul_hi_lo(m: int, x: Tensor):
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``m`` and ``x`` (uint32 values in int64)."""
    mh, ml = m >> 16, m & 0xFFFF
    p1 = x * ml                       # < 2^48
    p2 = x * mh                       # < 2^48
    mid = p1 + ((p2 & 0xFFFF) << 16)  # < 2^49
    lo = mid & _MASK
    hi = (p2 >> 16) + (mid >> 32)
    return hi & _MASK, lo


def philox4x32(c0: Tensor, c1: Tensor, c2: Tensor, c3: Tensor, seed: int, rounds: int = 10):
    """Philox4x32-``rounds`` on int64 tensors holding uint32 values (broadcast together); key = the low and
    high 32 bits of ``seed`` (0 <= seed < 2^63). Returns the four output words as int64 tensors."""
    k0, k1 = seed & _MASK, (seed >> 32) & _MASK
    c0, c1, c2, c3 = torch.broadcast_tensors(c0, c1, c2, c3)
    for _ in range(rounds):
        hi0, lo0 = _mul_hi_lo(_M0, c0)
        hi1, lo1 = _mul_hi_lo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def normals_from_block(block: Tensor, sample: Tensor, image: Tensor, stream: Tensor, seed: int) -> Tensor:
    """The four fp32 standard normals of block ``block`` (elements ``4 block .. 4 block + 3``) of counter
    ``(sample, image, stream)`` under ``seed``, stacked on a new last dimension (see module doc)."""
    o0, o1, o2, o3 = philox4x32(block, sample, image, stream, seed)
    rho_a = torch.sqrt(-2.0 * torch.log((o0.double() + 0.5) * INV_2_32))
    rho_b = torch.sqrt(-2.0 * torch.log((o2.double() + 0.5) * INV_2_32))
    theta_a = TWO_PI * ((o1.double() + 0.5) * INV_2_32)
    theta_b = TWO_PI * ((o3.double() + 0.5) * INV_2_32)
    return torch.stack([rho_a * torch.cos(theta_a), rho_a * torch.sin(theta_a),
                        rho_b * torch.cos(theta_b), rho_b * torch.sin(theta_b)], -1).float()


def normal_from_counter(elem: Tensor, sample: Tensor, image: Tensor, stream: Tensor, seed: int) -> Tensor:
    """The standard normal (fp32) of element ``elem`` of counter ``(sample, image, stream)`` under ``seed``:
    lane ``elem % 4`` of block ``elem // 4`` (see module doc)."""
    elem, sample, image, stream = torch.broadcast_tensors(elem, sample, image, stream)
    z4 = normals_from_block(elem // 4, sample, image, stream, seed)
    return z4.gather(-1, (elem % 4).unsqueeze(-1)).squeeze(-1)


def smoothing_noise(x: Tensor, src: Tensor, counter: Tensor, seed: Tensor, sigma: float,
                    mean: Optional[Tensor], std: Optional[Tensor], out_dtype: torch.dtype) -> Tensor:
    """Noisy, normalised copies ``out[r] = cast((x[src[r]] + sigma z_r - mean) / std)``.

    ``x`` (I, C, ...) fp32; ``src`` (R,) int64 row -> image slot; ``counter`` (R, 3) int64 rows of
    (image key, sample index, stream); ``seed`` (1,) int64; ``mean``/``std`` (C,) fp32 or None.
    Returns (R, C, ...) of ``out_dtype``."""
    rows = src.shape[0]
    d = x[0].numel() if x.shape[0] else int(np.prod(x.shape[1:]))
    if rows == 0 or d == 0:
        return torch.empty((rows,) + tuple(x.shape[1:]), dtype=out_dtype, device=x.device)
    blocks = torch.arange((d + 3) // 4, dtype=torch.int64, device=x.device).view(1, -1)
    c = counter.to(torch.int64)
    z = normals_from_block(blocks, c[:, 1:2], c[:, 0:1], c[:, 2:3], int(seed.reshape(-1)[0]))
    z = z.reshape(rows, -1)[:, :d]
    v = x.reshape(x.shape[0], d).float()[src] + torch.tensor(sigma, dtype=torch.float32) * z
    v = v.view((rows,) + tuple(x.shape[1:]))
    if mean is not None:
        shape = (1, -1) + (1,) * (x.dim() - 2)
        v = (v - mean.float().view(shape)) / std.float().view(shape)
    return v.to(out_dtype)


def smoothing_count(logits: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """Per-group argmax counts: (R, K) logits, (R,) int64 groups -> (num_groups, K) int64."""
    k = logits.shape[1]
    if logits.shape[0] == 0:
        return torch.zeros((num_groups, k), dtype=torch.int64, device=logits.device)
    flat = group.to(torch.int64) * k + logits.argmax(1)
    return torch.bincount(flat, minlength=num_groups * k).view(num_groups, k)
