"""A transposed convolution computed as one ordinary convolution over its output phases, for coefficients ``A``
that a backward pass carries onto the input of the first convolution (a few channels: 1 for MNIST, 3 for CIFAR).

The transposed convolution with stride ``s``, kernel ``k`` (dilation 1, no groups) writes output row
``o = s y + i - p`` from input row ``y`` and kernel row ``i``. Splitting the rows of the uncropped output
``o + p = s q + r`` by their phase ``r`` (0..s-1), phase ``r`` at ``q`` receives the taps ``i = s j + r`` from
``y = q - j``, ``j`` = 0..t-1 with ``t = ceil(k / s)``: a stride-1 correlation of ``A`` padded by ``t - 1`` with
the flipped taps ``w[:, :, s j + r]`` (the kernel zero-padded to ``s t`` rows). All ``s0 s1`` phases of both
spatial dimensions are one convolution with ``s0 s1 C_in`` output channels and a ``t0 x t1`` kernel: on CPU
(oneDNN) several times faster than ``conv_transpose2d`` onto 1-3 channels (the "sub-pixel" form of a transposed
convolution; Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using an Efficient Sub-Pixel
Convolutional Neural Network"). Entries of each product are the transposed convolution's (the same terms,
summed in another order).

The result stays in that phase-major order, ``(B, S, hq, wq, s0, s1, C_in)`` per row in memory (channels-last),
with the rows and columns that the transposed convolution's padding crops still in it: the concretisation at the
input reads the box (and ball centre) in the same order, zero at the cropped places (``arrange``), so no pass
rearranges ``A``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PhaseMajor", "phased_transposed_conv", "arrange", "flat_operands"]


@dataclass(frozen=True)
class Phases:
    """Where the phase-major entries sit: strides ``s``, padding ``p``, phase grid ``hq x wq``, channels ``c``,
    and the cropped output's ``h x w``."""
    s0: int
    s1: int
    p0: int
    p1: int
    hq: int
    wq: int
    c: int
    h: int
    w: int


@dataclass
class PhaseMajor:
    """Coefficients ``A`` (B, S, hq, wq, s0 s1 C) over a node in phase-major order (``Phases``)."""
    A: Tensor
    phases: Phases

    def flat(self) -> Tensor:
        return self.A.reshape(self.A.shape[0], self.A.shape[1], -1)

    def spatial(self) -> Tensor:
        """The same coefficients (N, h, w, C) in spatial order for ``A`` of one leading dimension (a copy)."""
        ph = self.phases
        full = self.A.reshape(-1, ph.hq, ph.wq, ph.s0, ph.s1, ph.c).permute(0, 1, 3, 2, 4, 5)
        full = full.reshape(-1, ph.hq * ph.s0, ph.wq * ph.s1, ph.c)
        return full[:, ph.p0:ph.p0 + ph.h, ph.p1:ph.p1 + ph.w]


def phased_transposed_conv(A: Tensor, w: Tensor, stride: tuple, padding: tuple, out_hw: tuple) -> PhaseMajor | None:
    """``conv_transpose2d(A, w, stride, padding)`` (A (N, C_out, h, w'), weight (C_out, C_in, k0, k1)) cropped to
    ``out_hw``, in phase-major order (module docstring): (N, hq, wq, s0 s1 C_in). None when the requested output
    reaches past the uncropped one (an output padding beyond the kernel's reach)."""
    N, co, h, wd = A.shape
    ci, k0, k1 = w.shape[1:]
    (s0, s1), (p0, p1) = stride, padding
    t0, t1 = -(-k0 // s0), -(-k1 // s1)
    hq, wq = h + t0 - 1, wd + t1 - 1
    if p0 + out_hw[0] > hq * s0 or p1 + out_hw[1] > wq * s1:
        return None
    wp = F.pad(w, (0, s1 * t1 - k1, 0, s0 * t0 - k0))                             # (C_out, C_in, s0 t0, s1 t1)
    taps = wp.reshape(co, ci, t0, s0, t1, s1).flip(2, 4)                          # (C_out, C_in, j0, r0, j1, r1)
    kernel = taps.permute(3, 5, 1, 0, 2, 4).reshape(s0 * s1 * ci, co, t0, t1)
    out = F.conv2d(A, kernel, None, 1, (t0 - 1, t1 - 1))                           # (N, s0 s1 C_in, hq, wq)
    return PhaseMajor(out.permute(0, 2, 3, 1), Phases(s0, s1, p0, p1, hq, wq, ci, out_hw[0], out_hw[1]))


def arrange(v: Tensor, ph: Phases) -> Tensor:
    """``v`` (B, C, h, w) (or flattened (B, C h w)) in the phase-major order of ``ph``: (B, hq wq s0 s1 C), zero at
    the places the padding crops."""
    B = v.shape[0]
    v = v.reshape(B, ph.c, ph.h, ph.w)
    full = F.pad(v, (ph.p1, ph.wq * ph.s1 - ph.p1 - ph.w, ph.p0, ph.hq * ph.s0 - ph.p0 - ph.h))
    full = full.reshape(B, ph.c, ph.hq, ph.s0, ph.wq, ph.s1).permute(0, 2, 4, 3, 5, 1)
    return full.reshape(B, -1)


def flat_operands(A: "Tensor | PhaseMajor", mid: Tensor, rad: Tensor, center: Tensor | None):
    """``(A (B, S, n), mid, rad, center)`` of a concretisation flattened per example in one order: the input's
    for a tensor ``A`` (B, S, *shape), the phase-major one for a ``PhaseMajor`` (box and centre arranged, zero at
    the cropped places, and ``A`` zeroed there when a centre is given, for its norm). ``center`` may be None."""
    B, S = A.A.shape[:2] if isinstance(A, PhaseMajor) else A.shape[:2]
    if not isinstance(A, PhaseMajor):
        return A.reshape(B, S, -1), mid.reshape(B, -1), rad.reshape(B, -1), center
    ph = A.phases
    flat = A.flat()
    if center is not None:
        center = arrange(center, ph)
        flat = flat * arrange(torch.ones_like(mid[:1]), ph).unsqueeze(1)
    return flat, arrange(mid, ph), arrange(rad, ph), center
