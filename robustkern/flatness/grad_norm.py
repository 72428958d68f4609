"""Per-example norms of the input gradient of the cross-entropy, differentiable with respect to the parameters.

For a classifier ``f`` and an example ``(x_i, y_i)`` let ``ell_i(x) = CE(f(x), y_i)`` and ``g_i = grad_x ell_i``
at ``x_i``. ``input_grad_norm`` returns ``||g_i||_p`` (p = 1 or 2) per example, as a tensor that carries autograd
history to the parameters, so ``penalty.mean().backward()`` trains on it. Two methods:

* ``"double_backprop"`` (Drucker & LeCun 1991/1992; Ross & Doshi-Velez, AAAI 2018): ``g`` is computed with its
  own graph (``create_graph=True``), and the norm is differentiated through it: exact.
* ``"finite_difference"`` (Finlay & Oberman 2019, "Scaleable input gradient regularization for adversarial
  robustness"): with ``v_i = d||g||_p / dg`` at ``g_i`` (``sign(g_i)`` for p = 1, ``g_i / ||g_i||_2`` for
  p = 2) detached, and ``u_i = v_i / ||v_i||_2`` a unit direction,

      ||g_i||_p = <g_i, v_i> = ||v_i||_2 * d/dh ell_i(x_i + h u_i) |_{h=0}
                ~ ||v_i||_2 * (ell_i(x_i + h u_i) - ell_i(x_i - h u_i)) / (2 h)      (scheme "central")
                ~ ||v_i||_2 * (ell_i(x_i + h u_i) - ell_i(x_i)) / h                  (scheme "forward")

  ``g`` comes from one forward at ``x`` and an input-only backward without a graph; the forward at ``x`` is
  shared with the caller's clean loss (``return_logits``), the shifted inputs add one forward (of 2B examples
  for the central scheme, B for the forward one), and the parameter gradient needs first-order backprop only.
  Finlay & Oberman take the forward difference (error O(h)); the central one (the default) costs B more
  examples in one forward and its error is O(h^2). On trained digits models (MLP and CNN, float32, 128 test
  images, ``h`` = 1e-3 = ``DEFAULT_H``, the Euclidean step length) the central difference was within 2.1% of
  double backprop for every example (median 4e-5 .. 3e-3 depending on the training run), the forward one
  within 3.8% (median 3e-3 .. 8e-3); at h = 1e-2 the forward difference was off by a median 3-6%. The
  examples that stay off are those whose segment crosses a ReLU kink; shifted forwards leave BatchNorm running
  statistics alone.

  The *parameter gradient* of the estimate is another matter in ReLU networks: ``grad_theta ell`` jumps where a
  unit flips, so an example whose segment ``[x - h u, x + h u]`` crosses a kink contributes a term of size
  O(jump / h) that exact double backprop does not have (measured on a trained digits MLP, batch 128,
  h = 1e-3: two crossing examples put the parameter gradient of the mean penalty 14 times its norm away from
  the exact one; on another training run with no crossing, 1e-4 away). Averaged over the data it is the
  gradient of a smoothed penalty: a different regulariser from the exact one (as F-GR is for the weights), not
  an approximation of its gradient. On smooth networks (tanh) it converges to the exact gradient as O(h^2).

  The difference of the two losses is formed without cancellation: with ``d = f(x + h u) - f(x - h u)``
  (logits) and ``p = softmax f(x - h u)``, ``ell(x + h u) - ell(x - h u) = log1p(sum_{k != y} p_k
  expm1(d_k - d_y))``, exact in real arithmetic, so confident examples (``ell ~ 1e-6``) keep their relative
  accuracy in float32 (where even double backprop loses it: ``1 - p_y`` rounds).

``_input_gradient`` is the one place that computes ``(logits, g)``: through ``robustkern.flatness.fused`` (a
hand-built input-gradient pass whose double backward runs through robustkern ops) when that module imports and
supports the model in its current mode, else through ``torch.autograd.grad``. ``backend`` chooses: ``"auto"``
(fused when supported), ``"torch"``, ``"fused"`` (raises when unsupported).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["input_grad_norm", "frozen_bn_stats", "DEFAULT_H", "BACKENDS", "METHODS", "NORMS", "SCHEMES"]

BACKENDS = ("auto", "torch", "fused")
METHODS = ("double_backprop", "finite_difference")
SCHEMES = ("forward", "central")
NORMS = (1, 2)
DEFAULT_H = 1e-3


# ----------------------------------------------------------------------------------------------- checks
def _check_inputs(fn: str, model, x, y) -> Tensor:
    """Raise TypeError/ValueError naming the argument; returns the labels as int64."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.dim() < 2:
        what = (x.dtype, tuple(x.shape)) if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{fn}: x must be a floating-point tensor of shape (B, ...), got {what}")
    if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32) or y.shape != (x.shape[0],):
        what = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{fn}: y must be an integer tensor of shape ({x.shape[0]},), got {what}")
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{fn}: x contains NaN or infinite values")
    return y.long()


def _check_labels(fn: str, logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 2:
        raise ValueError(f"{fn}: the model must output logits of shape (B, classes), got {tuple(logits.shape)}")
    c = logits.shape[1]
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= c):
        raise ValueError(f"{fn}: labels must lie in [0, {c - 1}] (the model has {c} outputs), got values in "
                         f"[{int(y.min())}, {int(y.max())}]")


def _check_choice(fn: str, name: str, value, allowed) -> None:
    if value not in allowed or isinstance(value, bool):
        raise ValueError(f"{fn}: {name} must be one of {allowed}, got {value!r}")


def _check_positive(fn: str, name: str, value, strict: bool = True) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}") from None
    if not (v > 0 if strict else v >= 0) or v != v or v == float("inf"):
        raise ValueError(f"{fn}: {name} must be {'> 0' if strict else '>= 0'} and finite, got {value}")
    return v


# ----------------------------------------------------------------------------------------------- gradients
@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module, active: bool = True):
    """While active, train-mode BatchNorm forwards leave ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` alone (they still normalise with the batch statistics; eval-mode ones still use the
    running statistics). Done by clearing ``track_running_stats`` for the duration, which is exactly how
    ``_BatchNorm.forward`` decides whether to update, so nothing is written in place into a tensor that an
    autograd graph has saved."""
    changed = []
    if active:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                m.track_running_stats = False
                changed.append(m)
    try:
        yield
    finally:
        for m in changed:
            m.track_running_stats = True


def _fused_module():
    """``robustkern.flatness.fused`` or None when it cannot be imported (built by a separate part)."""
    try:
        from . import fused
    except ImportError:
        return None
    return fused


def _use_fused(model: nn.Module, backend: str, auto_on_cpu: bool = True) -> bool:
    """Whether ``backend`` sends ``model`` (in its current train/eval mode) through the fused path.
    ``auto_on_cpu=False`` (the double-backprop penalty): on the CPU ``"auto"`` takes PyTorch's double backprop.
    The fused CPU step (``robustkern.flatness.fused_step``) runs the same oneDNN products as PyTorch's and is at
    parity with it (1.02-1.10x with glibc keeping freed memory, 0.88-1.15x under its default thresholds,
    benchmarks/bench_flatness_fused.py): ask for it with ``backend="fused"``."""
    if backend == "torch" or (backend == "auto" and not auto_on_cpu and not _on_gpu(model)):
        return False
    fused = _fused_module()
    if backend == "fused":
        if fused is None:
            raise RuntimeError("backend='fused' requested but robustkern.flatness.fused is not available")
        reason = fused.unsupported_reason(model) if hasattr(fused, "unsupported_reason") else (
            None if fused.supports(model) else "unsupported model")
        if reason is not None:
            raise _fused_error(reason)
        return True
    return fused is not None and fused.supports(model)


def _on_gpu(model: nn.Module) -> bool:
    p = next(model.parameters(), None)
    return p is not None and p.device.type != "cpu"


def _fused_error(reason: str) -> Exception:
    from ..graph import UnsupportedLayerError

    return UnsupportedLayerError(f"robustkern.flatness (backend='fused'): {reason}")


def _input_gradient(model: nn.Module, x: Tensor, y: Tensor, create_graph: bool, backend: str = "auto"):
    """``(logits, g)``: ``logits = model(x)``, ``g = d(sum_i CE(logits_i, y_i)) / dx`` (per-example input
    gradients). With ``create_graph`` both carry autograd history (to the parameters, and to ``x`` when ``x``
    requires grad); without it ``g`` and ``logits`` are detached and no parameter gradient is accumulated."""
    if _use_fused(model, backend, auto_on_cpu=not create_graph):
        from . import fused

        return fused.input_gradient(model, x, y, create_graph=create_graph)
    with torch.enable_grad():
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        logits = model(xg)
        _check_labels("input_gradient", logits, y)
        g, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg, create_graph=create_graph)
    return (logits, g) if create_graph else (logits.detach(), g)


def _norm(g: Tensor, p: int) -> Tensor:
    """Per-example ``||g_i||_p`` over all non-batch dimensions."""
    return torch.linalg.vector_norm(g.reshape(g.shape[0], -1), ord=p, dim=1)


def _dual_direction(g: Tensor, p: int) -> Tensor:
    """``v = d||g||_p / dg`` per example (0 where ``g_i = 0``): ``sign(g)`` for p = 1, ``g / ||g||_2`` for p = 2;
    ``<g, v> = ||g||_p``."""
    if p == 1:
        return torch.sign(g)
    n = _norm(g, 2).reshape((-1,) + (1,) * (g.dim() - 1))
    return torch.where(n > 0, g / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(g))


def _ce_difference(logits_a: Tensor, logits_b: Tensor, y: Tensor) -> Tensor:
    """``CE(logits_b, y) - CE(logits_a, y)`` per example, without cancellation:
    ``log1p(sum_{k != y} p_k expm1(d_k - d_y))``, ``p = softmax(logits_a)``, ``d = logits_b - logits_a``."""
    d = logits_b - logits_a
    rel = d - d.gather(1, y[:, None])
    p = F.softmax(logits_a, dim=1)
    s = (p * torch.expm1(rel)).sum(1)   # the k = y term is p_y * expm1(0) = 0
    return torch.log1p(s)


def _finite_difference_norm(model, x, y, p, h, scheme):
    """Finlay & Oberman's estimate of ``||g_i||_p`` (module docstring) and the clean logits ``f(x)`` (the forward
    the gradient ``g`` and the forward difference share); differentiable w.r.t. the parameters (the direction is
    detached). The shifted forwards leave BatchNorm running statistics alone."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        logits = model(xg)
        _check_labels("input_grad_norm", logits, y)
        g, = torch.autograd.grad(F.cross_entropy(logits, y, reduction="sum"), xg, retain_graph=True)
    v = _dual_direction(g, p)
    v_len = _norm(v, 2)
    u = v / torch.where(v_len > 0, v_len, torch.ones_like(v_len)).reshape((-1,) + (1,) * (x.dim() - 1))
    x = x.detach()
    with frozen_bn_stats(model):
        if scheme == "forward":
            return v_len * _ce_difference(logits, model(x + h * u), y) / h, logits
        both = model(torch.cat([x - h * u, x + h * u]))
    b = x.shape[0]
    return v_len * _ce_difference(both[:b], both[b:], y) / (2.0 * h), logits


def input_grad_norm(model: nn.Module, x: Tensor, y: Tensor, p: int = 2, method: str = "double_backprop",
                    h: float | None = None, backend: str = "auto", return_logits: bool = False,
                    scheme: str = "central"):
    """Per-example ``||grad_x CE(f(x_i), y_i)||_p`` (shape ``(B,)``), differentiable w.r.t. the parameters
    (module docstring). ``p``: 1 or 2. ``method``: ``"double_backprop"`` (exact) or ``"finite_difference"``
    (step length ``h``, default ``DEFAULT_H`` = 1e-3; ``scheme="central"`` (default) or ``"forward"``, Finlay &
    Oberman's, one forward fewer and O(h) error). ``backend``: ``"auto"``, ``"torch"`` or ``"fused"`` (the
    input-gradient pass of double backprop; see the module docstring; the finite difference is first order and
    always plain autograd). The model runs in its current mode; no parameter ``.grad`` is touched.
    ``return_logits=True`` returns ``(norms, logits)`` with ``logits = model(x)`` carrying its graph, so that the
    clean loss can reuse the forward that both methods run at ``x``."""
    fn = "input_grad_norm"
    y = _check_inputs(fn, model, x, y)
    _check_choice(fn, "p", p, NORMS)
    _check_choice(fn, "method", method, METHODS)
    _check_choice(fn, "backend", backend, BACKENDS)
    if method == "finite_difference":
        h = DEFAULT_H if h is None else _check_positive(fn, "h", h)
        _check_choice(fn, "scheme", scheme, SCHEMES)
        norms, logits = _finite_difference_norm(model, x, y, p, h, scheme)
        return (norms, logits) if return_logits else norms
    if h is not None:
        raise ValueError(f"{fn}: h is the finite-difference step; it has no meaning for method='double_backprop'")
    logits, g = _input_gradient(model, x.detach(), y, create_graph=True, backend=backend)
    return (_norm(g, p), logits) if return_logits else _norm(g, p)
