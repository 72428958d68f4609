"""Operator (spectral) norms of a network's linear layers: power-iteration estimates with persistent iterates
for training, and rigorous upper bounds for verification.

The L2 operator norm ``||A||_2`` of a layer's linear part (the bias does not matter) is what the Lipschitz
methods multiply along the network (LMT, Tsuzuku et al. 2018; BCP, Lee et al. 2020).

Training: power iteration. ``x <- A^T A x / ||A^T A x||`` on the operator itself (a convolution by
``conv2d`` and ``conv_transpose2d``, never by its flattened matrix), from an iterate kept per layer across
training steps (``PowerIteration``), so one step per training step (BCP's ``sniter=1``) tracks the slowly
changing weights. The iterations run without autograd; the estimate ``||A x||`` (``x`` the unit iterate) is then
computed once with autograd, whose gradient ``u x^T`` (``u = A x / ||A x||``) is the derivative of the top
singular value once the iterate has converged (as in spectral normalisation, Miyato et al. 2018). BCP
back-propagates through its iteration steps instead; the values are the same. Power iteration converges from
below, so its estimate is never a certificate.

Verification: ``operator_norm_upper``, an upper bound by construction (Gram iteration, Delattre et al. 2023,
"Efficient Bound of Lipschitz Constant for Convolutional Layers by Gram Iteration"): for a matrix ``M``,
``||M||_2^(2^t) = ||G_t||_2 <= ||G_t||_F`` with ``G_0 = M``, ``G_{k+1} = G_k^T G_k`` (or ``G_k G_k^T``, the
smaller), so ``||G_t||_F^(1/2^t)`` bounds ``||M||_2`` from above for every ``t`` and exceeds it by at most a
factor ``rank^(1/2^(t+1))``. Each Gram product is computed in float64 and its rounding error is bounded
(``|fl(G^T G) - G^T G| <= gamma_k |G|^T |G|``, so ``||error||_2 <= gamma_k ||G||_F^2``, Higham Lemma 3.1); the
bound is assembled backwards, ``||G_k||_2 <= sqrt(||fl(G_k^T G_k)||_2 + error_k)``, with every operation rounded
upwards, so it holds for the exact weights as stored.

A convolution (zero padding, any stride, dilation, groups) is bounded without forming its matrix: a stride-``s``
convolution equals a stride-1 convolution of the space-to-depth rearranged (polyphase) padded input with the
rearranged kernel ``K'[o, (c, p, q), a, b] = K[o, c, s a + p, s b + q]`` (an isometric embedding of the input),
which is a compression of the circular convolution on the ``N1 x N2`` polyphase grid (no index wraps). The
circular convolution is block-diagonalised by the 2-D DFT (Sedghi et al. 2019), so its norm is the largest
``||K'_hat(w)||_2`` over the ``N1 N2`` frequencies; each ``K'_hat(w)`` (a ``C_out x s^2 C_in`` complex matrix,
taken as its real ``2 x 2`` block form) gets the Gram-iteration bound. The DFT is a direct sum over the kernel
taps; its rounding error is bounded entry-wise by ``(tau + gamma_T) sum |K'|``, ``T`` taps, ``tau = 64 u`` the
error allowed for one twiddle factor ``cos``/``sin`` of a float64 phase (the phase rounds by at most
``2 pi 4u``; the platform's float64 ``cos``/``sin`` must be accurate to a few ulps, as glibc's, SLEEF's and
CUDA's are) and added as ``2 ||error||_F``. Per-channel affine layers (BatchNorm, normalisation) have the norm
``max |scale|``, taken from their enclosed coefficients (``robustkern.bounds.precision.Coefficients``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._numerics import gamma, next_up, tiny
from ..graph import BoundNode, tensor_input

__all__ = ["PowerIteration", "gram_upper", "matrix_norm_upper", "conv_norm_upper", "operator_norm_upper",
           "GRAM_ITERATIONS"]

_U64 = 2.0 ** -53
# Gram iterations of the verification bound: at most a factor rank^(1/2^(t+1)) above the norm (rank 4096: 1.0001)
GRAM_ITERATIONS = 16
# error allowed for one float64 twiddle factor of the DFT of a convolution kernel (see the module docstring)
TWIDDLE_ERROR = 64 * _U64


# ------------------------------------------------------------------------------------------- power iteration
def _conv_args(module) -> dict:
    return dict(stride=module.stride, padding=module.padding, dilation=module.dilation, groups=module.groups)


def _apply(node: BoundNode, weight: Tensor, x: Tensor) -> Tensor:
    """The layer's linear part (no bias) applied to ``x`` (1, *input shape)."""
    if node.kind == "linear":
        return F.linear(x, weight)
    return F.conv2d(x, weight, None, **_conv_args(node.module))


def _adjoint(node: BoundNode, weight: Tensor, y: Tensor, in_shape: tuple) -> Tensor:
    """The adjoint of the layer's linear part applied to ``y`` (1, *output shape)."""
    if node.kind == "linear":
        return F.linear(y, weight.t())
    m = node.module
    opad = []
    for size, osz, k, s, p, d in zip(in_shape[1:], y.shape[2:], weight.shape[2:], m.stride, m.padding, m.dilation):
        opad.append(size - ((osz - 1) * s - 2 * p + d * (k - 1) + 1))
    return F.conv_transpose2d(y, weight, None, m.stride, m.padding, tuple(opad), m.groups, m.dilation)


def _unit(v: Tensor) -> Tensor:
    n = v.norm()
    return v / n if bool(n > 0) else torch.full_like(v, 1.0 / math.sqrt(v.numel()))


class PowerIteration:
    """Power-iteration estimates of the operator norms of a model's Linear/Conv2d layers, with one iterate per
    layer kept across calls (``state_dict``/``load_state_dict`` carry them). ``shapes`` maps node names to
    per-example input shapes (``robustkern.graph.node_shapes``)."""

    def __init__(self, nodes: list[BoundNode], shapes: dict, seed: int = 0):
        self.layers = [n for n in nodes if n.kind in ("linear", "conv2d")]
        self.in_shapes = {n.name: tuple(shapes[tensor_input(n, shapes)]) for n in self.layers}
        self.iterates: dict[str, Tensor] = {}
        self._gen = torch.Generator().manual_seed(seed)

    def _start(self, node: BoundNode, like: Tensor) -> Tensor:
        x = torch.randn((1,) + self.in_shapes[node.name], generator=self._gen, dtype=torch.float64)
        return _unit(x.to(device=like.device, dtype=like.dtype))

    def iterate(self, node: BoundNode, weight: Tensor, steps: int, tol: float = 0.0) -> Tensor:
        """Advance the layer's iterate by ``steps`` steps of ``x <- A^T A x`` (normalised), without autograd;
        stop early when it moves by less than ``tol`` (L2). Returns the unit iterate."""
        w = weight.detach()
        x = self.iterates.get(node.name)
        if x is None:
            x = self._start(node, w)
        elif x.dtype != w.dtype or x.device != w.device:      # a loaded iterate (stored on the CPU)
            x = x.to(device=w.device, dtype=w.dtype)
        with torch.no_grad():
            for _ in range(steps):
                y = _unit(_apply(node, w, x))
                x_new = _unit(_adjoint(node, w, y, self.in_shapes[node.name]))
                moved = float((x_new - x).norm()) if tol > 0 else math.inf
                x = x_new
                if moved < tol:
                    break
        self.iterates[node.name] = x
        return x

    def estimate(self, node: BoundNode, weight: Tensor, steps: int = 1, tol: float = 0.0) -> Tensor:
        """``||A x||`` after ``steps`` iterations (a lower estimate of ``||A||_2``), differentiable in
        ``weight``."""
        x = self.iterate(node, weight, steps, tol)
        return _apply(node, weight, x).norm()

    def state_dict(self) -> dict:
        return {k: v.detach().cpu() for k, v in self.iterates.items()}

    def load_state_dict(self, state: dict) -> None:
        """Load iterates saved by ``state_dict``; a layer name this model lacks or an iterate of another shape
        is an error (the iterates belong to another model)."""
        for k, v in state.items():
            layer = next((n for n in self.layers if n.name == k), None)
            if layer is None or tuple(v.shape[1:]) != self.in_shapes[k]:
                raise ValueError(f"PowerIteration.load_state_dict: iterate {k!r} of shape {tuple(v.shape)} does not "
                                 f"fit this model's layers ({', '.join(n.name for n in self.layers)})")
        self.iterates = {k: v.clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------ rigorous upper bounds
def _frob_sq_upper(M: Tensor) -> Tensor:
    """An upper bound of ``||M_f||_F^2`` for each matrix of the batch ``M`` (F, m, n), float64, exact inputs."""
    n = M[0].numel()
    s = M.square().flatten(1).sum(1)
    return next_up(next_up(s * (1 + gamma(n + 2, _U64))) + n * tiny(torch.float64))


def _pow2_scale(fro_sq: Tensor) -> Tensor:
    """An integer exponent ``e`` per matrix with ``||M||_F / 2^e`` near 1 (int64)."""
    e = torch.floor(0.5 * torch.log2(fro_sq.clamp(min=1e-300))).clamp(-1000, 1000)
    return torch.where(fro_sq > 0, e, torch.zeros_like(e)).to(torch.int64)


def _pow2(e: Tensor) -> Tensor:
    """``2^e`` exactly (float64) for integer exponents in the normal range, built from the bit pattern."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def gram_upper(M: Tensor, iterations: int = GRAM_ITERATIONS) -> Tensor:
    """Upper bounds of ``||M_f||_2`` (F,) for a batch of real matrices ``M`` (F, m, n), taken as exact (any
    float dtype; computed in float64), by ``iterations`` Gram iterations with rigorous rounding (module
    docstring)."""
    G = M.detach().to(torch.float64)
    if G.dim() == 2:
        G = G.unsqueeze(0)
    numel = G[0].numel()
    e0 = _pow2_scale(_frob_sq_upper(G))
    G = G * _pow2(-e0).reshape(-1, 1, 1)
    # the scaled copy may underflow: each entry moves by at most the smallest subnormal < tiny
    extra0 = math.sqrt(numel) * tiny(torch.float64)
    levels = []
    for _ in range(iterations):
        m, n = G.shape[1:]
        N = G @ G.transpose(1, 2) if m <= n else G.transpose(1, 2) @ G
        k = n if m <= n else m
        err = next_up(gamma(k + 1, _U64) * _frob_sq_upper(G))
        e = _pow2_scale(_frob_sq_upper(N))
        G = N * _pow2(-e).reshape(-1, 1, 1)
        err = next_up(err + N.shape[1] * N.shape[2] * tiny(torch.float64) * _pow2(e))
        levels.append((e, err))
    beta = next_up(torch.sqrt(_frob_sq_upper(G)))
    for e, err in reversed(levels):
        beta = next_up(torch.sqrt(next_up(next_up(_pow2(e) * beta) + err)))
    return next_up(next_up(_pow2(e0) * next_up(beta + extra0)))


def matrix_norm_upper(weight: Tensor, iterations: int = GRAM_ITERATIONS) -> float:
    """A rigorous upper bound of ``||W||_2`` (the weight as stored)."""
    return float(gram_upper(weight.reshape(weight.shape[0], -1), iterations)[0])


def _dense_kernel(weight: Tensor, dilation: tuple, groups: int) -> Tensor:
    """The kernel as a dense (C_out, C_in, kh', kw') float64 tensor with dilation 1 and one group."""
    w = weight.detach().to(torch.float64)
    o, cg, kh, kw = w.shape
    dh, dw = dilation
    if dh > 1 or dw > 1:
        wd = w.new_zeros(o, cg, dh * (kh - 1) + 1, dw * (kw - 1) + 1)
        wd[:, :, ::dh, ::dw] = w
        w = wd
    if groups > 1:
        og = o // groups
        full = w.new_zeros(o, cg * groups, w.shape[2], w.shape[3])
        for g in range(groups):
            full[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = w[g * og:(g + 1) * og]
        w = full
    return w


def conv_norm_upper(weight: Tensor, in_hw: tuple, stride=1, padding=0, dilation=1, groups: int = 1,
                    iterations: int = GRAM_ITERATIONS) -> float:
    """A rigorous upper bound of the L2 operator norm of ``x -> conv2d(x, weight, None, stride, padding,
    dilation, groups)`` on inputs of spatial size ``in_hw`` (module docstring: polyphase, circular embedding,
    per-frequency Gram iteration)."""
    pair = (lambda v: (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1])))
    (sh, sw), (ph, pw), dil = pair(stride), pair(padding), pair(dilation)
    K = _dense_kernel(weight, dil, groups)
    o, c, kh, kw = K.shape
    n1, n2 = -(-(in_hw[0] + 2 * ph) // sh), -(-(in_hw[1] + 2 * pw) // sw)   # polyphase grid
    k1, k2 = -(-kh // sh), -(-kw // sw)
    Kp = K.new_zeros(o, c, sh, sw, k1, k2)        # K'[o, (c, p, q), a, b] = K[o, c, s a + p, s b + q]
    for p in range(sh):
        for q in range(sw):
            sub = K[:, :, p::sh, q::sw]
            Kp[:, :, p, q, :sub.shape[2], :sub.shape[3]] = sub
    Kp = Kp.reshape(o * c * sh * sw, k1 * k2)
    # frequencies up to conjugation: w2 in [0, n2 // 2], all w1 (K_hat(-w) = conj K_hat(w), same norm)
    w1 = torch.arange(n1, dtype=torch.int64)
    w2 = torch.arange(n2 // 2 + 1, dtype=torch.int64)
    a = torch.arange(k1, dtype=torch.int64)
    b = torch.arange(k2, dtype=torch.int64)
    phase = (w1.reshape(-1, 1, 1, 1) * a.reshape(1, 1, -1, 1) * n2 +
             w2.reshape(1, -1, 1, 1) * b.reshape(1, 1, 1, -1) * n1) % (n1 * n2)   # exact integers
    theta = phase.to(torch.float64).reshape(-1, k1 * k2) / (n1 * n2) * (2 * math.pi)
    re = (torch.cos(theta) @ Kp.t())                  # (F, o*c*s*s)
    im = (torch.sin(theta) @ Kp.t())
    taps = k1 * k2
    entry_err = next_up((TWIDDLE_ERROR + gamma(taps + 1, _U64)) * (1 + TWIDDLE_ERROR) * Kp.abs().sum(1))
    dft_err = next_up(2.0 * next_up(torch.sqrt(_frob_sq_upper(entry_err.reshape(1, 1, -1)))))[0]
    cin = c * sh * sw
    re, im = re.reshape(-1, o, cin), im.reshape(-1, o, cin)
    block = torch.cat([torch.cat([re, -im], 2), torch.cat([im, re], 2)], 1)   # (F, 2o, 2cin): same singular values
    per_freq = gram_upper(block, iterations)
    return float(next_up(per_freq.max() + dft_err))


def operator_norm_upper(node: BoundNode, in_shape: tuple, iterations: int = GRAM_ITERATIONS) -> float:
    """A rigorous upper bound of the operator norm of a Linear/Conv2d node's linear part (weights as stored)
    on inputs of per-example shape ``in_shape``."""
    m = node.module
    if node.kind == "linear":
        return matrix_norm_upper(m.weight, iterations)
    if node.kind == "conv2d":
        return conv_norm_upper(m.weight, tuple(in_shape[1:]), m.stride, m.padding, m.dilation, m.groups, iterations)
    raise ValueError(f"operator_norm_upper: node kind {node.kind!r} is not a Linear/Conv2d layer")
