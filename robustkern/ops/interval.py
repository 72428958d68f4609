"""Interval (IBP) ops: ``robustkern::interval_linear``, ``interval_conv2d``, ``interval_affine``,
``interval_input_box``.

Each is an op of the table ``robustkern.ops._registry`` (C++ schema in ``csrc/ops.cpp``; autograd and fake
kernels registered from here): the Triton kernels (``robustkern.kernels.interval``), the compiled C++/CUDA
kernels or the pure-PyTorch reference (``robustkern.reference.interval``, which states the math and the
floating-point soundness argument). Backward passes are written with differentiable PyTorch ops, so double
backward works; without a double backward to record, the epilogue's backward runs the single-pass C++ op
``robustkern::interval_epilogue_backward`` where the compiled backend runs.
The backward passes differentiate the unwidened formulas: the rounding-error widening of ``sound=True`` is
``O(K u)`` of the bound and treated as a constant.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .._args import pair
from ..reference import interval as _ref
from ._registry import define_op, triton_kernel


__all__ = ["interval_linear", "interval_conv2d", "interval_affine", "interval_input_box"]

_FLOATS = (torch.float32, torch.float64)


# ----------------------------------------------------------------------------------------------- checks
def _check_box(op: str, mid: Tensor, rad: Tensor, min_dim: int, max_dim: int | None = None) -> None:
    dtype, ndim = mid.dtype, mid.dim()
    if (dtype in _FLOATS and rad.dtype is dtype and mid.shape == rad.shape and ndim >= min_dim
            and (max_dim is None or ndim <= max_dim) and mid.device == rad.device):
        return                                  # the valid case in one test; the errors below name the fault
    for name, t in (("mid", mid), ("rad", rad)):
        if t.dtype not in _FLOATS:
            raise TypeError(f"{op}: {name} must be float32 or float64 (bounds are computed in IEEE fp32/fp64), "
                            f"got {t.dtype}")
    if mid.shape != rad.shape:
        raise ValueError(f"{op}: mid and rad must have the same shape, got {tuple(mid.shape)} and "
                         f"{tuple(rad.shape)}")
    if mid.dtype != rad.dtype or mid.device != rad.device:
        raise ValueError(f"{op}: mid and rad must share dtype and device")
    if mid.dim() < min_dim or (max_dim is not None and mid.dim() > max_dim):
        want = f"{min_dim}" if max_dim == min_dim else f">= {min_dim}"
        raise ValueError(f"{op}: mid must have {want} dims, got shape {tuple(mid.shape)}")


def _check_like(op: str, name: str, t: Optional[Tensor], mid: Tensor, shape: Tuple[int, ...] | None = None):
    if t is None:
        return
    if t.dtype is not mid.dtype or t.device != mid.device:
        raise ValueError(f"{op}: {name} must have the dtype and device of mid ({mid.dtype}, {mid.device}), "
                         f"got {t.dtype}, {t.device}")
    if shape is not None and t.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_epilogue(op: str, scale, shift, mid: Tensor, channels: int):
    if scale is not None or shift is not None:
        _check_like(op, "scale", scale, mid, (channels,))
        _check_like(op, "shift", shift, mid, (channels,))



def _has_epilogue(scale, shift, relu) -> bool:
    return scale is not None or shift is not None or relu


# ----------------------------------------------------------------------------------------------- epilogue math
def _cview(v: Tensor, ndim: int) -> Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _reduce_channel(t: Tensor) -> Tensor:
    dims = [0] + list(range(2, t.dim()))
    return t.sum(dim=dims)


def _epilogue_grads(pm, pr, scale, shift, relu, gm, gr):
    """Gradients of ``(m, r) = relu?(scale * (pm, pr) + shift)`` (the unwidened formulas) with respect to
    ``pm, pr, scale, shift``, given the output gradients ``gm, gr``: the op ``interval_epilogue_backward`` (the
    single-pass C++ kernel where the compiled backend runs and no double backward is recorded; otherwise the
    differentiable formulas of ``epilogue_grads_reference``)."""
    g_pm, g_pr, g_scale, g_shift = INTERVAL_EPILOGUE_BACKWARD(pm, pr, scale, shift, relu, gm, gr)
    return g_pm, g_pr, (g_scale if scale is not None else None), (g_shift if shift is not None else None)


def epilogue_grads_reference(pm, pr, scale, shift, relu, gm, gr):
    """The epilogue's backward in differentiable PyTorch ops (any order); ``g_scale``/``g_shift`` are empty
    tensors when ``scale``/``shift`` are None, as the C++ op returns them."""
    nd = pm.dim()
    a = _cview(scale, nd) if scale is not None else None
    gm1, gr1 = gm, gr
    if relu:
        m1 = pm * a if a is not None else pm
        if shift is not None:
            m1 = m1 + _cview(shift, nd)
        r1 = pr * a.abs() if a is not None else pr
        hi_on = ((m1 + r1) > 0).to(gm.dtype)
        lo_on = ((m1 - r1) > 0).to(gm.dtype)
        dhi = (gm + gr) * 0.5 * hi_on
        dlo = (gm - gr) * 0.5 * lo_on
        gm1, gr1 = dhi + dlo, dhi - dlo
    g_shift = _reduce_channel(gm1) if shift is not None else pm.new_empty(0)
    g_scale = pm.new_empty(0)
    if a is not None:
        g_scale = _reduce_channel(gm1 * pm + gr1 * pr * torch.sign(a))
        gm1, gr1 = gm1 * a, gr1 * a.abs()
    return gm1, gr1, g_scale, g_shift


def _no_double_backward(backend, args):
    """The C++ epilogue backward is not differentiable: it serves only when no double backward is recorded
    (grad mode is off inside a backward pass unless ``create_graph=True``)."""
    return "a double backward is recorded" if torch.is_grad_enabled() else None


def _epilogue_backward_fake(pm, pr, scale, shift, relu, gm, gr):
    return torch.empty_like(pm), torch.empty_like(pr), pm.new_empty(pm.shape[1]), pm.new_empty(pm.shape[1])


INTERVAL_EPILOGUE_BACKWARD = define_op(
    "interval_epilogue_backward", reference=epilogue_grads_reference, cpp=True, public=False,
    serves=_no_double_backward, fake=_epilogue_backward_fake)


def _gemm_output_grads(ctx, out_shape, mid, gm, gr, gpm, gpr):
    """Gradients at the GEMM's output of a linear/conv op with an optional epilogue: through the epilogue
    from the final outputs' gradients ``gm, gr``, plus those of the pre-epilogue outputs ``gpm, gpr`` (None
    when unused). Returns ``(gm, gr, g_scale, g_shift)``."""
    _, _, _, scale, shift, pre_mid, pre_rad = ctx.saved_tensors
    g_scale = g_shift = None
    if pre_mid.numel():
        gm = _zeros_if_none(gm, pre_mid)
        gr = _zeros_if_none(gr, pre_rad)
        gm, gr, g_scale, g_shift = _epilogue_grads(pre_mid, pre_rad, scale, shift, ctx.relu, gm, gr)
        if gpm is not None and gpm.numel():
            gm = gm + gpm
        if gpr is not None and gpr.numel():
            gr = gr + gpr
    gm = _zeros_if_none(gm, mid.new_empty(out_shape))
    gr = _zeros_if_none(gr, gm)
    return gm, gr, g_scale, g_shift


def _zeros_if_none(g, like):
    return torch.zeros_like(like) if g is None else g


# ----------------------------------------------------------------------------------------------- linear
def _linear_fake(mid, rad, weight, bias, scale, shift, relu, sound):
    n = weight.shape[-2]
    out = mid.new_empty((mid.shape[0], n))
    pre = (mid.shape[0], n) if _has_epilogue(scale, shift, relu) else (0,)
    return out, torch.empty_like(out), mid.new_empty(pre), mid.new_empty(pre)


def _linear_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs: None, not zero tensors to add
    mid, rad, weight, bias, scale, shift, relu, sound = inputs
    ctx.relu = relu
    ctx.bias_dim = None if bias is None else bias.dim()
    ctx.save_for_backward(mid, rad, weight, scale, shift, output[2], output[3])


def _linear_backward(ctx, gm, gr, gpm, gpr):
    mid, rad, weight, scale, shift, pre_mid, pre_rad = ctx.saved_tensors
    need = ctx.needs_input_grad
    gm, gr, g_scale, g_shift = _gemm_output_grads(ctx, (mid.shape[0], weight.shape[-2]), mid, gm, gr, gpm, gpr)
    absw = weight.abs() if need[1] else None
    g_mid = g_rad = g_w = g_b = None
    if weight.dim() == 2:
        if need[0]:
            g_mid = gm @ weight
        if need[1]:
            g_rad = gr @ absw
        if need[2] and not torch.is_grad_enabled():
            # No double backward recorded: accumulate in one buffer (one (N, K) temporary, for sign(W),
            # instead of four; on CPU each fresh large buffer costs page faults as well as a pass).
            g_w = torch.mm(gr.t(), rad)
            g_w.mul_(torch.sign(weight))
            g_w.addmm_(gm.t(), mid)
        elif need[2]:
            g_w = gm.t() @ mid + torch.sign(weight) * (gr.t() @ rad)
        if ctx.bias_dim is not None and need[3]:
            g_b = gm.sum(0)
    else:
        if need[0]:
            g_mid = torch.bmm(gm.unsqueeze(1), weight).squeeze(1)
        if need[1]:
            g_rad = torch.bmm(gr.unsqueeze(1), absw).squeeze(1)
        if need[2]:
            g_w = gm.unsqueeze(2) * mid.unsqueeze(1) + torch.sign(weight) * (gr.unsqueeze(2) * rad.unsqueeze(1))
        if ctx.bias_dim is not None and need[3]:
            g_b = gm if ctx.bias_dim == 2 else gm.sum(0)
    return g_mid, g_rad, g_w, g_b, g_scale, g_shift, None, None


INTERVAL_LINEAR = define_op(
    "interval_linear", ieee=True, reference=_ref.interval_linear,
    triton=triton_kernel("interval", "interval_linear"), cpp=True, cuda=True, fake=_linear_fake,
    setup_context=_linear_setup, backward=_linear_backward,
    keeps=((0, 1, 2, 4, 5), (2, 3)))


def interval_linear(mid: Tensor, rad: Tensor, weight: Tensor, bias: Optional[Tensor] = None, *,
                    scale: Optional[Tensor] = None, shift: Optional[Tensor] = None, relu: bool = False,
                    sound: bool = True, return_pre: bool = False):
    """Interval image of ``x -> W x + b`` on the box ``|x - mid| <= rad``, then optionally the per-feature
    epilogue ``y -> relu?(scale * y + shift)`` (a folded BatchNorm1d and ReLU) in the same kernel.

    ``mid, rad`` (B, K); ``weight`` (N, K), or (B, N, K) per example (a specification folded into the
    last layer); ``bias`` (N,) or (B, N); ``scale, shift`` (N,). IBP (Gowal et al. 2018):
    ``mid' = W mid + b``, ``rad' = |W| rad``; with ``sound=True`` the radius is widened by a bound on the
    floating-point rounding error (see ``robustkern.reference.interval``). Returns ``(mid', rad')``, and
    also the box after the GEMM alone when ``return_pre`` (None when there is no epilogue).
    """
    op = "interval_linear"
    _check_box(op, mid, rad, 2, 2)
    (b, k), wshape = mid.shape, weight.shape
    if len(wshape) not in (2, 3) or wshape[-1] != k or (len(wshape) == 3 and wshape[0] != b):
        raise ValueError(f"{op}: weight must be (N, {k}) or ({b}, N, {k}) for mid of shape {(b, k)}, got "
                         f"{tuple(wshape)}")
    _check_like(op, "weight", weight, mid)
    n = wshape[-2]
    if bias is not None:
        if bias.shape != (n,) and bias.shape != (b, n):
            raise ValueError(f"{op}: bias must be ({n},) or ({b}, {n}), got {tuple(bias.shape)}")
        _check_like(op, "bias", bias, mid)
    _check_epilogue(op, scale, shift, mid, n)
    m, r, pm, pr = INTERVAL_LINEAR(mid, rad, weight, bias, scale, shift, relu, sound)
    if return_pre:
        return m, r, ((pm, pr) if _has_epilogue(scale, shift, relu) else None)
    return m, r


# ----------------------------------------------------------------------------------------------- conv2d
def _conv_out(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_fake(mid, rad, weight, bias, stride, padding, dilation, groups, scale, shift, relu, sound):
    ho = _conv_out(mid.shape[2], weight.shape[2], stride[0], padding[0], dilation[0])
    wo = _conv_out(mid.shape[3], weight.shape[3], stride[1], padding[1], dilation[1])
    shape = (mid.shape[0], weight.shape[0], ho, wo)
    pre = shape if _has_epilogue(scale, shift, relu) else (0,)
    return mid.new_empty(shape), mid.new_empty(shape), mid.new_empty(pre), mid.new_empty(pre)


def _conv_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs: None, not zero tensors to add
    mid, rad, weight, bias, stride, padding, dilation, groups, scale, shift, relu, sound = inputs
    ctx.conf = (stride, padding, dilation, groups)
    ctx.relu = relu
    ctx.has_bias = bias is not None
    ctx.out_shape = output[0].shape
    ctx.save_for_backward(mid, rad, weight, scale, shift, output[2], output[3])


def _conv_backward(ctx, gm, gr, gpm, gpr):
    mid, rad, weight, scale, shift, pre_mid, pre_rad = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conf
    need = ctx.needs_input_grad
    gm, gr, g_scale, g_shift = _gemm_output_grads(ctx, ctx.out_shape, mid, gm, gr, gpm, gpr)
    conv_bwd = torch.ops.aten.convolution_backward
    common = (stride, padding, dilation, False, [0, 0], groups)
    bias_sizes = [weight.shape[0]] if ctx.has_bias else None
    g_mid, g_w1, g_b = conv_bwd(gm, mid, weight, bias_sizes, *common,
                                [need[0], need[2], ctx.has_bias and need[3]])
    g_rad, g_w2, _ = conv_bwd(gr, rad, weight.abs(), None, *common, [need[1], need[2], False])
    g_w = g_w1 + torch.sign(weight) * g_w2 if need[2] else None
    return g_mid, g_rad, g_w, g_b, None, None, None, None, g_scale, g_shift, None, None


INTERVAL_CONV2D = define_op(
    "interval_conv2d", ieee=True, reference=_ref.interval_conv2d,
    triton=triton_kernel("interval", "interval_conv2d"), cpp=True, cuda=True, fake=_conv_fake,
    setup_context=_conv_setup, backward=_conv_backward,
    keeps=((0, 1, 2, 8, 9), (2, 3)))


def interval_conv2d(mid: Tensor, rad: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride=1,
                    padding=0, dilation=1, groups: int = 1, *, scale: Optional[Tensor] = None,
                    shift: Optional[Tensor] = None, relu: bool = False, sound: bool = True,
                    return_pre: bool = False):
    """Interval image of a 2-D convolution on the box ``|x - mid| <= rad`` (NCHW), centre and radius in one
    launch, then optionally the per-channel epilogue ``relu?(scale * y + shift)`` (a folded BatchNorm2d and
    ReLU). ``mid' = conv(mid, W) + b``, ``rad' = conv(rad, |W|)`` (Gowal et al. 2018), widened for rounding
    when ``sound``. Returns ``(mid', rad')`` (and the pre-epilogue box when ``return_pre``)."""
    op = "interval_conv2d"
    _check_box(op, mid, rad, 4, 4)
    stride = [stride, stride] if type(stride) is int else list(pair(stride, "stride", op))
    padding = [padding, padding] if type(padding) is int else list(pair(padding, "padding", op))
    dilation = [dilation, dilation] if type(dilation) is int else list(pair(dilation, "dilation", op))
    (_, c, h, w), wshape = mid.shape, weight.shape
    if len(wshape) != 4 or groups < 1 or wshape[1] * groups != c or wshape[0] % groups:
        raise ValueError(f"{op}: weight of shape {tuple(wshape)} with groups={groups} does not fit an "
                         f"input with {c} channels")
    o, _, kh, kw = wshape
    _check_like(op, "weight", weight, mid)
    _check_like(op, "bias", bias, mid, (o,))
    _check_epilogue(op, scale, shift, mid, o)
    if _conv_out(h, kh, stride[0], padding[0], dilation[0]) < 1 or _conv_out(w, kw, stride[1], padding[1],
                                                                             dilation[1]) < 1:
        raise ValueError(f"{op}: input of spatial size {(h, w)} is too small for kernel {(kh, kw)} with padding "
                         f"{tuple(padding)}, dilation {tuple(dilation)}")
    m, r, pm, pr = INTERVAL_CONV2D(mid, rad, weight, bias, stride, padding, dilation, groups, scale, shift, relu,
                                   sound)
    if return_pre:
        return m, r, ((pm, pr) if _has_epilogue(scale, shift, relu) else None)
    return m, r


# ----------------------------------------------------------------------------------------------- affine
def _affine_fake(mid, rad, scale, shift, relu, sound):
    return torch.empty_like(mid), torch.empty_like(rad)


def _affine_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs: None, not zero tensors to add
    mid, rad, scale, shift, relu, sound = inputs
    ctx.relu = relu
    ctx.save_for_backward(mid, rad, scale, shift)


def _affine_backward(ctx, gm, gr):
    mid, rad, scale, shift = ctx.saved_tensors
    gm = _zeros_if_none(gm, mid)
    gr = _zeros_if_none(gr, rad)
    g_mid, g_rad, g_scale, g_shift = _epilogue_grads(mid, rad, scale, shift, ctx.relu, gm, gr)
    return g_mid, g_rad, g_scale, g_shift, None, None


INTERVAL_AFFINE = define_op(
    "interval_affine", reference=_ref.interval_affine, triton=triton_kernel("interval", "interval_affine"),
    cpp=True, cuda=True, fake=_affine_fake, setup_context=_affine_setup, backward=_affine_backward,
    keeps=((0, 1, 2, 3), ()))


def interval_affine(mid: Tensor, rad: Tensor, scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                    *, relu: bool = False, sound: bool = True):
    """Per-channel affine map ``y = scale * x + shift`` (channel dim 1: a folded BatchNorm, or input
    normalisation with ``scale = 1/std, shift = -mean/std``) then optionally ReLU, on a box, in one pass:
    ``mid' = scale mid + shift``, ``rad' = |scale| rad``; ReLU maps the end points. NaN stays NaN."""
    op = "interval_affine"
    _check_box(op, mid, rad, 2)
    _check_epilogue(op, scale, shift, mid, mid.shape[1])
    if not _has_epilogue(scale, shift, relu):
        return mid, rad
    return INTERVAL_AFFINE(mid, rad, scale, shift, relu, sound)


# ----------------------------------------------------------------------------------------------- input box
def _box_fake(x, eps, x_min, x_max, sound):
    return torch.empty_like(x), torch.empty_like(x)


def _box_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # unused outputs: None, not zero tensors to add
    x, eps, x_min, x_max, sound = inputs
    ctx.limits = (x_min, x_max)
    ctx.save_for_backward(x, eps)


def _box_backward(ctx, gm, gr):
    x, eps = ctx.saved_tensors
    x_min, x_max = ctx.limits
    gm = _zeros_if_none(gm, x)
    gr = _zeros_if_none(gr, x)
    e = eps.reshape((-1,) + (1,) * (x.dim() - 1))
    lo_free = ((x - e) > x_min).to(x.dtype)
    hi_free = ((x + e) < x_max).to(x.dtype)
    dlo = (gm - gr) * 0.5 * lo_free
    dhi = (gm + gr) * 0.5 * hi_free
    g_x = dlo + dhi
    g_eps = (dhi - dlo).flatten(1).sum(1)
    return g_x, g_eps, None, None, None


INTERVAL_INPUT_BOX = define_op(
    "interval_input_box", reference=_ref.interval_input_box,
    triton=triton_kernel("interval", "interval_input_box"), cpp=True, cuda=True, fake=_box_fake,
    setup_context=_box_setup, backward=_box_backward, keeps=((0, 1), ()))


def interval_input_box(x: Tensor, eps, x_min: float = 0.0, x_max: float = 1.0, *, sound: bool = True):
    """The L-inf ball of radius ``eps`` (a float, or a (B,) tensor per example) around ``x``, clipped to
    ``[x_min, x_max]``, as a box ``(mid, rad)`` in one pass."""
    op = "interval_input_box"
    if x.dtype not in _FLOATS:
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have a batch dimension")
    eps = torch.as_tensor(eps, dtype=x.dtype, device=x.device)
    if eps.dim() == 0:
        eps = eps.expand(x.shape[0]).contiguous()
    if eps.dim() != 1 or eps.shape[0] != x.shape[0]:
        raise ValueError(f"{op}: eps must be a float or a ({x.shape[0]},) tensor, got shape {tuple(eps.shape)}")
    if not x_min <= x_max:
        raise ValueError(f"{op}: x_min ({x_min}) must be <= x_max ({x_max})")
    return INTERVAL_INPUT_BOX(x, eps, float(x_min), float(x_max), sound)
