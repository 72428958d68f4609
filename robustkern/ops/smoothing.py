"""Randomized-smoothing ops: ``robustkern::smoothing_noise`` and ``robustkern::smoothing_count``.

Each is an op of the table ``robustkern.ops._registry`` (C++ schema in ``csrc/ops.cpp``): the Triton kernels
(``robustkern.kernels.smoothing``), the compiled CPU kernels or the pure-PyTorch reference
(``robustkern.reference.smoothing``, which states
the math: Philox4x32-10 counter-based Gaussian noise keyed by (seed, image, sample, stream, element), and the
per-group argmax histogram of Cohen et al. 2019's Monte Carlo estimate). The compiled extension has CPU
kernels for both (csrc/cpu/smoothing_cpu.cpp, bit-identical to the reference) but no CUDA ones; when
``auto`` selects a compiled backend whose kernel is missing (the CUDA build, or an older extension built
before these kernels), the op falls back to Triton on CUDA or the reference (an explicitly requested
``cpp``/``cuda`` backend raises).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..reference import smoothing as _ref
from ._registry import define_op, triton_kernel

__all__ = ["smoothing_noise", "smoothing_count", "STREAM_SELECTION", "STREAM_ESTIMATION", "STREAM_PREDICT"]

# Counter streams: selection (n0) and estimation (n) samples never share a counter, so they are independent.
STREAM_SELECTION, STREAM_ESTIMATION, STREAM_PREDICT = 0, 1, 2
_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_U32 = 2 ** 32



def _channels_last(x: Tensor) -> bool:
    """x is strictly channels-last: 4-D, channels-last contiguous and not NCHW contiguous."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------------------------- noise
def _noise_fake(x, src, counter, seed, sigma, mean, std, out_dtype):
    fmt = torch.channels_last if _channels_last(x) else torch.contiguous_format
    return torch.empty((src.shape[0],) + tuple(x.shape[1:]), dtype=out_dtype, device=x.device, memory_format=fmt)


def _noise_setup(ctx, inputs, output):
    x, src, counter, seed, sigma, mean, std, out_dtype = inputs
    ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
    ctx.save_for_backward(src, std)


def _noise_backward(ctx, grad):
    """d out[r] / d x[src[r]] = 1 / std (the noise does not depend on x)."""
    src, std = ctx.saved_tensors
    g = grad.float()
    if std is not None:
        g = g / std.float().view((1, -1) + (1,) * (g.dim() - 2))
    gx = torch.zeros(ctx.x_shape, dtype=torch.float32, device=g.device).index_add_(0, src, g)
    return gx.to(ctx.x_dtype), None, None, None, None, None, None, None


SMOOTHING_NOISE = define_op(
    "smoothing_noise", reference=_ref.smoothing_noise, triton=triton_kernel("smoothing", "smoothing_noise"),
    cpp=True, fake=_noise_fake, setup_context=_noise_setup, backward=_noise_backward, keeps=((1, 6), ()))


def smoothing_noise(x: Tensor, src: Tensor, counter: Tensor, seed, sigma: float, *, mean: Optional[Tensor] = None,
                    std: Optional[Tensor] = None, out_dtype: torch.dtype = torch.float32) -> Tensor:
    """Noisy copies ``out[r] = cast(((x[src[r]] + sigma * z_r) - mean) / std)`` with ``z_r`` drawn by the
    counter-based generator from ``(seed, counter[r] = (image key, sample index, stream), element)``.

    ``x`` (I, C, ...) float, read in fp32 (the noise is added in fp32 before the cast to ``out_dtype``);
    ``src`` (R,) int64 in [0, I); ``counter`` (R, 3) int64, each entry in [0, 2^32); ``seed`` an int or a (1,)
    int64 tensor in [0, 2^63); ``mean``/``std`` (C,) per-channel normalisation (Cohen's NormalizeLayer).
    Returns (R, C, ...) of ``out_dtype``, in channels-last memory when ``x`` is (strictly) channels-last (the
    C++ kernel writes it so directly; the values do not depend on the layout). Differentiable in ``x``."""
    op = "smoothing_noise"
    if not x.is_floating_point():
        raise TypeError(f"{op}: x must be a floating tensor, got {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (I, C, ...), got shape {tuple(x.shape)}")
    if not sigma > 0:
        raise ValueError(f"{op}: sigma must be > 0, got {sigma}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"{op}: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if src.dim() != 1 or src.dtype != torch.int64 or counter.dtype != torch.int64 or \
            tuple(counter.shape) != (src.shape[0], 3):
        raise ValueError(f"{op}: src must be (R,) int64 and counter (R, 3) int64, got {tuple(src.shape)} "
                         f"{src.dtype} and {tuple(counter.shape)} {counter.dtype}")
    if x[0].numel() >= _U32 if x.shape[0] else False:
        raise ValueError(f"{op}: an image may have at most 2^32 - 1 elements")
    if not isinstance(seed, Tensor):
        if not 0 <= int(seed) < 2 ** 63:
            raise ValueError(f"{op}: seed must be in [0, 2^63), got {seed}")
        seed = torch.tensor([int(seed)], dtype=torch.int64, device=x.device)
    if (mean is None) != (std is None):
        raise ValueError(f"{op}: give both mean and std, or neither")
    if mean is not None:
        mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1)
        if mean.numel() == 1:
            mean, std = mean.expand(x.shape[1]).contiguous(), std.expand(x.shape[1]).contiguous()
        if mean.shape[0] != x.shape[1] or std.shape[0] != x.shape[1]:
            raise ValueError(f"{op}: mean and std must have {x.shape[1]} entries (one per channel)")
    out = SMOOTHING_NOISE(x, src, counter, seed, float(sigma), mean, std, out_dtype)
    if _channels_last(x) and not out.is_contiguous(memory_format=torch.channels_last):
        out = out.contiguous(memory_format=torch.channels_last)     # the backends without a channels-last write
    return out


# ----------------------------------------------------------------------------------------------- count
SMOOTHING_COUNT = define_op(
    "smoothing_count", reference=_ref.smoothing_count, triton=triton_kernel("smoothing", "smoothing_count"),
    cpp=True, fake=lambda logits, group,
    num_groups: logits.new_empty((num_groups, logits.shape[1]), dtype=torch.int64))


def smoothing_count(logits: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """``counts[g, k]`` = number of rows ``r`` with ``group[r] == g`` whose argmax (first maximum) is ``k``.
    ``logits`` (R, K) float; ``group`` (R,) int64 in [0, num_groups). Returns (num_groups, K) int64; the votes
    stay on the logits' device."""
    op = "smoothing_count"
    if logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be a 2-D float tensor (samples, classes), got "
                         f"{tuple(logits.shape)} {logits.dtype}")
    if group.dim() != 1 or group.shape[0] != logits.shape[0] or group.dtype != torch.int64:
        raise ValueError(f"{op}: group must be ({logits.shape[0]},) int64, got {tuple(group.shape)} {group.dtype}")
    if num_groups < 1 or logits.shape[1] < 1:
        raise ValueError(f"{op}: need num_groups >= 1 and at least one class")
    return SMOOTHING_COUNT(logits, group, int(num_groups))
