"""The floor under sound bounds: which products must run in float64, and what that costs on this machine.

A sound bound of a float32 model must be within 1e-5 (of the largest bound) of the exact relaxation. Which of its
products can stay in float32?

* Centre products ``W mid`` (IBP) and the coefficient products ``A W`` (CROWN backward passes): their terms have
  both signs and cancel, so an a-priori float32 bound ``gamma_K(2^-24) |W| |mid|`` is relative to the magnitudes,
  not to the result; the magnitudes exceed the bounds by orders of magnitude (cancellation, and for CROWN the IBP
  magnitudes every step's error is bounded by). K = 4096 gives ``gamma_K = 2.4e-4`` of them: float64 (exact
  products of float32 numbers, ``gamma_K(2^-53) ~ 1e-13``) is the only choice.
* Radius products ``|W| rad``: non-negative terms, so a float32 product is within ``gamma_K(2^-24)`` of itself.
  The radius of the last layer is up to the largest bound itself, and the layers' relative errors add up along
  the network (each layer's ``|W|`` carries the earlier widening forward): ``sum_layers gamma_K`` of the largest
  bound, ``7 gamma_576 = 2.4e-4`` on CNN-7, ``gamma_4096 = 2.4e-4`` for cifar_medium's dense layer alone.
  A float32 product in chunks of ``c`` terms with the chunk sums added in float64 has ``gamma_c(2^-24)`` plus
  float64's: ``c <= 16`` (``1e-6`` per layer, ``7e-6`` over CNN-7's seven) would meet 1e-5, at the price of
  K/c float32 GEMMs of depth c (or a float32 GEMM kernel that spills to float64 every c terms, which no CPU BLAS
  offers). So radius products are float64 too, unless such a kernel exists.
* The rounding-error accounting (CROWN: ``err += |A| v`` per step) is a term of ~1e-13 relative: its own float32
  rounding, a few ``gamma(2^-24)`` of it, is negligible; it needs no float64 (``robustkern.bounds.step_errors``).

So the cheapest sound forward runs every GEMM and convolution of the bound computation in float64 and nothing
else: the same relaxation computed on a float64 copy of the model (``sound=False``), which is what
``floor_rows`` times. Its ratio to the unsound float32 forward is the floor of the forward's ratio. With a
gradient, the sound bounds' value comes from that float64 computation under ``no_grad`` and their gradient from
the float32 computation (``BoundedModule``: the backward pass runs in float32, the widening is not
differentiated), so the forward + backward costs at least ``t(fwd+bwd, float32) + t(fwd, float64)``: the floor of
its ratio is ``1 + t(fwd, float64) / t(fwd+bwd, float32)``. A construction that took the gradient from the float64
pass itself (the float32 formulas' backward at the sound boxes: a different gradient from today's) would still run
every product in float64 once: ``1 + (t(fwd, float64) - t(fwd, float32)) / t(fwd+bwd, float32)`` ("one-pass").
``op_rows`` shows where that comes from: float64 against float32 convolution (forward, and the transposed one of
CROWN's backward passes, on B*S coefficient rows) and GEMM, at the benchmark models' shapes, one thread. On x86 CPUs
float32 convolutions run in oneDNN (Winograd / direct, AVX-512 or AVX2, 16 lanes) while float64 ones fall back to
ATen's im2col + dgemm (8 lanes, the im2col copies twice as wide): on an AMD EPYC thread 1.1-5.7x for the forward and
1.5-8x for the transposed products of the CIFAR models' convolutions, 1.6-2.3x for dense layers, not the 2x of the
lane count.


    PYTHONPATH=python:. python benchmarks/bench_sound.py --floor --models cifar_medium,cnn_7layer_bn
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

import common
from robustkern.bounds import BoundedModule, margin_spec, robust_cross_entropy

SPEC_ROWS = 9   # the margin specification's rows per example: CROWN's coefficient rows per example


def _products(layer: nn.Module, shape: tuple, dtype: torch.dtype):
    """The callables of one layer's products in ``dtype``: the forward (IBP's centre or radius product) and the
    transposed product of a CROWN backward pass on ``SPEC_ROWS`` rows per example (float32 channels-last, as the
    unsound pass runs it; float64 by the input gradient of the convolution, as the sound pass does)."""
    g = torch.Generator().manual_seed(0)
    w = layer.weight.detach().to(dtype)
    x = torch.randn(shape, generator=g).to(dtype)
    if isinstance(layer, nn.Linear):
        A = torch.randn(shape[0] * SPEC_ROWS, w.shape[0], generator=g).to(dtype)
        return (lambda: x @ w.t()), (lambda: A @ w)
    out = F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    A = torch.randn((shape[0] * SPEC_ROWS,) + tuple(out.shape[1:]), generator=g).to(dtype)
    fwd = lambda: F.conv2d(x, w, None, layer.stride, layer.padding, layer.dilation, layer.groups)  # noqa: E731
    if dtype == torch.float32:
        A = A.contiguous(memory_format=torch.channels_last)
        opad = [s - ((o - 1) * st - 2 * p + d * (k - 1) + 1) for s, o, k, st, p, d in
                zip(shape[2:], out.shape[2:], w.shape[2:], layer.stride, layer.padding, layer.dilation)]
        return fwd, (lambda: F.conv_transpose2d(A, w, None, layer.stride, layer.padding, tuple(opad), layer.groups,
                                                layer.dilation))
    like = A.new_empty(1).expand((A.shape[0],) + tuple(shape[1:]))
    return fwd, (lambda: torch.ops.aten.convolution_backward(A, like, w, None, list(layer.stride), list(layer.padding),
                                                             list(layer.dilation), False, [0, 0], layer.groups,
                                                             [True, False, False])[0])


def op_rows(name: str, model: nn.Module, x: torch.Tensor, rounds: int) -> list[str]:
    """Markdown rows: per layer kind and shape, float32 and float64 times of the forward and transposed products."""
    rows = []
    for layer, shape in common.layer_input_shapes(model, x, (nn.Conv2d, nn.Linear)):
        f32, t32 = _products(layer, shape, torch.float32)
        f64, t64 = _products(layer, shape, torch.float64)
        t = common.time_cpu({"f32": f32, "f64": f64, "t32": t32, "t64": t64}, rounds=rounds)
        kind = (f"conv {layer.in_channels}->{layer.out_channels} {layer.kernel_size[0]}x{layer.kernel_size[1]}/"
                f"{layer.stride[0]}" if isinstance(layer, nn.Conv2d) else f"linear {layer.in_features}->"
                f"{layer.out_features}")
        ms = {k: v.median_ms for k, v in t.items()}
        rows.append(f"| {name} | {kind} | {'x'.join(map(str, shape))} | {ms['f32']:.3f} | {ms['f64']:.3f} | "
                    f"{ms['f64'] / ms['f32']:.2f} | {ms['t32']:.3f} | {ms['t64']:.3f} | {ms['t64'] / ms['t32']:.2f} |")
    return rows


OP_HEAD = ("| model | layer | input | fwd fp32 ms | fwd fp64 ms | fwd x | transposed fp32 ms (B*9 rows) | "
           "transposed fp64 ms | transposed x |\n|---|---|---|---|---|---|---|---|---|")


def floor_rows(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, methods, rounds: int):
    """Markdown rows: per method, the float32 unsound forward and forward + backward, the sound forward, the float64
    relaxation's forward (the floor) and the floor ratios (module docstring)."""
    C = margin_spec(y, 10)
    bm = BoundedModule(model, x[:1])
    bm64 = BoundedModule(copy.deepcopy(model).double(), x[:1].double())
    params = list(model.parameters())
    rows = []
    for method in methods:
        def fwd(b, sound, c, xx):
            def run():
                with torch.no_grad():
                    b.compute_bounds(xx, eps, method=method, C=c, sound=sound, bound_upper=False)
            return run

        def fwdbwd():
            for p in params:
                p.grad = None
            lb = bm.compute_bounds(x, eps, method=method, C=C, sound=False, bound_upper=False)[0]
            robust_cross_entropy(lb).backward()

        t = common.time_cpu({"fwd fp32": fwd(bm, False, C, x), "fwd sound": fwd(bm, True, C, x),
                             "fwd fp64": fwd(bm64, False, C.double(), x.double()), "fwd+bwd fp32": fwdbwd},
                            rounds=rounds)
        ms = {k: v.median_ms for k, v in t.items()}
        rows.append(f"| {name} | {method} | {ms['fwd fp32']:.2f} | {ms['fwd sound']:.2f} | {ms['fwd fp64']:.2f} | "
                    f"{ms['fwd+bwd fp32']:.2f} | {ms['fwd sound'] / ms['fwd fp32']:.2f} | "
                    f"{ms['fwd fp64'] / ms['fwd fp32']:.2f} | {1 + ms['fwd fp64'] / ms['fwd+bwd fp32']:.2f} | "
                    f"{1 + (ms['fwd fp64'] - ms['fwd fp32']) / ms['fwd+bwd fp32']:.2f} |")
        print(rows[-1], flush=True)
    return rows


FLOOR_HEAD = ("| model | method | fwd fp32 ms | fwd sound ms | fwd fp64 ms (floor) | fwd+bwd fp32 ms | fwd sound x | "
              "fwd floor x | fwd+bwd floor x | one-pass fwd+bwd floor x |\n|---|---|---|---|---|---|---|---|---|---|")
