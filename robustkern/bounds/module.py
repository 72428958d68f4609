"""``BoundedModule``: a model wrapped for bound propagation."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from .graph import BoundNode, capture
from .ibp import Box, plan_fusion, propagate
from .._backend import ieee_fp32

__all__ = ["BoundedModule"]

_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "ibp+backward": "CROWN-IBP", "ibp+crown": "CROWN-IBP",
            "crown": "CROWN", "backward": "CROWN"}
_PLANNED = {"alpha-crown", "crown-optimized"}
_AVAILABLE = "IBP, CROWN-IBP (aliases IBP+backward, ibp+crown), CROWN (alias backward)"


def canonical_method(method) -> str:
    """"IBP", "CROWN-IBP" or "CROWN" for a method name or alias (case-insensitive)."""
    key = str(method).strip().lower()
    if key in _PLANNED:
        raise NotImplementedError(f"compute_bounds: method {method!r} is not available yet; available: {_AVAILABLE}")
    if key not in _METHODS:
        raise ValueError(f"compute_bounds: unknown method {method!r}; available: {_AVAILABLE}")
    return _METHODS[key]


def _nan_to_inf(t: Tensor, sign: int) -> Tensor:
    return torch.where(torch.isnan(t), torch.full_like(t, sign * math.inf), t)


class NodeBounds:
    """Bounds of one node after ``compute_bounds`` (``lower``/``upper`` computed on first access)."""

    def __init__(self, node: BoundNode, value, sound: bool = True):
        self.node = node
        self._value = value
        self._sound = sound

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def path(self) -> str:
        return self.node.path

    @property
    def kind(self) -> str:
        return self.node.kind

    def box(self) -> Box:
        if callable(self._value):
            self._value = self._value()
        return self._value

    @property
    def lower(self) -> Tensor:
        return self.box().end_points(self._sound)[0]

    @property
    def upper(self) -> Tensor:
        return self.box().end_points(self._sound)[1]

    def __repr__(self) -> str:
        return f"NodeBounds({self.name!r}, kind={self.kind}, path={self.path!r})"


class BoundedModule(nn.Module):
    """Wrap ``model`` for bound propagation (``torch.fx`` capture; see ``robustkern.bounds.graph`` for the
    supported layers). It shares the model's parameters: ``bm(x)`` is the model's forward, and gradients of
    bound-based losses flow to the model's parameters.

    ``example_input`` is one batch (any batch size) of the shape the model takes; it fixes the per-example
    input shape and the number of outputs.

    BatchNorm: in eval mode bounds use the running statistics. In training mode they use the statistics of the
    clean batch, as auto_LiRPA does: ``bm(x)`` records them; ``compute_bounds(x, ...)`` reuses them when called
    with the same tensor ``x``, and otherwise runs the clean forward itself (without updating running
    statistics a second time).
    """

    def __init__(self, model: nn.Module, example_input: Tensor, *, fuse: bool = True):
        super().__init__()
        if not isinstance(example_input, Tensor) or example_input.dim() < 2:
            raise ValueError("BoundedModule: example_input must be a batch tensor of shape (B, ...)")
        self.model = model
        self.nodes = capture(model)
        self.groups = plan_fusion(self.nodes) if fuse else {}
        self.input_shape = tuple(example_input.shape[1:])
        with torch.no_grad():
            was = [(m, m.training) for m in model.modules()]
            model.eval()
            try:
                out = model(example_input[:1])
            finally:
                for m, t in was:
                    m.train(t)
        if out.dim() != 2:
            raise ValueError(f"BoundedModule: the model must return (B, n_out) outputs, got shape {tuple(out.shape)}")
        self.num_outputs = out.shape[1]
        self._bn = {n.name: n.module for n in self.nodes if n.kind == "batchnorm"}
        self._bn_stats: dict = {}
        self._stats_input: Tensor | None = None
        self._recording = False
        self._node_bounds: dict[str, NodeBounds] = {}
        self._shapes: dict | None = None
        for name, m in self._bn.items():
            m.register_forward_pre_hook(self._make_stat_hook(name))

    # ------------------------------------------------------------------ clean forward and BN statistics
    def _make_stat_hook(self, name: str):
        def hook(module, args):
            if self._recording and module.training:
                (t,) = args
                dims = [0] + list(range(2, t.dim()))
                self._bn_stats[name] = (t.mean(dims), t.var(dims, unbiased=False))
        return hook

    def forward(self, x: Tensor) -> Tensor:
        record = any(m.training for m in self._bn.values())
        self._recording = record
        try:
            out = self.model(x)
        finally:
            self._recording = False
        if record:
            self._stats_input = x
        return out

    def _training_bn_stats(self, x: Tensor) -> dict:
        if not any(m.training for m in self._bn.values()):
            return {}
        if self._stats_input is not x:
            saved = [(m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
                     for m in self._bn.values() if m.running_mean is not None]
            try:
                self.forward(x)
            finally:
                with torch.no_grad():
                    for m, rm, rv, nb in saved:
                        m.running_mean.copy_(rm)
                        m.running_var.copy_(rv)
                        m.num_batches_tracked.copy_(nb)
        return self._bn_stats

    # ------------------------------------------------------------------ bounds
    def compute_bounds(self, x: Tensor, eps, norm: float = math.inf, method: str = "IBP", C: Tensor | None = None,
                       x_min: float = 0.0, x_max: float = 1.0, *, sound: bool = True, bound_lower: bool = True,
                       bound_upper: bool = True, relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                       check_values: bool = True):
        """Bounds ``(lb, ub)`` on the model's outputs (B, n_out), or on ``C`` times them (B, n_spec) when a
        specification ``C`` (B, n_spec, n_out) is given, over every input ``x'`` with ``||x' - x|| <= eps``
        (``norm`` inf or 2) and ``x_min <= x' <= x_max``.

        ``eps``: a float or a (B,) tensor (per example), in the units of ``x``. ``method`` (case-insensitive):
        "IBP" (interval bound propagation, Gowal et al. 2018); "CROWN-IBP" (aliases "IBP+backward",
        "ibp+crown": IBP for the ReLU input bounds, one backward linear relaxation from ``C``; Zhang et al.
        2020); "CROWN" (alias "backward": backward relaxations for the ReLU input bounds too, intersected with
        IBP, ``crown_batch_size`` identity rows at a time; Zhang et al. 2018). ``relu_lower``: the ReLU lower
        slope of the linear relaxation, "adaptive" (default), "zero", "one" or "same-slope".
        ``sound=True`` widens every step by a bound on its floating-point rounding error, so that the bounds
        hold for the real-valued network, not only up to rounding (see ``robustkern.reference.interval``;
        CROWN methods: see ``robustkern.bounds.crown`` for what is guaranteed); for final verification also
        consider float64 (``model.double()``). A side not requested (``bound_lower``/``bound_upper``) is
        returned as None (and, for the CROWN methods, not computed). NaN in a bound (from NaN or inf weights)
        is returned as -inf/+inf. ``check_values=False`` skips the checks that read tensor values (NaN in
        ``x``/``eps``/``C``, ``x`` inside [x_min, x_max], ``eps >= 0`` for tensor eps): each is a host-device
        sync, which a GPU training loop may not want once its inputs are known to be valid. Shapes, dtypes and
        a negative float ``eps`` are always checked.
        """
        method = canonical_method(method)
        x, eps, norm = self._check_inputs(x, eps, norm, x_min, x_max, check_values)
        out = self._bounds(x, eps, norm, method, C, float(x_min), float(x_max), sound, bound_lower, bound_upper,
                           relu_lower, crown_batch_size, check_values=check_values)
        return out[0], out[1]

    def compute_bounds_box(self, lower: Tensor, upper: Tensor, method: str = "IBP", C: Tensor | None = None, *,
                           sound: bool = True, bound_lower: bool = True, bound_upper: bool = True,
                           relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                           x: Tensor | None = None):
        """As ``compute_bounds`` over the element-wise box ``lower <= x' <= upper`` (B, ...) given explicitly
        (e.g. auto_LiRPA's ``x_L``/``x_U``). ``x``: the clean batch, used only for training-mode BatchNorm
        statistics (default: the box centre)."""
        method = canonical_method(method)
        for name, t in (("lower", lower), ("upper", upper)):
            if not isinstance(t, Tensor):
                raise TypeError(f"compute_bounds_box: {name} must be a tensor")
        if lower.shape != upper.shape:
            raise ValueError(f"compute_bounds_box: lower and upper must have the same shape, got "
                             f"{tuple(lower.shape)} and {tuple(upper.shape)}")
        dtype = self._dtype()
        lower, upper = lower.to(dtype), upper.to(dtype)
        if bool(torch.isnan(lower).any() or torch.isnan(upper).any()):
            raise ValueError("compute_bounds_box: the box contains NaN")
        if bool((lower > upper).any()):
            raise ValueError("compute_bounds_box: lower must be <= upper element-wise")
        mid = (lower + upper) * 0.5
        x = mid if x is None else x.to(dtype)
        self._check_inputs(mid, 0.0, math.inf, -math.inf, math.inf)
        rad = (upper - lower) * 0.5
        if sound:  # the centre and radius round; widen so that [mid - rad, mid + rad] contains [lower, upper]
            from ..reference.interval import unit_roundoff
            rad = rad + 4 * unit_roundoff(dtype) * (mid.abs() + rad) + torch.finfo(dtype).tiny
        eps = torch.zeros(mid.shape[0], dtype=dtype, device=mid.device)
        out = self._bounds(x, eps, math.inf, method, C, -math.inf, math.inf, sound, bound_lower, bound_upper,
                           relu_lower, crown_batch_size, input_box=(mid, rad))
        return out[0], out[1]

    def _bounds(self, x, *args, **kwargs):
        """(lb, ub[, ibp_lb, ibp_ub]) after the checks: the engine behind compute_bounds(_box). On CUDA every
        product inside it (the ops' GEMMs and the engine's own matmul/bmm/conv_transpose2d) runs in IEEE fp32:
        TF32 would break the rounding-error bounds (``robustkern._backend.ieee_fp32``)."""
        if x.is_cuda:
            with ieee_fp32():
                return self._bounds_engine(x, *args, **kwargs)
        return self._bounds_engine(x, *args, **kwargs)

    def _bounds_engine(self, x, eps, norm, method, C, x_min, x_max, sound, bound_lower, bound_upper,
                       relu_lower="adaptive", crown_batch_size=None, input_box=None, with_ibp: bool = False,
                       check_values: bool = True):
        if C is not None:
            C = self._check_spec(C, x, check_values)
        stats = self._training_bn_stats(x)
        box, bounds = propagate(self.nodes, self.groups, x, eps, norm, x_min, x_max, C, sound, stats,
                                input_box=input_box)
        by_name = {n.name: n for n in self.nodes}
        self._node_bounds = {name: NodeBounds(by_name[name], v, sound) for name, v in bounds.items()}
        lower, upper = Box(box.mid.flatten(1), box.rad.flatten(1)).end_points(sound)
        ibp = (_nan_to_inf(lower, -1) if bound_lower else None, _nan_to_inf(upper, 1) if bound_upper else None)
        if method == "IBP":
            return ibp + (ibp if with_ibp else ())
        from .crown import crown_bounds, node_shapes
        if self._shapes is None:
            self._shapes = node_shapes(self.nodes, self.model, x.new_zeros((1,) + self.input_shape))
        lb, ub = crown_bounds(self.nodes, self._shapes, bounds, C, self.num_outputs, method,
                              bound_lower=bound_lower, bound_upper=bound_upper, sound=sound, bn_stats=stats,
                              norm=norm, x=x, eps=eps, relu_lower=relu_lower, crown_batch_size=crown_batch_size)
        out = (_nan_to_inf(lb, -1) if lb is not None else None, _nan_to_inf(ub, 1) if ub is not None else None)
        return out + (ibp if with_ibp else ())

    def _dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.float32

    def _check_inputs(self, x: Tensor, eps, norm, x_min: float, x_max: float, check_values: bool = True):
        if not isinstance(x, Tensor):
            raise TypeError("compute_bounds: x must be a tensor")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"compute_bounds: x must have shape (B, {', '.join(map(str, self.input_shape))}) like "
                             f"the example input, got {tuple(x.shape)}")
        dtype = self._dtype()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"compute_bounds: bounds are computed in float32 or float64; the model is {dtype}")
        if not x.is_floating_point():
            raise TypeError(f"compute_bounds: x must be floating point, got {x.dtype}")
        x = x.to(dtype)
        if not x_min <= x_max:
            raise ValueError(f"compute_bounds: x_min ({x_min}) must be <= x_max ({x_max})")
        if isinstance(eps, (int, float)) and not eps >= 0:
            raise ValueError(f"compute_bounds: eps must be >= 0 and not NaN, got {eps}")
        if check_values and bool(torch.isnan(x).any()):
            raise ValueError("compute_bounds: x contains NaN")
        if check_values and x.numel() and (float(x.min()) < x_min or float(x.max()) > x_max):
            raise ValueError(f"compute_bounds: x must lie in [x_min, x_max] = [{x_min}, {x_max}], got values in "
                             f"[{float(x.min())}, {float(x.max())}]")
        eps_t = torch.as_tensor(eps, dtype=dtype, device=x.device)
        if eps_t.dim() == 0:
            eps_t = eps_t.expand(x.shape[0])
        if eps_t.shape != (x.shape[0],):
            raise ValueError(f"compute_bounds: eps must be a float or a ({x.shape[0]},) tensor, got shape "
                             f"{tuple(eps_t.shape)}")
        if check_values and (bool(torch.isnan(eps_t).any()) or bool((eps_t < 0).any())):
            raise ValueError(f"compute_bounds: eps must be >= 0 and not NaN, got {eps if eps_t.numel() == 1 else eps_t}")
        norm = float(norm)
        if norm not in (math.inf, 2.0):
            raise ValueError(f"compute_bounds: norm must be inf or 2, got {norm}")
        return x, eps_t.contiguous(), norm

    def _check_spec(self, C: Tensor, x: Tensor, check_values: bool = True) -> Tensor:
        want = (x.shape[0], "n_spec", self.num_outputs)
        if not isinstance(C, Tensor) or C.dim() != 3 or C.shape[0] != x.shape[0] or C.shape[2] != self.num_outputs:
            got = tuple(C.shape) if isinstance(C, Tensor) else type(C).__name__
            raise ValueError(f"compute_bounds: C must have shape {want}, got {got}")
        if check_values and bool(torch.isnan(C).any()):
            raise ValueError("compute_bounds: C contains NaN")
        return C.to(x.dtype)

    # ------------------------------------------------------------------ per-node bounds
    def node_bounds(self) -> dict[str, NodeBounds]:
        """Bounds of every node from the last ``compute_bounds`` call, by fx node name, in graph order
        (``.lower``, ``.upper``, ``.path`` = the module's qualified name). Nodes fused into a neighbour are
        recomputed when first read. With ``C``, the final Linear's entry holds the bounds of ``C`` times it."""
        if not self._node_bounds:
            raise RuntimeError("node_bounds: call compute_bounds first")
        return dict(self._node_bounds)

    def named_bounds(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """``(module path, lower, upper)`` for every node that is a module (Linear, Conv2d, ReLU, ...)."""
        for nb in self.node_bounds().values():
            if nb.node.module is not None:
                yield nb.path, nb.lower, nb.upper
