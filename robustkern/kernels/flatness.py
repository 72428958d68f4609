"""Triton kernels for the second-order flatness ops; the math is that of ``robustkern.reference.flatness_ops``.

* Mask bits: element ``8k + j`` of the flattened tensor is bit ``j`` of byte ``k``. A program owns ``BLOCK``
  bytes: it loads a ``(BLOCK, 8)`` tile of elements (addresses ``8 * byte + j``), compares with zero and sums
  ``mask << j`` along the 8 to get the bytes. ``relu_bits`` writes ``relu(x)`` from the same tile, so the fused
  forward reads ``x`` once and writes ``4 + 1/8`` bytes per fp32 element instead of ``4 + 4`` (output +
  saved activation). ``relu_masked`` is element-wise: byte ``offs // 8`` is gathered, bit ``offs % 8`` tested.
* Softmax rows: one program per row (``BLOCK_C = next_power_of_2(C)`` lanes); the row max, exponentials, the
  sums ``<p, v>``, ``<p, g>``, ``<p, g a>`` and the output are formed in registers, one read of each input and
  one write, where eager PyTorch takes five to eight passes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import autotune_configs

__all__ = ["relu_pack_mask", "relu_bits", "relu_masked", "softmax_ce_grad", "softmax_curvature",
           "softmax_curvature_backward"]

Tensor = torch.Tensor


@triton.autotune(configs=autotune_configs([triton.Config({"BLOCK": 128}, num_warps=4),
                                           triton.Config({"BLOCK": 512}, num_warps=4)]),
                 key=["numel"])
@triton.jit
def _relu_bits_kernel(x_ptr, y_ptr, bits_ptr, numel, nbytes, WRITE_Y: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    byte = pid * BLOCK + tl.arange(0, BLOCK)
    j = tl.arange(0, 8)
    offs = byte[:, None] * 8 + j[None, :]
    m = offs < numel
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    pos = x > 0
    if WRITE_Y:
        tl.store(y_ptr + offs, tl.where(pos, x, 0.0), mask=m)
    packed = tl.sum(pos.to(tl.int32) << j[None, :], axis=1)
    tl.store(bits_ptr + byte, packed.to(tl.uint8), mask=byte < nbytes)


@triton.autotune(configs=autotune_configs([triton.Config({"BLOCK": 1024}, num_warps=4),
                                           triton.Config({"BLOCK": 4096}, num_warps=8)]),
                 key=["numel"])
@triton.jit
def _relu_masked_kernel(g_ptr, bits_ptr, out_ptr, numel, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    g = tl.load(g_ptr + offs, mask=m, other=0.0)
    b = tl.load(bits_ptr + offs // 8, mask=m, other=0).to(tl.int32)
    on = ((b >> (offs % 8).to(tl.int32)) & 1) != 0
    tl.store(out_ptr + offs, tl.where(on, g, 0.0), mask=m)


@triton.jit
def _softmax_row(z_ptr, row, C, cols, m):
    z = tl.load(z_ptr + row * C + cols, mask=m, other=-float("inf"))
    e = tl.exp(z - tl.max(z, axis=0))
    e = tl.where(m, e, 0.0)
    return e / tl.sum(e, axis=0)


@triton.jit
def _softmax_ce_grad_kernel(z_ptr, y_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    m = cols < C
    p = _softmax_row(z_ptr, row, C, cols, m)
    label = tl.load(y_ptr + row)
    out = p - tl.where(cols == label, 1.0, 0.0)
    tl.store(out_ptr + row * C + cols, out, mask=m)


@triton.jit
def _softmax_curvature_kernel(z_ptr, v_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    m = cols < C
    p = _softmax_row(z_ptr, row, C, cols, m)
    v = tl.load(v_ptr + row * C + cols, mask=m, other=0.0)
    a = v - tl.sum(p * v, axis=0)
    tl.store(out_ptr + row * C + cols, p * a, mask=m)


@triton.jit
def _softmax_curvature_backward_kernel(z_ptr, v_ptr, g_ptr, out_ptr, C, BLOCK_C: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_C)
    m = cols < C
    p = _softmax_row(z_ptr, row, C, cols, m)
    v = tl.load(v_ptr + row * C + cols, mask=m, other=0.0)
    g = tl.load(g_ptr + row * C + cols, mask=m, other=0.0)
    a = v - tl.sum(p * v, axis=0)
    ga = g * a
    out = p * (ga - tl.sum(p * ga, axis=0)) - tl.sum(p * g, axis=0) * (p * a)
    tl.store(out_ptr + row * C + cols, out, mask=m)


def _bits_launch(x: Tensor, write_y: bool):
    x = x.contiguous()
    numel = x.numel()
    nbytes = (numel + 7) // 8
    bits = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    y = torch.empty_like(x) if write_y else bits
    if numel:
        grid = lambda meta: (triton.cdiv(nbytes, meta["BLOCK"]),)  # noqa: E731
        _relu_bits_kernel[grid](x, y, bits, numel, nbytes, WRITE_Y=write_y)
    return y, bits


def relu_pack_mask(x: Tensor) -> Tensor:
    return _bits_launch(x, False)[1]


def relu_bits(x: Tensor) -> tuple[Tensor, Tensor]:
    return _bits_launch(x, True)


def relu_masked(grad: Tensor, bits: Tensor) -> Tensor:
    grad = grad.contiguous()
    out = torch.empty_like(grad)
    numel = grad.numel()
    if numel:
        grid = lambda meta: (triton.cdiv(numel, meta["BLOCK"]),)  # noqa: E731
        _relu_masked_kernel[grid](grad, bits.contiguous(), out, numel)
    return out


def _rows(z: Tensor):
    z = z.contiguous()
    return z, z.shape[0], z.shape[1], triton.next_power_of_2(max(z.shape[1], 1))


def softmax_ce_grad(logits: Tensor, y: Tensor) -> Tensor:
    z, b, c, bc = _rows(logits)
    out = torch.empty_like(z)
    if b:
        _softmax_ce_grad_kernel[(b,)](z, y.contiguous(), out, c, BLOCK_C=bc)
    return out


def softmax_curvature(logits: Tensor, v: Tensor) -> Tensor:
    z, b, c, bc = _rows(logits)
    out = torch.empty_like(z)
    if b:
        _softmax_curvature_kernel[(b,)](z, v.contiguous(), out, c, BLOCK_C=bc)
    return out


def softmax_curvature_backward(logits: Tensor, v: Tensor, g: Tensor) -> Tensor:
    z, b, c, bc = _rows(logits)
    out = torch.empty_like(z)
    if b:
        _softmax_curvature_backward_kernel[(b,)](z, v.contiguous(), g.contiguous(), out, c, BLOCK_C=bc)
    return out
