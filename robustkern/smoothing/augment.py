"""Gaussian noise for smoothing-based training (Cohen, Rosenfeld, Kolter 2019, locuslab/smoothing
``code/train.py``): ``x + N(0, sigma^2 I)`` in pixel space, before any normalisation layer, **no clipping**.

Where the noise comes from
--------------------------
* ``seed=<int>``: the counter-based Philox4x32-10 generator of the fused op ``robustkern.ops.smoothing_noise``
  (C++ on CPU when the extension is built, Triton on CUDA, else the pure-PyTorch reference; all bit-identical).
  Noise element ``e`` of copy ``j`` of image ``b`` is ``fp32(sigma) * z`` with ``z`` a pure function of
  ``(seed, b, j, stream, e)``, so a draw replays exactly and does not depend on the batch composition, the
  device or the backend. For a float32 ``x`` and one copy the addition is fused into the op (one pass);
  otherwise the fp32 noise is drawn from a zero image and added in ``x``'s dtype.
* ``seed=None``: ``torch.randn(..., generator=generator)`` (torch's global generator when ``generator`` is
  None), i.e. ``x + randn_like(x) * sigma`` exactly as Cohen's train.py.
* ``noise=<tensor>``: the given noise is used as is (already scaled by sigma); replays another draw exactly.

Streams keep the noise of different purposes independent under one seed: ``STREAM_TRAIN_NOISE`` for the
augmentation noise, ``STREAM_TRADES_INIT`` for TRADES's random start, ``STREAM_ZERO_GRAD`` for the random
direction PGD takes when a gradient vanishes (the counter's sample index is then the PGD step). They do not
collide with the certification streams of ``robustkern.ops.smoothing`` (0, 1, 2).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from ..ops.smoothing import smoothing_noise

__all__ = ["gaussian_augment", "gaussian_noise", "STREAM_TRAIN_NOISE", "STREAM_TRADES_INIT", "STREAM_ZERO_GRAD"]

STREAM_TRAIN_NOISE, STREAM_TRADES_INIT, STREAM_ZERO_GRAD = 16, 17, 18
_U32 = 2 ** 32


def check_sigma(sigma, fn: str, *, allow_zero: bool = False) -> float:
    try:
        s = float(sigma)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: sigma must be a number, got {type(sigma).__name__}") from None
    if not math.isfinite(s) or s < 0 or (s == 0 and not allow_zero):
        raise ValueError(f"{fn}: sigma must be {'>= 0' if allow_zero else '> 0'} and finite, got {sigma}")
    return s


def check_seed(seed, fn: str) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        if isinstance(seed, Tensor) and seed.numel() == 1 and not seed.is_floating_point():
            seed = int(seed.item())
        else:
            raise TypeError(f"{fn}: seed must be an int, got {type(seed).__name__}")
    if not 0 <= seed < 2 ** 63:
        raise ValueError(f"{fn}: seed must be in [0, 2^63), got {seed}")
    return seed


def check_images(x, fn: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{fn}: x must be a floating-point tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"{fn}: x must be a batch (B, C, ...), got shape {tuple(x.shape)}")
    if x.shape[0] >= _U32:
        raise ValueError(f"{fn}: at most 2^32 - 1 images per batch")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: x contains NaN or inf")


def philox_normal(like: Tensor, rows_image: Tensor, rows_sample: Tensor, stream: int, seed: int,
                  scale: float) -> Tensor:
    """``scale * z`` for each row ``r``: standard normal noise shaped like one image of ``like``, keyed by
    ``(seed, rows_image[r], rows_sample[r], stream)``; float32 (counter-based, robustkern.ops.smoothing_noise)."""
    zero = torch.zeros((1,) + tuple(like.shape[1:]), dtype=torch.float32, device=like.device)
    src = torch.zeros(rows_image.shape[0], dtype=torch.int64, device=like.device)
    counter = torch.stack([rows_image.to(torch.int64), rows_sample.to(torch.int64),
                           torch.full_like(src, int(stream))], 1)
    return smoothing_noise(zero, src, counter, seed, scale)


def gaussian_noise(x: Tensor, sigma: float, num_copies: Optional[int] = None, *, seed: Optional[int] = None,
                   generator: Optional[torch.Generator] = None, stream: int = STREAM_TRAIN_NOISE) -> Tensor:
    """Noise ``sigma * z`` for ``x`` (B, C, ...): shaped like ``x`` when ``num_copies`` is None, else
    (B, num_copies, C, ...) with ``[b, j]`` the j-th draw for image b. ``seed`` -> the counter-based generator
    keyed by (seed, b, j, stream), float32 then cast to ``x.dtype``; else ``torch.randn`` with ``generator``
    in ``x.dtype`` (drawn in the (B, m, C, ...) order)."""
    fn = "gaussian_noise"
    sigma = check_sigma(sigma, fn)
    if not isinstance(x, Tensor) or x.dim() < 2:
        raise ValueError(f"{fn}: x must be a batch (B, C, ...)")
    m = 1 if num_copies is None else int(num_copies)
    if m < 1:
        raise ValueError(f"{fn}: num_copies must be >= 1, got {num_copies}")
    shape = (x.shape[0], m) + tuple(x.shape[1:])
    if seed is None:
        z = torch.randn(shape, generator=generator, dtype=x.dtype, device=x.device) * sigma
    else:
        seed = check_seed(seed, fn)
        b = torch.arange(x.shape[0], device=x.device).repeat_interleave(m)
        j = torch.arange(m, device=x.device).repeat(x.shape[0])
        z = philox_normal(x, b, j, stream, seed, sigma).to(x.dtype).view(shape)
    return z if num_copies is not None else z.squeeze(1)


def gaussian_augment(x: Tensor, sigma: float, *, seed: Optional[int] = None, noise: Optional[Tensor] = None,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    """Cohen et al.'s training augmentation ``x + sigma * z``, ``z ~ N(0, I)``, no clipping (pixel space:
    put the normalisation inside the model). Exactly one noise source is used: ``noise`` (same shape as ``x``,
    already scaled), else the counter-based generator keyed by ``seed`` (fused ``smoothing_noise`` op, noise of
    image b keyed by (seed, b, 0, STREAM_TRAIN_NOISE)), else ``torch.randn`` with ``generator`` (global when
    None). Differentiable in ``x`` (the gradient passes through unchanged)."""
    fn = "gaussian_augment"
    check_images(x, fn)
    sigma = check_sigma(sigma, fn, allow_zero=True)
    if noise is not None:
        if seed is not None or generator is not None:
            raise ValueError(f"{fn}: give noise, or seed/generator, not both")
        if tuple(noise.shape) != tuple(x.shape):
            raise ValueError(f"{fn}: noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
        return x + noise
    if sigma == 0:
        return x.clone()
    if seed is not None:
        if generator is not None:
            raise ValueError(f"{fn}: give seed or generator, not both")
        seed = check_seed(seed, fn)
        if x.dtype == torch.float32 and not x.requires_grad:  # fused: one pass reads x and writes x + noise
            b = torch.arange(x.shape[0], device=x.device)
            counter = torch.stack([b, torch.zeros_like(b), torch.full_like(b, STREAM_TRAIN_NOISE)], 1)
            return smoothing_noise(x.contiguous(), b, counter, seed, sigma)
        return x + gaussian_noise(x, sigma, seed=seed)
    return x + torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device) * sigma
