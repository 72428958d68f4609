"""``BoundedModule``: a model wrapped for bound propagation."""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import Tensor, nn

from .._numerics import ieee_products, round_down, round_up, unit_roundoff
from .batch_stats import enclosed_statistics, point_statistics, uses_batch_stats
from ..graph import BoundNode, capture, node_shapes
from ..ops import interval_input_box
from .ibp import Box, plan_fusion, propagate
from .precision import BoundInput, Coefficients, WideWeights, check_spec, enter, spec_rounding

__all__ = ["BoundedModule"]

_METHODS = {"ibp": "IBP", "crown-ibp": "CROWN-IBP", "ibp+backward": "CROWN-IBP", "ibp+crown": "CROWN-IBP",
            "crown": "CROWN", "backward": "CROWN", "alpha-crown": "alpha-CROWN", "crown-optimized": "alpha-CROWN"}
_AVAILABLE = ("IBP, CROWN-IBP (aliases IBP+backward, ibp+crown), CROWN (alias backward), alpha-CROWN (alias "
              "CROWN-Optimized)")


def canonical_method(method) -> str:
    """"IBP", "CROWN-IBP", "CROWN" or "alpha-CROWN" for a method name or alias (case-insensitive)."""
    key = str(method).strip().lower()
    if key not in _METHODS:
        raise ValueError(f"compute_bounds: unknown method {method!r}; available: {_AVAILABLE}")
    return _METHODS[key]


def _nan_to_inf(t: Tensor, sign: int) -> Tensor:
    return torch.where(torch.isnan(t), torch.full_like(t, sign * math.inf), t)


def _zero_with_gradient(g: Tensor | None):
    """Exactly 0 where ``g`` is finite, with ``g``'s gradient (``g - g.detach()``)."""
    if g is None:
        return 0.0
    return torch.where(torch.isfinite(g), g - g.detach(), torch.zeros_like(g))


class NodeBounds:
    """Bounds of one node after ``compute_bounds`` (``lower``/``upper`` computed on first access)."""

    def __init__(self, node: BoundNode, value, sound: bool = True, dtype: torch.dtype | None = None):
        self.node = node
        self._value = value
        self._sound = sound
        self._dtype = dtype         # the model's dtype, when the box is wider (rounded outwards on reading)

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
        lo = self.box().end_points(self._sound)[0]
        return lo if self._dtype is None else round_down(lo, self._dtype)

    @property
    def upper(self) -> Tensor:
        hi = self.box().end_points(self._sound)[1]
        return hi if self._dtype is None else round_up(hi, self._dtype)

    def __repr__(self) -> str:
        return f"NodeBounds({self.name!r}, kind={self.kind}, path={self.path!r})"


class BoundedModule(nn.Module):
    """Wrap ``model`` for bound propagation (``torch.fx`` capture; see ``robustkern.graph`` for the
    supported layers). It shares the model's parameters: ``bm(x)`` is the model's forward, and gradients of
    bound-based losses flow to the model's parameters.

    ``example_input`` is one batch (any batch size) of the shape the model takes; it fixes the per-example
    input shape and the number of outputs.

    What is bounded (``sound=True``): the model in exact real arithmetic, every parameter and buffer taken as
    the number it stores, over the input set exactly as given (``x``, ``eps``, ``C`` in any float dtype are
    not rounded inwards; see ``robustkern.bounds.precision``). BatchNorm in eval mode: the running statistics.
    BatchNorm in training mode (or without running statistics): the statistics of the clean batch ``x`` of
    the same call, as auto_LiRPA does, i.e. the network whose BatchNorm layers use the exact mean and biased
    variance of their inputs over ``x`` (``robustkern.bounds.batch_stats``); they are computed in every call,
    never remembered from an earlier forward. Autocast and a lowered ``float32_matmul_precision`` / TF32 are
    switched off inside (every product runs in IEEE float32/float64).

    How (``sound=True``). Every step adds an a-priori bound of its own rounding error (Higham's ``gamma_n`` times
    the magnitudes involved) in the precision it runs in. For a float32 model the whole computation runs in
    float64 on the float64 values of the parameters and the input set, which are exact, and the bounds are
    rounded outwards to float32 once: at ``u = 2^-53`` the widening is ~1e-13 of the magnitudes, so the sound
    bounds are the exact relaxation's up to their final rounding (within ~2e-7 of the largest bound on the
    benchmark models, ``benchmarks/bench_sound.py``); the per-node bounds are rounded outwards when read. With a
    gradient to record, the bounds' value is that one and their gradient that of the same bounds computed in
    float32 without widening (the widening is not differentiated, as in the interval ops), so the backward pass
    runs in float32. The float64 copies of the parameters are kept across calls while the parameters keep their
    values (``robustkern.bounds.precision.WideWeights``; ``keep_wide_weights=False``: converted in every call).
    """

    def __init__(self, model: nn.Module, example_input: Tensor, *, fuse: bool = True, keep_wide_weights: bool = True):
        super().__init__()
        self._wide = WideWeights(keep_wide_weights)
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
                out = model(example_input[:1].to(self._dtype()))
            finally:
                for m, t in was:
                    m.train(t)
        if out.dim() != 2:
            raise ValueError(f"BoundedModule: the model must return (B, n_out) outputs, got shape {tuple(out.shape)}")
        self.num_outputs = out.shape[1]
        self._bn_nodes = [n for n in self.nodes if n.kind == "batchnorm"]
        self._node_bounds: dict[str, NodeBounds] = {}
        self._shapes: dict | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    # ------------------------------------------------------------------ entry and statistics
    def _enter(self, x: Tensor, eps, norm, x_min: float, x_max: float, C: Tensor | None = None,
               check_values: bool = True) -> BoundInput:
        """Check the arguments and bring them into the working precision (``robustkern.bounds.precision``)."""
        if not isinstance(x, Tensor):
            raise TypeError("compute_bounds: x must be a tensor")
        if tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"compute_bounds: x must have shape (B, {', '.join(map(str, self.input_shape))}) like "
                             f"the example input, got {tuple(x.shape)}")
        dtype = self._dtype()
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"compute_bounds: bounds are computed in float32 or float64; the model is {dtype}")
        inp = enter(x, eps, norm, x_min, x_max, None, dtype, check_values)
        if C is not None:
            inp.C = check_spec(C, x.shape[0], self.num_outputs, check_values)
        return inp

    def _coefficients(self, x: Tensor, sound: bool, stats: dict | None = None) -> Coefficients:
        """The BatchNorm/normalisation maps of one call: batch statistics of ``x`` enclosed exactly (sound) or
        in the working precision (``stats`` when the caller recorded them in the same call)."""
        if not any(uses_batch_stats(n.module) for n in self._bn_nodes):
            return Coefficients(None, sound, self._wide)
        if sound:
            return Coefficients(enclosed_statistics(self.nodes, x), True, self._wide)
        if stats is None:
            stats = point_statistics(self.nodes, x.to(self._dtype()))
        return Coefficients(stats, False, self._wide)

    # ------------------------------------------------------------------ bounds
    def compute_bounds(self, x: Tensor, eps, norm: float = math.inf, method: str = "IBP", C: Tensor | None = None,
                       x_min: float = 0.0, x_max: float = 1.0, *, sound: bool = True, bound_lower: bool = True,
                       bound_upper: bool = True, relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                       check_values: bool = True, intermediate: dict | None = None,
                       optimize_bound_args: dict | None = None, return_linear: bool = False):
        """Bounds ``(lb, ub)`` on the model's outputs (B, n_out), or on ``C`` times them (B, n_spec) when a
        specification ``C`` (B, n_spec, n_out) is given, over every input ``x'`` with ``||x' - x|| <= eps``
        (``norm`` inf or 2) and ``x_min <= x' <= x_max``.

        ``eps``: a float or a (B,) tensor (per example), in the units of ``x``. ``method`` (case-insensitive):
        "IBP" (interval bound propagation, Gowal et al. 2018); "CROWN-IBP" (aliases "IBP+backward",
        "ibp+crown": IBP for the ReLU input bounds, one backward linear relaxation from ``C``; Zhang et al.
        2020); "CROWN" (alias "backward": backward relaxations for the ReLU input bounds too, of the neurons
        that IBP leaves unstable, intersected with IBP, on patches for passes from convolutions
        (``robustkern.bounds.patches``), ``crown_batch_size`` identity rows at a time, by default as many as
        keep a pass's coefficient matrices within about 1 GiB, ``robustkern.bounds.crown.rows_per_pass``; to
        verify rather than train, call it under ``torch.no_grad()``, else every pass's autograd graph is kept; Zhang et al. 2018); "alpha-CROWN" (alias
        "CROWN-Optimized": CROWN with its ReLU lower slopes optimised on the bound per neuron and specification
        row, never looser than CROWN; Xu et al. 2021; ``optimize_bound_args`` as auto_LiRPA's, see
        ``robustkern.bounds.alpha_crown``). ``relu_lower``: the ReLU lower slope of the linear relaxation,
        "adaptive" (default), "zero", "one" or "same-slope" (for alpha-CROWN: the slopes it starts from).
        ``sound=True`` makes the bounds hold for the real-valued network (see the class docstring): every
        step is widened by a bound on its floating-point rounding error (``robustkern.reference.interval``,
        ``robustkern.bounds.crown``), for float32 models in float64, rounded outwards once. ``sound=False``
        computes in the working precision without guarantees (training). A side not requested
        (``bound_lower``/``bound_upper``) is returned as None (and, for the CROWN methods, not computed). NaN in a
        bound (from NaN or inf weights) is returned as -inf/+inf.
        ``check_values=False`` skips the checks that read tensor values (NaN in ``x``/``eps``/``C``, ``x``
        inside [x_min, x_max], ``eps >= 0`` for tensor eps): each is a host-device sync, which a GPU training
        loop may not want once its inputs are known to be valid. Shapes, dtypes and a negative float ``eps``
        are always checked. ``intermediate``: the ``node_bounds()`` of an earlier call over the same input,
        weights and ``sound``: CROWN-IBP's backward pass runs over those IBP boxes instead of a new IBP pass (the
        same numbers; auto_LiRPA's reuse of stored intermediate bounds). CROWN-IBP only.
        ``return_linear`` (CROWN-IBP, CROWN, alpha-CROWN): also return the final backward pass's linear bounds in
        the input (for alpha-CROWN, per specification row, those of the pass whose bound is returned),
        ``{"lower": (A, bias), "upper": (A, bias)}`` (None for a side not requested), ``A`` (B, n_spec, *input
        shape) and ``bias`` (B, n_spec) such that ``A x' + bias`` is below (above) ``C f(x')`` for every ``x'`` in
        the input set (auto_LiRPA's ``return_A``): ``lb`` is its minimum over the set; with ``sound=True``, up to
        the rounding-error widening.
        """
        method = canonical_method(method)
        inp = self._enter(x, eps, norm, x_min, x_max, C, check_values)
        linear = self._linear_request(method, return_linear)
        out = self._bounds(inp, method, sound, bound_lower, bound_upper, relu_lower, crown_batch_size,
                           intermediate=intermediate, optimize_bound_args=optimize_bound_args, linear=linear)
        return (out[0], out[1]) + ((_linear_sides(linear, self._dtype()),) if return_linear else ())

    def compute_bounds_box(self, lower: Tensor, upper: Tensor, method: str = "IBP", C: Tensor | None = None, *,
                           sound: bool = True, bound_lower: bool = True, bound_upper: bool = True,
                           relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                           x: Tensor | None = None, check_values: bool = True, intermediate: dict | None = None,
                           optimize_bound_args: dict | None = None, return_linear: bool = False):
        """As ``compute_bounds`` over the element-wise box ``lower <= x' <= upper`` (B, ...) given explicitly
        (e.g. auto_LiRPA's ``x_L``/``x_U``; rounded outwards to the working precision). ``x``: the clean batch,
        used only for batch-statistics BatchNorm (default: the box centre). ``check_values=False`` skips the
        checks that read tensor values (NaN, ``lower <= upper``), as in ``compute_bounds``; ``intermediate``,
        ``optimize_bound_args`` and ``return_linear`` as there."""
        method = canonical_method(method)
        linear = self._linear_request(method, return_linear)
        for name, t in (("lower", lower), ("upper", upper)):
            if not isinstance(t, Tensor) or not t.is_floating_point():
                raise TypeError(f"compute_bounds_box: {name} must be a floating-point tensor")
        if lower.shape != upper.shape:
            raise ValueError(f"compute_bounds_box: lower and upper must have the same shape, got "
                             f"{tuple(lower.shape)} and {tuple(upper.shape)}")
        if check_values and bool(torch.isnan(lower).any() or torch.isnan(upper).any()):
            raise ValueError("compute_bounds_box: the box contains NaN")
        if check_values and bool((lower > upper).any()):
            raise ValueError("compute_bounds_box: lower must be <= upper element-wise")
        dtype = self._dtype()
        lower, upper = round_down(lower, dtype), round_up(upper, dtype)
        mid = (lower + upper) * 0.5
        inp = self._enter(mid if x is None else x, 0.0, math.inf, -math.inf, math.inf, C, check_values)
        rad = (upper - lower) * 0.5
        if sound:  # the centre and radius round; widen so that [mid - rad, mid + rad] contains [lower, upper]
            rad = rad + 4 * unit_roundoff(dtype) * (mid.abs() + rad) + torch.finfo(dtype).tiny
        out = self._bounds(inp, method, sound, bound_lower, bound_upper, relu_lower, crown_batch_size,
                           input_box=(mid, rad), intermediate=intermediate, optimize_bound_args=optimize_bound_args,
                           linear=linear)
        return (out[0], out[1]) + ((_linear_sides(linear, self._dtype()),) if return_linear else ())

    @staticmethod
    def _linear_request(method: str, return_linear: bool) -> dict | None:
        if not return_linear:
            return None
        if method not in ("CROWN-IBP", "CROWN", "alpha-CROWN"):
            raise ValueError(f"compute_bounds: return_linear takes method 'CROWN-IBP', 'CROWN' or 'alpha-CROWN' (a "
                             f"backward pass gives the linear bounds), got {method!r}")
        return {}

    def _bounds(self, inp: BoundInput, method: str, sound: bool, bound_lower: bool = True, bound_upper: bool = True,
                relu_lower: str = "adaptive", crown_batch_size: int | None = None, *, input_box=None,
                with_ibp: bool = False, stats: dict | None = None, intermediate: dict | None = None,
                optimize_bound_args: dict | None = None, slopes: dict | None = None, frozen: int | None = None,
                linear: dict | None = None):
        """(lb, ub[, ibp_lb, ibp_ub]) for an entered input: the engine behind compute_bounds(_box). Every
        product inside runs in IEEE float32/float64 with autocast off (``robustkern._numerics.ieee_products``):
        TF32 or bf16 would break the rounding-error bounds. ``slopes`` and ``frozen`` (CROWN-IBP and CROWN):
        explicit ReLU lower slopes of the final backward pass and the back-substitution through the last layers
        only (``robustkern.bounds.crown.crown_bounds``)."""
        if intermediate is not None and (method != "CROWN-IBP" or with_ibp):
            raise ValueError(f"compute_bounds: intermediate (an earlier call's IBP boxes) takes method 'CROWN-IBP', "
                             f"got {method!r}")
        if optimize_bound_args is not None and method != "alpha-CROWN":
            raise ValueError(f"compute_bounds: optimize_bound_args takes method 'alpha-CROWN', got {method!r}")
        extra = dict(slopes=slopes, frozen=frozen, optimize_bound_args=optimize_bound_args, linear=linear)
        args = (method, sound, bound_lower, bound_upper, relu_lower, crown_batch_size, input_box, with_ibp, stats,
                intermediate, extra)
        with ieee_products():
            if not (sound and inp.dtype == torch.float32):
                return self._bounds_engine(inp, *args)
            if not self._records_gradient(inp, input_box):
                return self._wide_engine(inp, *args)
            # the gradient of the float32 computation (the widening is not differentiated, as in the ops), the
            # value of the float64 one: value + (g - g), where g - g is exactly 0 (and its gradient g's)
            grads = self._bounds_engine(inp, method, False, *args[2:9], None, extra)   # (sound boxes are float64)
            with torch.no_grad():
                values = self._wide_engine(inp, *args)
            return tuple(None if v is None else v + _zero_with_gradient(g) for v, g in zip(values, grads))

    def _records_gradient(self, inp: BoundInput, input_box) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [inp.x, inp.eps, inp.C] + (list(input_box) if input_box is not None else [])
        return any(t is not None and t.requires_grad for t in tensors) or \
            any(p.requires_grad for p in self.model.parameters())

    def _wide_engine(self, inp: BoundInput, method, sound, bound_lower, bound_upper, relu_lower, crown_batch_size,
                     input_box, with_ibp, stats, intermediate=None, extra=None):
        """Sound bounds of a float32 model computed in float64, rounded outwards to float32 once (see the class
        docstring): the boxes, GEMMs and backward passes run on the float64 values of the parameters and the input
        set (exact), so the only widening is float64's (~1e-13 relative) and the final rounding (an ulp)."""
        f64 = torch.float64
        wide = BoundInput(inp.x, inp.xw.to(f64), inp.eps.to(f64), inp.norm, inp.x_min, inp.x_max, inp.C, f64)
        box64 = tuple(t.to(f64) for t in input_box) if input_box is not None else None
        out = self._bounds_engine(wide, method, sound, bound_lower, bound_upper, relu_lower, crown_batch_size, box64,
                                  with_ibp, stats, intermediate, extra)
        for nb in self._node_bounds.values():
            nb._dtype = inp.dtype
        return tuple(None if t is None else (round_down(t, inp.dtype) if i % 2 == 0 else round_up(t, inp.dtype))
                     for i, t in enumerate(out))

    def _bounds_engine(self, inp, method, sound, bound_lower, bound_upper, relu_lower, crown_batch_size,
                       input_box, with_ibp, stats, intermediate=None, extra=None):
        extra = extra or {}
        coeffs = self._coefficients(inp.x, sound, stats)
        Cw, C_err = spec_rounding(inp.C, inp.dtype) if inp.C is not None else (None, None)
        ibp = ()
        if intermediate is not None:  # IBP boxes of an earlier call over the same input (auto_LiRPA's reuse)
            self._check_intermediate(intermediate, inp, input_box, sound)
            bounds = {name: nb.box for name, nb in intermediate.items()}
            self._node_bounds = dict(intermediate)
        else:
            box, bounds = propagate(self.nodes, self.groups, inp.xw, inp.eps, inp.norm, inp.x_min, inp.x_max, Cw,
                                    sound, coeffs, input_box=input_box, C_err=C_err if sound else None)
            by_name = {n.name: n for n in self.nodes}
            self._node_bounds = {name: NodeBounds(by_name[name], v, sound) for name, v in bounds.items()}
            lower, upper = Box(box.mid.flatten(1), box.rad.flatten(1)).end_points(sound)
            ibp = (_nan_to_inf(lower, -1) if bound_lower else None, _nan_to_inf(upper, 1) if bound_upper else None)
        if method == "IBP":
            return ibp + (ibp if with_ibp else ())
        from .crown import crown_bounds
        common = dict(bound_lower=bound_lower, bound_upper=bound_upper, sound=sound, coeffs=coeffs, norm=inp.norm,
                      x=inp.xw, eps=inp.eps, relu_lower=relu_lower, crown_batch_size=crown_batch_size)
        C = inp.C if sound else Cw
        if method == "alpha-CROWN":
            from .alpha_crown import alpha_crown_bounds
            lb, ub = alpha_crown_bounds(self.nodes, self.node_shapes(), bounds, C, self.num_outputs,
                                        optimize_bound_args=extra.get("optimize_bound_args"),
                                        linear=extra.get("linear"), **common)
        else:
            lb, ub = crown_bounds(self.nodes, self.node_shapes(), bounds, C, self.num_outputs, method,
                                  slopes=extra.get("slopes"), frozen=extra.get("frozen"), linear=extra.get("linear"),
                                  **common)
        out = (_nan_to_inf(lb, -1) if lb is not None else None, _nan_to_inf(ub, 1) if ub is not None else None)
        return out + (ibp if with_ibp else ())

    def _check_intermediate(self, intermediate: dict, inp: BoundInput, input_box, sound: bool) -> None:
        """Boxes of an earlier call serve only the same input set, with the same ``sound``: a bound over boxes of
        a smaller set, or over unwidened boxes, would not be a bound."""
        src = self.nodes[0].name
        if src not in intermediate or not all(isinstance(v, NodeBounds) for v in intermediate.values()):
            raise ValueError("compute_bounds: intermediate must be the node_bounds() of an earlier call")
        if sound and not all(nb._sound for nb in intermediate.values()):
            raise ValueError("compute_bounds: intermediate boxes of a sound=False call cannot serve sound bounds")
        stored = intermediate[src].box()
        if input_box is None:
            mid, rad = interval_input_box(inp.xw, inp.eps, inp.x_min, inp.x_max, sound=sound)
        else:
            mid, rad = input_box
        if stored.mid.shape != mid.shape or not (torch.equal(stored.mid, mid) and torch.equal(stored.rad, rad)):
            raise ValueError("compute_bounds: intermediate boxes were computed for another input set (x, eps, "
                             "x_min/x_max); compute the bounds afresh")

    def node_shapes(self) -> dict[str, tuple]:
        """The per-example output shape of every tensor node (``robustkern.graph.node_shapes``), computed once."""
        if self._shapes is None:
            like = next(self.model.parameters(), None)
            zeros = torch.zeros((1,) + self.input_shape, dtype=self._dtype(),
                                device=like.device if like is not None else None)
            self._shapes = node_shapes(self.nodes, self.model, zeros)
        return self._shapes

    def _dtype(self) -> torch.dtype:
        p = next(iter(self.model.parameters()), None)
        return p.dtype if p is not None else torch.float32

    # ------------------------------------------------------------------ per-node bounds
    def node_bounds(self) -> dict[str, NodeBounds]:
        """Bounds of every node from the last ``compute_bounds`` call, as a dict keyed by fx node name, in
        graph order (``.lower``, ``.upper``, ``.path`` = the module's qualified name). Nodes fused into a
        neighbour are recomputed when first read. With ``C``, the final Linear's entry holds the bounds of
        ``C`` times it."""
        if not self._node_bounds:
            raise RuntimeError("node_bounds: call compute_bounds first")
        return dict(self._node_bounds)

    def named_bounds(self) -> Iterator[tuple[str, Tensor, Tensor]]:
        """A generator of ``(module path, lower, upper)`` for every node that is a module (Linear, Conv2d,
        ReLU, ...), from the last ``compute_bounds`` call."""
        for nb in self.node_bounds().values():
            if nb.node.module is not None:
                yield nb.path, nb.lower, nb.upper


def _linear_sides(linear: dict, dtype: torch.dtype) -> dict:
    """``backward_bound``'s ``{upper: (A, bias)}`` as ``{"lower": ..., "upper": ...}`` in the model's dtype
    (None: not computed)."""
    def cast(pair):
        return None if pair is None else tuple(t.to(dtype) for t in pair)
    return {"lower": cast(linear.get(False)), "upper": cast(linear.get(True))}
