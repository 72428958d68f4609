"""Second-order flatness ops: the stages of a hand-built input-gradient pass whose backward passes are ops too,
so that double backward (a penalty on ``grad_x CE`` trained through the weights) runs through them.

* ``relu_bits(x) -> (relu(x), bits)`` and ``relu_pack_mask(x) -> bits``: the ReLU mask ``1[x > 0]`` packed 8
  elements per byte (``robustkern.reference.flatness_ops`` states the layout). ``relu_bits``' backward is
  ``relu_masked(g, bits)``; nothing but the bits is saved.
* ``relu_masked(grad, bits) = grad * 1[x > 0]``: linear in ``grad``, so its backward is itself (and that of its
  backward, ...): infinitely differentiable in ``grad``; the mask is piecewise constant (no gradient).
* ``softmax_ce_grad(logits, y) = softmax(logits) - onehot(y)``, the gradient of ``sum_i CE(logits_i, y_i)``; its
  backward is the softmax curvature ``softmax_curvature(logits, g) = (diag p - p p^T) g``.
* ``softmax_curvature(logits, v) = p * (v - <p, v>)``; backward: in ``v`` itself (the matrix is symmetric), in
  ``logits`` ``softmax_curvature_backward(logits, v, g)`` (third derivative of log-sum-exp), whose own backward
  is autograd through the float64-capable reference formula (any order).

Each is an op of the table ``robustkern.ops._registry`` (schema there) with its fake kernel and autograd: the
Triton kernel (``robustkern.kernels.flatness``; CUDA, or CPU under ``TRITON_INTERPRET=1`` when requested) or
the reference (``robustkern.reference.flatness_ops``), which is the CPU path (plain torch ops; there is no C++
kernel for this family: ``auto`` skips the compiled backends, an explicit ``cpp``/``cuda`` request raises
``BackendUnavailable``).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..reference import flatness_ops as _ref
from ._registry import define_op, triton_kernel

__all__ = ["relu_pack_mask", "relu_bits", "relu_masked", "softmax_ce_grad", "softmax_curvature",
           "softmax_curvature_backward", "conv2d_input_grad", "linear_input_grad"]

_FLOATS = (torch.float32, torch.float64)



def _packed(numel: int) -> int:
    return (numel + 7) // 8


# ----------------------------------------------------------------------------------------------- relu masks
RELU_PACK_MASK = define_op(
    "relu_pack_mask", reference=_ref.relu_pack_mask, triton=triton_kernel("flatness", "relu_pack_mask"),
    schema="relu_pack_mask(Tensor x) -> Tensor",
    fake=lambda x: x.new_empty(_packed(x.numel()), dtype=torch.uint8))


def _relu_bits_fake(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(_packed(x.numel()),
                                                                                  dtype=torch.uint8)


def _relu_bits_setup(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _relu_bits_backward(ctx, g_y, g_bits):
    (bits,) = ctx.saved_tensors
    return RELU_MASKED(g_y.contiguous(), bits)


RELU_BITS = define_op(
    "relu_bits", reference=_ref.relu_bits, triton=triton_kernel("flatness", "relu_bits"),
    schema="relu_bits(Tensor x) -> (Tensor, Tensor)",
    fake=_relu_bits_fake, setup_context=_relu_bits_setup, backward=_relu_bits_backward)


def _relu_masked_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _relu_masked_backward(ctx, g):
    (bits,) = ctx.saved_tensors
    return RELU_MASKED(g.contiguous(), bits), None


RELU_MASKED = define_op(
    "relu_masked", reference=_ref.relu_masked, triton=triton_kernel("flatness", "relu_masked"),
    schema="relu_masked(Tensor grad, Tensor bits) -> Tensor",
    fake=lambda grad, bits: torch.empty_like(grad, memory_format=torch.contiguous_format),
    setup_context=_relu_masked_setup, backward=_relu_masked_backward)


# ----------------------------------------------------------------------------------------------- softmax CE
def _rows_fake(logits, *rest):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _ce_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _ce_backward(ctx, g):
    (logits,) = ctx.saved_tensors
    return SOFTMAX_CURVATURE(logits, g.contiguous()), None


SOFTMAX_CE_GRAD = define_op(
    "softmax_ce_grad", reference=_ref.softmax_ce_grad, triton=triton_kernel("flatness", "softmax_ce_grad"),
    schema="softmax_ce_grad(Tensor logits, Tensor y) -> Tensor", fake=_rows_fake, setup_context=_ce_setup,
    backward=_ce_backward)


def _curv_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _curv_backward(ctx, g):
    logits, v = ctx.saved_tensors
    g = g.contiguous()
    g_logits = SOFTMAX_CURVATURE_BACKWARD(logits, v, g) if ctx.needs_input_grad[0] else None
    g_v = SOFTMAX_CURVATURE(logits, g) if ctx.needs_input_grad[1] else None
    return g_logits, g_v


SOFTMAX_CURVATURE = define_op(
    "softmax_curvature", reference=_ref.softmax_curvature, triton=triton_kernel("flatness", "softmax_curvature"),
    schema="softmax_curvature(Tensor logits, Tensor v) -> Tensor", fake=_rows_fake, setup_context=_curv_setup,
    backward=_curv_backward)


def _curv_bwd_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _curv_bwd_backward(ctx, g_out):
    # torch.func.vjp of the reference formula (plain differentiable torch ops) on the saved tensors themselves,
    # not detached copies: the result stays a function of them, so every further order of differentiation works.
    from ..reference.flatness_ops import softmax_curvature_backward as ref

    _, vjp = torch.func.vjp(ref, *ctx.saved_tensors)
    grads = vjp(g_out)
    return tuple(gr if n else None for gr, n in zip(grads, ctx.needs_input_grad))


SOFTMAX_CURVATURE_BACKWARD = define_op(
    "softmax_curvature_backward", reference=_ref.softmax_curvature_backward,
    triton=triton_kernel("flatness", "softmax_curvature_backward"),
    schema="softmax_curvature_backward(Tensor logits, Tensor v, Tensor g) -> Tensor", fake=_rows_fake,
    setup_context=_curv_bwd_setup, backward=_curv_bwd_backward)


# ----------------------------------------------------------------------------------------------- layer^T + mask
# The input-gradient stages of Linear and Conv2d, with the mask of the ReLU that feeds the layer applied in the
# same op (``bits`` may be None: no ReLU). The GEMM/convolution is ATen's; the point of the op is its backward:
# for ``out = m * L^T(g)`` (``L`` the layer's linear map, ``m`` the mask) and an incoming ``h``,
#     d/dg = L(m * h)                      (a forward conv / GEMM: ATen's fastest kernel)
#     d/dW = weight-gradient of L with input m * h and output-gradient g
# which is what a double backward needs, instead of ATen's generic convolution double-backward, and every piece
# is again differentiable (``relu_masked``, conv2d, aten.convolution_backward), so higher orders work.
def _mask_impl(r: Tensor, bits) -> Tensor:
    return r if bits is None else RELU_MASKED(r.contiguous(), bits)


def _conv2d_input_grad(grad: Tensor, weight: Tensor, bits: Optional[Tensor], input_size: List[int],
                       stride: List[int], padding: List[int], dilation: List[int], groups: int) -> Tensor:
    like = grad.new_zeros(()).expand(input_size)
    r = torch.ops.aten.convolution_backward(grad, like, weight, None, stride, padding, dilation, False, [0, 0],
                                            groups, [True, False, False])[0]
    return _mask_impl(r, bits).contiguous()


def _conv_fake(grad, weight, bits, input_size, stride, padding, dilation, groups):
    return grad.new_empty(input_size)


def _conv_setup(ctx, inputs, output):
    grad, weight, bits, *ctx.conv = inputs
    ctx.save_for_backward(grad, weight, bits)


def _conv_backward(ctx, h):
    grad, weight, bits = ctx.saved_tensors
    _, stride, padding, dilation, groups = ctx.conv
    hm = h.contiguous() if bits is None else RELU_MASKED(h.contiguous(), bits)
    g_grad = F.conv2d(hm, weight, None, stride, padding, dilation, groups) if ctx.needs_input_grad[0] else None
    g_weight = None
    if ctx.needs_input_grad[1]:
        g_weight = torch.ops.aten.convolution_backward(grad, hm, weight, None, stride, padding, dilation, False,
                                                       [0, 0], groups, [False, True, False])[1]
    return g_grad, g_weight, None, None, None, None, None, None


CONV2D_INPUT_GRAD = define_op(
    "conv2d_input_grad", reference=_conv2d_input_grad, composite=True,
    schema="conv2d_input_grad(Tensor grad, Tensor weight, Tensor? bits, int[] input_size, int[] stride, "
           "int[] padding, int[] dilation, int groups) -> Tensor",
    fake=_conv_fake, setup_context=_conv_setup, backward=_conv_backward)


def _linear_input_grad(grad: Tensor, weight: Tensor, bits: Optional[Tensor]) -> Tensor:
    return _mask_impl(grad.matmul(weight), bits).contiguous()


def _linear_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _linear_backward(ctx, h):
    grad, weight, bits = ctx.saved_tensors
    hm = h.contiguous() if bits is None else RELU_MASKED(h.contiguous(), bits)
    g_grad = hm.matmul(weight.t()) if ctx.needs_input_grad[0] else None
    g_weight = None
    if ctx.needs_input_grad[1]:
        g_weight = grad.reshape(-1, grad.shape[-1]).t().matmul(hm.reshape(-1, hm.shape[-1]))
    return g_grad, g_weight, None


LINEAR_INPUT_GRAD = define_op(
    "linear_input_grad", reference=_linear_input_grad, composite=True,
    schema="linear_input_grad(Tensor grad, Tensor weight, Tensor? bits) -> Tensor",
    fake=lambda grad, weight, bits: grad.new_empty(grad.shape[:-1] + weight.shape[1:]),
    setup_context=_linear_setup, backward=_linear_backward)


# ----------------------------------------------------------------------------------------------- public API
def _check_float(op: str, name: str, t) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a tensor")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{op}: {name} must be float32 or float64, got {t.dtype}")


def _check_rows(op: str, logits: Tensor, **others) -> None:
    _check_float(op, "logits", logits)
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (B, C), got shape {tuple(logits.shape)}")
    for name, t in others.items():
        _check_float(op, name, t)
        if t.shape != logits.shape or t.dtype != logits.dtype or t.device != logits.device:
            raise ValueError(f"{op}: {name} must match logits' shape, dtype and device ({tuple(logits.shape)}, "
                             f"{logits.dtype}, {logits.device}); got {tuple(t.shape)}, {t.dtype}, {t.device}")


def relu_pack_mask(x: Tensor) -> Tensor:
    """``1[x > 0]`` of ``x.flatten()`` packed 8 per byte: uint8 of shape ``(ceil(x.numel() / 8),)``, element
    ``8k + j`` at bit ``j`` of byte ``k``. Not differentiable (``x`` is read, not traced)."""
    _check_float("relu_pack_mask", "x", x)
    return RELU_PACK_MASK(x.detach().contiguous())


def relu_bits(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(relu(x), relu_pack_mask(x))`` in one pass; differentiable in ``x`` (the backward reads the bits)."""
    _check_float("relu_bits", "x", x)
    return RELU_BITS(x.contiguous())


def relu_masked(grad: Tensor, bits: Tensor) -> Tensor:
    """``grad * 1[x > 0]``, the mask of an ``x`` of ``grad``'s shape read from ``bits`` (``relu_pack_mask``).
    Linear in ``grad``: differentiable to any order."""
    op = "relu_masked"
    _check_float(op, "grad", grad)
    if not isinstance(bits, Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1:
        raise TypeError(f"{op}: bits must be a 1-D uint8 tensor from relu_pack_mask/relu_bits")
    if bits.numel() != _packed(grad.numel()) or bits.device != grad.device:
        raise ValueError(f"{op}: bits holds {bits.numel()} bytes on {bits.device}; grad of shape "
                         f"{tuple(grad.shape)} on {grad.device} needs {_packed(grad.numel())} on its device")
    return RELU_MASKED(grad.contiguous(), bits.contiguous())


def softmax_ce_grad(logits: Tensor, y: Tensor) -> Tensor:
    """``softmax(logits) - onehot(y)`` for ``logits`` (B, C) and labels ``y`` (B,) int64: the gradient of
    ``sum_i CE(logits_i, y_i)``. Differentiable in ``logits`` to any order (backward = softmax curvature)."""
    op = "softmax_ce_grad"
    _check_rows(op, logits)
    if not isinstance(y, Tensor) or y.dtype != torch.int64 or y.shape != logits.shape[:1]:
        raise ValueError(f"{op}: y must be an int64 tensor of shape ({logits.shape[0]},)")
    return SOFTMAX_CE_GRAD(logits.contiguous(), y.to(logits.device).contiguous())


def softmax_curvature(logits: Tensor, v: Tensor) -> Tensor:
    """``(diag p - p p^T) v = p * (v - <p, v>)`` per row, ``p = softmax(logits)``; differentiable to any order."""
    _check_rows("softmax_curvature", logits, v=v)
    return SOFTMAX_CURVATURE(logits.contiguous(), v.contiguous())


def softmax_curvature_backward(logits: Tensor, v: Tensor, g: Tensor) -> Tensor:
    """Gradient of ``<g, softmax_curvature(logits, v)>`` w.r.t. ``logits`` (module docstring)."""
    _check_rows("softmax_curvature_backward", logits, v=v, g=g)
    return SOFTMAX_CURVATURE_BACKWARD(logits.contiguous(), v.contiguous(), g.contiguous())


def _check_bits(op: str, bits, numel: int, device) -> None:
    if bits is None:
        return
    if not isinstance(bits, Tensor) or bits.dtype != torch.uint8 or bits.dim() != 1:
        raise TypeError(f"{op}: bits must be None or a 1-D uint8 tensor from relu_pack_mask/relu_bits")
    if bits.numel() != _packed(numel) or bits.device != device:
        raise ValueError(f"{op}: bits holds {bits.numel()} bytes on {bits.device}; the layer input has {numel} "
                         f"elements on {device} and needs {_packed(numel)} bytes there")


def conv2d_input_grad(grad: Tensor, weight: Tensor, bits: Optional[Tensor], input_size, stride=1, padding=0,
                      dilation=1, groups: int = 1) -> Tensor:
    """``1[a > 0] * conv2d^T(grad)``: the gradient w.r.t. the input (of shape ``input_size``) of ``conv2d(input,
    weight, stride, padding, dilation, groups)`` given ``grad`` w.r.t. its output, masked by the ReLU whose
    pre-activation ``a`` produced the input (``bits = relu_pack_mask(a)``; None: no mask). Differentiable in
    ``grad`` and ``weight`` to any order (see the comment above the op)."""
    op = "conv2d_input_grad"
    _check_float(op, "grad", grad)
    _check_float(op, "weight", weight)
    pair = lambda v: [int(v), int(v)] if isinstance(v, int) else [int(t) for t in v]  # noqa: E731
    input_size = [int(t) for t in input_size]
    if grad.dim() != 4 or weight.dim() != 4 or len(input_size) != 4 or input_size[0] != grad.shape[0]:
        raise ValueError(f"{op}: grad (B, C_out, H', W'), weight (C_out, C_in/groups, kH, kW) and input_size "
                         f"(B, C_in, H, W) expected; got {tuple(grad.shape)}, {tuple(weight.shape)}, {input_size}")
    if weight.dtype != grad.dtype:
        raise ValueError(f"{op}: grad and weight must share a dtype, got {grad.dtype} and {weight.dtype}")
    _check_bits(op, bits, input_size[0] * input_size[1] * input_size[2] * input_size[3], grad.device)
    return CONV2D_INPUT_GRAD(grad.contiguous(), weight, bits, input_size, pair(stride), pair(padding),
                              pair(dilation), int(groups))


def linear_input_grad(grad: Tensor, weight: Tensor, bits: Optional[Tensor]) -> Tensor:
    """``1[a > 0] * (grad @ weight)``: the input gradient of ``F.linear(input, weight)`` masked by the ReLU whose
    pre-activation ``a`` produced the input (``bits``; None: no mask). Differentiable to any order."""
    op = "linear_input_grad"
    _check_float(op, "grad", grad)
    _check_float(op, "weight", weight)
    if weight.dim() != 2 or grad.dim() < 1 or grad.shape[-1] != weight.shape[0] or weight.dtype != grad.dtype:
        raise ValueError(f"{op}: grad (..., out) and weight (out, in) of one dtype expected; got "
                         f"{tuple(grad.shape)} {grad.dtype}, {tuple(weight.shape)} {weight.dtype}")
    _check_bits(op, bits, grad.numel() // max(grad.shape[-1], 1) * weight.shape[1], grad.device)
    return LINEAR_INPUT_GRAD(grad.contiguous(), weight, bits)
