"""Ground truth in exact arithmetic: a captured model evaluated with rigorous interval arithmetic.

``exact_forward(model, x)`` evaluates ``model`` on the points ``x`` the way a certificate means it: every
parameter, buffer and input taken as the real number its floating-point value represents, every operation
carried out in real arithmetic. Each output is returned as an ``mpmath.iv`` interval (``prec`` bits, outward
rounded) that contains the exact real value; at the default 160 bits the intervals are ~1e-45 wide, so a bound
that misses one of them is wrong, not unlucky. ``violations`` counts bounds that miss, rigorously (an interval
entirely outside the bound).

BatchNorm. In eval mode (with running statistics) the layer is ``weight * (z - running_mean) /
sqrt(running_var + eps) + bias``. In training mode (or without running statistics) ``mean`` and ``var`` are
the exact mean and biased variance of the layer's input over ``clean_batch`` (batch and spatial dimensions),
that input itself computed exactly by the same network on ``clean_batch``: the function that robustkern's
sound bounds are about for a model in training mode (see ``robustkern.bounds.module``).

Meant for small models (tens of thousands of multiply-adds per example; a few ms each). Supports what
``robustkern.graph.capture`` supports. Uses ``mpmath`` (a dependency of torch).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from torch import Tensor, nn

from .._args import pair
from ..graph import capture, normalize_params

__all__ = ["exact_forward", "exact_spec", "violations", "to_intervals", "exact_fraction", "inside_linf",
           "inside_l2"]


def _iv(prec: int):
    from mpmath import iv
    iv.prec = prec
    return iv


def to_intervals(t: Tensor, prec: int = 160) -> np.ndarray:
    """A float tensor as an object array of point intervals (exact: every float is a dyadic rational)."""
    iv = _iv(prec)
    flat = t.detach().cpu().to(torch.float64).flatten().tolist() if t.dtype != torch.float64 else \
        t.detach().cpu().flatten().tolist()
    return np.array([iv.mpf(v) for v in flat], dtype=object).reshape(tuple(t.shape))


_relu = np.frompyfunc(lambda v: v if v.a >= 0 else (v * 0 if v.b <= 0 else _relu_straddle(v)), 1, 1)


def _relu_straddle(v):
    from mpmath import iv
    return iv.mpf([0, v.b])


def _linear(z: np.ndarray, m: nn.Linear, prec: int) -> np.ndarray:
    out = z.dot(to_intervals(m.weight, prec).T)
    if m.bias is not None:
        out = out + to_intervals(m.bias, prec)
    return out


def _pad(z: np.ndarray, ph: int, pw: int, prec: int) -> np.ndarray:
    if ph == 0 and pw == 0:
        return z
    iv = _iv(prec)
    B, C, H, W = z.shape
    out = np.empty((B, C, H + 2 * ph, W + 2 * pw), dtype=object)
    out.fill(iv.mpf(0))
    out[:, :, ph:ph + H, pw:pw + W] = z
    return out


def _conv2d(z: np.ndarray, m: nn.Conv2d, prec: int) -> np.ndarray:
    fn = "exact_forward"
    (sh, sw), (ph, pw), (dh, dw) = (pair(m.stride, "stride", fn), pair(m.padding, "padding", fn),
                                    pair(m.dilation, "dilation", fn))
    w = to_intervals(m.weight, prec)                      # (O, C/g, kh, kw)
    O, cg, kh, kw = w.shape
    zp = _pad(z, ph, pw, prec)
    B, C, H, W = zp.shape
    oh = (H - dh * (kh - 1) - 1) // sh + 1
    ow = (W - dw * (kw - 1) - 1) // sw + 1
    g = m.groups
    og = O // g
    out = np.empty((B, O, oh, ow), dtype=object)
    for gi in range(g):
        zg = zp[:, gi * cg:(gi + 1) * cg]
        wg = w[gi * og:(gi + 1) * og].reshape(og, -1)     # (og, cg*kh*kw)
        for i in range(oh):
            for j in range(ow):
                patch = zg[:, :, i * sh:i * sh + dh * (kh - 1) + 1:dh, j * sw:j * sw + dw * (kw - 1) + 1:dw]
                out[:, gi * og:(gi + 1) * og, i, j] = patch.reshape(B, -1).dot(wg.T)
    if m.bias is not None:
        out = out + to_intervals(m.bias, prec).reshape(1, -1, 1, 1)
    return out


def _avgpool(z: np.ndarray, m: nn.AvgPool2d, prec: int) -> np.ndarray:
    iv = _iv(prec)
    (kh, kw) = pair(m.kernel_size, "kernel_size", "exact_forward")
    (sh, sw) = pair(m.stride if m.stride is not None else m.kernel_size, "stride", "exact_forward")
    (ph, pw) = pair(m.padding, "padding", "exact_forward")
    B, C, H, W = z.shape
    zp = _pad(z, ph, pw, prec)
    oh = (H + 2 * ph - kh) // sh + 1
    ow = (W + 2 * pw - kw) // sw + 1
    out = np.empty((B, C, oh, ow), dtype=object)
    for i in range(oh):
        for j in range(ow):
            h0, w0 = i * sh, j * sw
            win = zp[:, :, h0:h0 + kh, w0:w0 + kw]
            total = win.reshape(B, C, -1).sum(-1)
            if m.divisor_override:
                div = m.divisor_override
            elif m.count_include_pad:
                div = (min(h0 + kh, H + 2 * ph) - h0) * (min(w0 + kw, W + 2 * pw) - w0)
            else:
                hs, he = max(h0 - ph, 0), min(h0 + kh - ph, H)
                ws, we = max(w0 - pw, 0), min(w0 + kw - pw, W)
                div = (he - hs) * (we - ws)
            out[:, :, i, j] = total / iv.mpf(div)
    return out


def _channel(v: np.ndarray, ndim: int) -> np.ndarray:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def _batch_stats(z: np.ndarray, prec: int):
    iv = _iv(prec)
    axes = (0,) + tuple(range(2, z.ndim))
    n = 1
    for a in axes:
        n *= z.shape[a]
    mean = z.sum(axis=axes) / iv.mpf(n)
    d = z - _channel(mean, z.ndim)
    var = (d * d).sum(axis=axes) / iv.mpf(n)
    return mean, np.array([iv.mpf([max(0, v.a), v.b]) for v in var], dtype=object)


def _batchnorm(z: np.ndarray, m, stats, prec: int) -> np.ndarray:
    iv = _iv(prec)
    if stats is None:
        mean, var = to_intervals(m.running_mean, prec), to_intervals(m.running_var, prec)
    else:
        mean, var = stats
    inv = np.array([1 / iv.sqrt(v + iv.mpf(float(m.eps))) for v in var], dtype=object)
    scale = inv * to_intervals(m.weight, prec) if m.weight is not None else inv
    out = (z - _channel(mean, z.ndim)) * _channel(scale, z.ndim)
    if m.bias is not None:
        out = out + _channel(to_intervals(m.bias, prec), z.ndim)
    return out


def _normalize(z: np.ndarray, m, prec: int) -> np.ndarray:
    mean, std = normalize_params(m)
    return (z - _channel(to_intervals(mean, prec), z.ndim)) / _channel(to_intervals(std, prec), z.ndim)


def _reshape(node, env_shapes: dict, z: np.ndarray, env_meta: dict) -> np.ndarray:
    """Replay a reshape node on an index tensor, then gather the intervals by index."""
    src = next(i for i in node.inputs if i in env_shapes)
    idx = torch.arange(z.size, dtype=torch.float64).reshape(z.shape)
    values = dict(env_meta)
    values[src] = idx
    out = node.call(values)
    return z.reshape(-1)[out.to(torch.int64).reshape(-1).numpy()].reshape(tuple(out.shape))


def _uses_batch_stats(m) -> bool:
    return m.training or m.running_mean is None


def _run(nodes, x: np.ndarray, prec: int, stats: dict | None, record: dict | None):
    env: dict = {}
    shapes: dict = {}
    meta: dict = {}
    for node in nodes:
        kind = node.kind
        if kind == "input":
            v = x
        elif kind == "output":
            return env[node.inputs[0]]
        elif kind == "meta":
            concrete = {k: torch.zeros(s) for k, s in shapes.items()}
            concrete.update(meta)
            meta[node.name] = node.call(concrete)
            continue
        else:
            z = env[next(i for i in node.inputs if i in env)]
            m = node.module
            if kind == "linear":
                v = _linear(z, m, prec)
            elif kind == "conv2d":
                v = _conv2d(z, m, prec)
            elif kind == "relu":
                v = _relu(z)
            elif kind == "batchnorm":
                st = None
                if _uses_batch_stats(m):
                    if record is not None:
                        record[node.name] = _batch_stats(z, prec)
                    if stats is None or node.name not in stats:
                        raise ValueError(f"exact_forward: BatchNorm '{node.path}' uses batch statistics; give "
                                         f"clean_batch")
                    st = stats[node.name]
                v = _batchnorm(z, m, st, prec)
            elif kind == "normalize":
                v = _normalize(z, m, prec)
            elif kind == "avgpool":
                v = _avgpool(z, m, prec)
            elif kind == "add":
                v = env[node.inputs[0]] + env[node.inputs[1]]
            elif kind == "reshape":
                v = _reshape(node, shapes, z, meta)
            elif kind == "identity":
                if isinstance(m, nn.Dropout) and m.training and m.p > 0:
                    raise ValueError(f"exact_forward: Dropout '{node.path}' is in training mode")
                v = z
            else:  # pragma: no cover
                raise AssertionError(kind)
        env[node.name] = v
        shapes[node.name] = v.shape
    raise AssertionError("graph without output")


def exact_forward(model: nn.Module, x: Tensor, *, clean_batch: Tensor | None = None, prec: int = 160
                  ) -> np.ndarray:
    """The outputs (B, n_out) of ``model`` at ``x`` in exact arithmetic, as ``mpmath.iv`` intervals of
    ``prec`` bits. ``clean_batch``: the batch whose exact statistics the training-mode BatchNorm layers use
    (required when the model has such layers)."""
    nodes = capture(model)
    stats = None
    if clean_batch is not None:
        stats = {}
        _run(nodes, to_intervals(clean_batch, prec), prec, stats, stats)
    return _run(nodes, to_intervals(x, prec), prec, stats, None)


def exact_spec(C: Tensor | None, out: np.ndarray, prec: int = 160) -> np.ndarray:
    """``C f`` (B, S) for exact outputs ``out`` (B, n_out) and a specification ``C`` (B, S, n_out), exactly."""
    if C is None:
        return out
    c = to_intervals(C, prec)
    return np.stack([c[b].dot(out[b]) for b in range(out.shape[0])])


def violations(values: np.ndarray, lower: Tensor | None, upper: Tensor | None) -> int:
    """How many exact values lie certainly below ``lower`` or above ``upper`` (element-wise)."""
    n = 0
    lo = lower.detach().cpu().double().numpy() if lower is not None else None
    hi = upper.detach().cpu().double().numpy() if upper is not None else None
    for idx in np.ndindex(values.shape):
        v = values[idx]
        if lo is not None and v.b < lo[idx]:
            n += 1
        if hi is not None and v.a > hi[idx]:
            n += 1
    return n


def exact_fraction(v) -> Fraction:
    """A float (or a 0-d tensor) as the exact rational it represents."""
    return Fraction(float(v))


def inside_linf(xp: Tensor, x: Tensor, eps, x_min: float = -math.inf, x_max: float = math.inf) -> Tensor:
    """``xp`` moved (by whole ulps, towards ``x``) until every element lies exactly in ``|xp - x| <= eps``
    and ``[x_min, x_max]`` (checked in rational arithmetic; ``eps`` a float or a (B,) tensor)."""
    xp64, x64 = xp.detach().to(torch.float64).cpu().clone(), x.detach().to(torch.float64).cpu()
    eps_t = torch.as_tensor(eps, dtype=torch.float64).expand(x.shape[0]) if not isinstance(eps, Tensor) or \
        eps.dim() == 0 else eps.detach().to(torch.float64).cpu()
    flat_p, flat_x = xp64.reshape(x.shape[0], -1), x64.reshape(x.shape[0], -1)
    for b in range(flat_p.shape[0]):
        e = Fraction(float(eps_t[b]))
        for i in range(flat_p.shape[1]):
            c = Fraction(float(flat_x[b, i]))
            lo, hi = c - e, c + e
            if math.isfinite(x_min):
                lo = max(lo, Fraction(x_min))
            if math.isfinite(x_max):
                hi = min(hi, Fraction(x_max))
            v = float(flat_p[b, i])
            while Fraction(v) < lo:
                v = math.nextafter(v, math.inf)
            while Fraction(v) > hi:
                v = math.nextafter(v, -math.inf)
            flat_p[b, i] = v
    return flat_p.reshape(x.shape)


def inside_l2(xp: Tensor, x: Tensor, eps) -> Tensor:
    """``xp`` pulled towards ``x`` until ``||xp - x||_2 <= eps`` holds exactly per example (rationals)."""
    xp64, x64 = xp.detach().to(torch.float64).cpu().clone(), x.detach().to(torch.float64).cpu()
    eps_t = torch.as_tensor(eps, dtype=torch.float64).expand(x.shape[0]) if not isinstance(eps, Tensor) or \
        eps.dim() == 0 else eps.detach().to(torch.float64).cpu()
    out = []
    for b in range(x.shape[0]):
        e2 = Fraction(float(eps_t[b])) ** 2
        c = x64[b].flatten()
        d = xp64[b].flatten() - c
        for shrink in (1.0, 1 - 1e-12, 1 - 1e-9, 1 - 1e-6) + tuple(0.5 ** k for k in range(1, 60)):
            p = c + d * shrink
            s = sum((Fraction(float(pi)) - Fraction(float(ci))) ** 2 for pi, ci in zip(p.tolist(), c.tolist()))
            if s <= e2:
                break
        else:
            p = c.clone()
        out.append(p.reshape(x.shape[1:]))
    return torch.stack(out)
