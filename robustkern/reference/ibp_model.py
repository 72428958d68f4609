"""Hand-written interval bound propagation (IBP) over a whole ``nn.Sequential``: the eager baseline of
``benchmarks/bench_ibp.py`` and the test suite's independent reference for whole models.

It is written the way users write IBP (Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation
for Training Verifiably Robust Models", Eq. 6): one box ``(mid, rad)`` per layer, ``|W|`` recomputed on every
call, a specification matrix ``C`` folded into the last Linear layer. It deliberately shares no code with
``robustkern.ops`` or ``robustkern.bounds``, and it does no rounding-error widening: its bounds are the exact
real-number IBP bounds up to round-to-nearest, so a sound robustkern bound may be looser by a relative O(K u).
Everything works in float64 when the model and the box are float64.

Affine layers map a box as ``mid' = W mid + b``, ``rad' = |W| rad``; ReLU maps it through its end points.

BatchNorm. When it normalises with running statistics (eval mode) BatchNorm is the per-channel affine map
they define. When it normalises with batch statistics (training mode, or no running statistics) the map
uses the statistics of the *clean* batch, the way auto_LiRPA and CROWN-IBP do: run the clean forward
through ``record_bn_stats`` first and pass its result as ``bn_stats``. The statistics keep their autograd
history, so a robust loss differentiates through them as it does in auto_LiRPA.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import Normalize

__all__ = ["naive_ibp", "record_bn_stats", "margin_spec", "robust_cross_entropy", "flatten_sequential"]

_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def flatten_sequential(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` in order, nested ``nn.Sequential`` containers expanded."""
    if isinstance(model, nn.Sequential):
        return [leaf for child in model for leaf in flatten_sequential(child)]
    return [model]


def _uses_batch_stats(bn: nn.Module) -> bool:
    return bn.training or bn.running_mean is None


def _check_supported(layers):
    for layer in layers:
        if isinstance(layer, nn.Conv2d) and layer.padding_mode != "zeros":
            raise NotImplementedError(f"naive_ibp: Conv2d with padding_mode={layer.padding_mode!r}")
        if not isinstance(layer, (nn.Linear, nn.Conv2d, nn.ReLU, nn.Flatten, nn.AvgPool2d, nn.Identity,
                                  Normalize) + _BN):
            raise NotImplementedError(f"naive_ibp: unsupported layer {type(layer).__name__}")


def record_bn_stats(model: nn.Module, x: torch.Tensor):
    """Run the clean forward of ``model`` (an ``nn.Sequential``) on ``x`` layer by layer and record, for each
    BatchNorm that normalises with batch statistics, the mean and biased variance of its input over the
    batch (and spatial) dimensions: the statistics that BatchNorm itself uses.

    Returns ``(output, stats)`` with ``stats`` a dict ``{bn_module: (mean, var)}`` to pass to ``naive_ibp``.
    The statistics are not detached. The forward also updates the running statistics, as any
    training-mode forward does. (A plain loop rather than forward hooks, so ``torch.compile`` traces it.)
    """
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for layer in flatten_sequential(model):
        if isinstance(layer, _BN) and _uses_batch_stats(layer):
            dims = [0] + list(range(2, x.dim()))
            stats[layer] = (x.mean(dims), x.var(dims, unbiased=False))
        x = layer(x)
    return x, stats


def _bn_scale_shift(bn: nn.Module, bn_stats):
    if _uses_batch_stats(bn):
        if bn_stats is None or bn not in bn_stats:
            raise ValueError("naive_ibp: a BatchNorm uses batch statistics (training mode); run the clean "
                             "batch through record_bn_stats(model, x) and pass its stats as bn_stats")
        mean, var = bn_stats[bn]
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def _channel(v: torch.Tensor, ndim: int) -> torch.Tensor:
    return v.reshape((1, -1) + (1,) * (ndim - 2))


def naive_ibp(model: nn.Module, lower: torch.Tensor, upper: torch.Tensor, C: torch.Tensor | None = None,
              bn_stats=None):
    """Interval bounds of ``model`` (an ``nn.Sequential``) on the box ``[lower, upper]``.

    ``lower, upper``: (B, ...) the input box. ``C``: optional (B, S, n_out) specification matrix; the bounds
    are then those of ``C @ model(x)``, with ``C`` folded into the last layer when it is a Linear (tighter
    than bounding ``C`` after it). ``bn_stats``: from ``record_bn_stats``, needed when a BatchNorm is in
    training mode. Supported layers: Linear, Conv2d, ReLU, BatchNorm1d/2d, Flatten, AvgPool2d, Identity,
    ``robustkern.nn.Normalize``.
    Returns ``(lb, ub)`` of shape (B, S), or (B, n_out) without ``C``.
    """
    layers = flatten_sequential(model)
    _check_supported(layers)
    mid = (upper + lower) / 2
    rad = (upper - lower) / 2
    for i, layer in enumerate(layers):
        fold_spec = C is not None and i == len(layers) - 1 and isinstance(layer, nn.Linear)
        if fold_spec:
            weight = C @ layer.weight                                          # (B, S, K)
            mid = torch.einsum("bsk,bk->bs", weight, mid)
            if layer.bias is not None:
                mid = mid + C @ layer.bias
            rad = torch.einsum("bsk,bk->bs", weight.abs(), rad)
            C = None
        elif isinstance(layer, nn.Linear):
            mid = F.linear(mid, layer.weight, layer.bias)
            rad = F.linear(rad, layer.weight.abs())
        elif isinstance(layer, nn.Conv2d):
            args = (layer.stride, layer.padding, layer.dilation, layer.groups)
            mid = F.conv2d(mid, layer.weight, layer.bias, *args)
            rad = F.conv2d(rad, layer.weight.abs(), None, *args)
        elif isinstance(layer, nn.ReLU):
            lo, hi = F.relu(mid - rad), F.relu(mid + rad)
            mid, rad = (hi + lo) / 2, (hi - lo) / 2
        elif isinstance(layer, _BN):
            scale, shift = _bn_scale_shift(layer, bn_stats)
            mid = mid * _channel(scale, mid.dim()) + _channel(shift, mid.dim())
            rad = rad * _channel(scale.abs(), rad.dim())
        elif isinstance(layer, Normalize):
            mid = layer(mid)
            rad = rad / _channel(layer.std, rad.dim())
        else:  # Flatten, AvgPool2d, Identity: linear with non-negative coefficients
            mid, rad = layer(mid), layer(rad)
    if C is not None:                                                          # last layer was not a Linear
        mid = torch.einsum("bsk,bk->bs", C, mid)
        rad = torch.einsum("bsk,bk->bs", C.abs(), rad)
    return mid - rad, mid + rad


def margin_spec(y: torch.Tensor, num_classes: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (B, num_classes - 1, num_classes) margin matrix: the rows for example b are ``e_y - e_j`` for the
    classes ``j != y_b`` in increasing order, so ``C @ logits`` are the margins ``z_y - z_j``."""
    eye = torch.eye(num_classes, device=y.device, dtype=dtype)
    others = torch.arange(num_classes, device=y.device).expand(len(y), -1)
    others = others[others != y[:, None]].reshape(len(y), num_classes - 1)
    return eye[y].unsqueeze(1) - eye[others]


def robust_cross_entropy(lb: torch.Tensor) -> torch.Tensor:
    """Robust cross-entropy from lower bounds ``lb`` (B, S) of the margins ``z_y - z_j``: the cross-entropy
    of the worst-case logits ``[0, -lb]`` with target 0 (Wong & Kolter 2018; Gowal et al. 2018)."""
    logits = torch.cat([lb.new_zeros(lb.shape[0], 1), -lb], dim=1)
    return F.cross_entropy(logits, lb.new_zeros(lb.shape[0], dtype=torch.long))
