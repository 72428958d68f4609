"""CROWN-IBP's ``bound_layers`` on robustkern (Zhang, Chen, Xiao, Gowal, Stanforth, Li, Boning, Hsieh, ICLR 2020,
"Towards Stable and Efficient Training of Verifiably Robust Neural Networks"; huanzhang12/CROWN-IBP
``bound_layers.py``): a training script written for it runs with one changed line::

    from robustkern.compat.crown_ibp import BoundSequential, BoundLinear, BoundConv2d, BoundDataParallel

    model = BoundSequential.convert(model, {"same-slope": False, "zero-lb": False, "one-lb": False})
    out = model(x, method_opt="forward")
    ub, ilb, relu_activity, unstable, dead, alive = model(norm=np.inf, x_U=x_U, x_L=x_L, eps=eps, C=C,
                                                          method_opt="interval_range")
    _, _, clb, bias = model(norm=np.inf, x_U=x_U, x_L=x_L, eps=eps, C=C, method_opt="backward_range")
    _, _, lb, _ = model(norm=np.inf, x_U=x_U, x_L=x_L, eps=eps, C=C, upper=False, lower=True,
                        method_opt="full_backward_range")

Return values are the original's (the transcription ``robustkern.reference.published.crown_ibp`` states them):
``interval_range`` -> ``(ub, lb, tightness, unstable, dead, alive)`` (the last four: counts over the batch of
ReLU inputs with ``l < -1e-5 < 1e-5 < u`` (twice), ``u < 0``, ``l > 0``); ``backward_range`` and
``full_backward_range`` -> ``(ub, upper_sum_b, lb, lower_sum_b)`` with ``sum_b`` the constant term of the linear
bound (biases and ReLU intercepts), a side not asked for being ``[inf]`` / ``[-inf]`` with sum ``[0]``.

How it runs. ``interval_range`` is ``robustkern.bounds.BoundedModule.compute_bounds_box`` (IBP, ``sound=False``:
the original's numbers, not widened for rounding) on a plain ``nn.Sequential`` sharing this model's
parameters; the ReLU input boxes it leaves are kept, as the original's ``BoundReLU`` keeps them, and
``backward_range`` (CROWN-IBP's backward pass) starts from them with robustkern's fused ReLU and
concretisation ops (``robustkern.ops.crown``), so IBP is not run twice per CROWN-IBP step. The lower ReLU slope
follows ``bound_opts``: ``1[u > -l]`` (default), ``same-slope``, ``zero-lb``, ``one-lb``.

What differs from the original:

* ``convert`` accepts ``nn.Flatten`` as well as a module class named ``Flatten`` (CROWN-IBP's
  ``model_defs.Flatten``), and refuses any other layer type with an error naming it; the original drops such
  layers silently (a model with BatchNorm or Dropout then computes something else).
* ``backward_range`` needs ``C`` (the original returns infinite bounds without it).
* L2 (``norm=2``) with a padded convolution first: the first layer's bound is the exact per-position dual norm,
  tighter at the image borders than the original's whole-kernel norm (equal without padding or when a Linear
  comes first).
* ``full_backward_range`` computes the same CROWN bounds (not intersected with IBP, as the original).
* ``BoundDataParallel`` splits only the clean forward over GPUs; the bound computations run on one device.
* A model's own ``Flatten`` (``x.view(x.size(0), -1)``) becomes a ``BoundFlatten``, which reshapes inputs of any
  memory layout.
* ``copy.deepcopy`` works after a bound call (the bounds kept from it are not copied).

For verified (sound) bounds use ``robustkern.bounds.BoundedModule.compute_bounds`` with ``sound=True``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..bounds import BoundedModule
from ..ops.crown import crown_concretize, crown_relu_backward

__all__ = ["BoundSequential", "BoundLinear", "BoundConv2d", "BoundReLU", "BoundFlatten", "BoundDataParallel",
           "UNSTABLE_GUARD", "check_bound_opts", "relu_lower_mode"]

UNSTABLE_GUARD = 1e-5        # the original's threshold for counting a ReLU input interval as unstable
_BOOL_OPTS = ("same-slope", "zero-lb", "one-lb")


_PLANNED_OPTS = ("ours", "binary", "uniform")     # Loss Landscape Matters' optimised / random lower slopes


def check_bound_opts(bound_opts: dict | None) -> dict:
    """``bound_opts`` as a dict; the optimised lower slopes of Loss Landscape Matters raise."""
    opts = dict(bound_opts or {})
    on = [k for k in _PLANNED_OPTS if opts.get(k, False)]
    if on:
        raise NotImplementedError(f"bound_opts {on[0]!r}: Loss Landscape Matters' optimised lower slopes are not "
                                  f"available in robustkern yet (planned); use the default, same-slope, zero-lb "
                                  f"or one-lb")
    return opts


def relu_lower_mode(bound_opts: dict | None) -> str:
    """The lower-slope mode of ``robustkern.ops.crown_relu_backward`` for CROWN-IBP's ``bound_opts``
    (the first true key of same-slope, zero-lb, one-lb, in the original's order; else adaptive)."""
    opts = check_bound_opts(bound_opts)
    for key, mode in (("same-slope", "same-slope"), ("zero-lb", "zero"), ("one-lb", "one")):
        if opts.get(key, False):
            return mode
    return "adaptive"


# ----------------------------------------------------------------------------------------------- layers
class _BoundLayer:
    """``bound_opts`` per layer, as the original keeps them; ``convert_eval`` (Loss Landscape Matters) sets
    them."""

    bound_opts: dict | None = None

    def convert_eval(self, bound_opts=None) -> None:
        self.bound_opts = check_bound_opts(bound_opts)

    def __getstate__(self):
        """Copies and pickles leave out the bounds kept from the last call."""
        state = super().__getstate__()
        for key in ("lower_l", "upper_u", "unstab"):
            state.pop(key, None)
        return state


class BoundFlatten(_BoundLayer, nn.Module):
    """Flattens all but the batch dimension (any memory layout)."""

    def __init__(self, bound_opts=None):
        super().__init__()
        self.bound_opts = bound_opts

    def forward(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], -1)


class BoundLinear(_BoundLayer, nn.Linear):
    def __init__(self, in_features, out_features, bias=True, bound_opts=None):
        super().__init__(in_features, out_features, bias)
        self.bound_opts = bound_opts

    @staticmethod
    def convert(linear_layer: nn.Linear, bound_opts=None) -> "BoundLinear":
        layer = BoundLinear(linear_layer.in_features, linear_layer.out_features, linear_layer.bias is not None,
                            bound_opts)
        _copy_params(layer, linear_layer)
        return layer


class BoundConv2d(_BoundLayer, nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1,
                 bias=True, bound_opts=None):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                         groups=groups, bias=bias)
        self.bound_opts = bound_opts

    @staticmethod
    def convert(l: nn.Conv2d, bound_opts=None) -> "BoundConv2d":
        if l.padding_mode != "zeros" or isinstance(l.padding, str):
            raise ValueError(f"BoundConv2d.convert: only numeric zero padding is supported, got "
                             f"padding={l.padding!r}, padding_mode={l.padding_mode!r}")
        layer = BoundConv2d(l.in_channels, l.out_channels, l.kernel_size, l.stride, l.padding, l.dilation,
                            l.groups, l.bias is not None, bound_opts)
        _copy_params(layer, l)
        return layer


class BoundReLU(_BoundLayer, nn.ReLU):
    """After ``interval_range`` / ``full_backward_range``: ``lower_l``, ``upper_u`` (its input's bounds, the
    shape of its input) and ``unstab`` (the unstable mask), as the original keeps them."""

    def __init__(self, prev_layer=None, inplace=False, bound_opts=None):
        super().__init__(inplace)
        self.bound_opts = bound_opts

    @staticmethod
    def convert(act_layer: nn.ReLU, prev_layer=None, bound_opts=None) -> "BoundReLU":
        return BoundReLU(prev_layer, act_layer.inplace, bound_opts)


def _copy_params(new: nn.Module, old: nn.Module) -> None:
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    new.to(device=old.weight.device, dtype=old.weight.dtype)


def _is_flatten(m: nn.Module) -> bool:
    if isinstance(m, nn.Flatten):
        return m.start_dim == 1 and m.end_dim == -1
    return type(m).__name__ == "Flatten"


# ----------------------------------------------------------------------------------------------- engine
class _Engine:
    """robustkern's ``BoundedModule`` over a plain ``nn.Sequential`` sharing the layers' parameters (built
    lazily for the input shape; not part of the module's state: rebuilt after copying or unpickling)."""

    def __init__(self):
        self.bm: BoundedModule | None = None
        self.key = None

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

    def get(self, layers: list, example: Tensor) -> BoundedModule:
        key = (tuple(example.shape[1:]), tuple(id(p) for m in layers for p in m.parameters()))
        if self.bm is None or self.key != key:
            shadow = nn.Sequential(*[_plain(m) for m in layers])
            self.bm = BoundedModule(shadow, example[:1])
            self.key = key
        return self.bm


def _plain(m: nn.Module) -> nn.Module:
    """A torch.nn layer with ``m``'s own Parameter objects (what robustkern's graph capture understands)."""
    if isinstance(m, BoundLinear):
        p = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
    elif isinstance(m, BoundConv2d):
        p = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                      m.bias is not None, device="meta")
    else:
        return nn.ReLU() if isinstance(m, BoundReLU) else nn.Flatten()
    p.weight, p.bias = m.weight, m.bias
    return p


@dataclass
class _Side:
    """One side of a backward pass: the bound, the constant term split into ReLU intercepts and layer biases,
    and the final coefficients ``A`` of the input (B, S, *input shape)."""
    bound: Tensor
    relu_bias: Tensor
    layer_bias: Tensor
    A: Tensor

    @property
    def bias(self) -> Tensor:
        return self.relu_bias + self.layer_bias


# ----------------------------------------------------------------------------------------------- the model
class BoundSequential(nn.Sequential):
    """CROWN-IBP's ``BoundSequential``: an ``nn.Sequential`` of ``BoundLinear``, ``BoundConv2d``, ``BoundReLU``,
    ``BoundFlatten``, called with ``method_opt`` (module docstring)."""

    def __init__(self, *args):
        super().__init__(*args)
        self._engine = _Engine()
        self._relu_bounds: dict[int, tuple[Tensor, Tensor]] = {}   # layer index -> (l, u) of its input
        self._node_boxes: dict = {}                                # module path -> NodeBounds of the last IBP
        self._input_box: tuple[Tensor, Tensor] | None = None
        self._shapes: dict = {}

    _TRANSIENT = {"_relu_bounds": dict, "_node_boxes": dict, "_input_box": lambda: None}

    def __getstate__(self):
        """Copies and pickles leave out the bounds kept from the last call (tensors inside an autograd graph,
        which ``copy.deepcopy`` refuses)."""
        state = super().__getstate__()
        state.update({k: make() for k, make in self._TRANSIENT.items()})
        return state

    @staticmethod
    def convert(sequential_model: nn.Module, bound_opts: dict | None = None) -> "BoundSequential":
        """A ``BoundSequential`` with copies of the layers of ``sequential_model`` (an ``nn.Sequential``, or a
        wrapper with ``.module``, e.g. ``DataParallel``), on its device and dtype."""
        return _convert(BoundSequential, sequential_model, check_bound_opts(bound_opts))

    # ------------------------------------------------------------------------------------------ dispatch
    def __call__(self, *input, **kwargs):
        if "method_opt" not in kwargs:
            raise ValueError("Please specify the 'method_opt' as the last argument.")
        opt = kwargs.pop("method_opt")
        kwargs.pop("disable_multi_gpu", None)
        if opt == "full_backward_range":
            return self.full_backward_range(*input, **kwargs)
        if opt == "backward_range":
            return self.backward_range(*input, **kwargs)
        if opt == "interval_range":
            return self.interval_range(*input, **kwargs)
        return super().__call__(*input, **kwargs)

    # ------------------------------------------------------------------------------------------ IBP
    def interval_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None):
        """IBP bounds of the output (of ``C`` times it): ``(ub, lb, tightness, unstable, dead, alive)``."""
        layers = list(self)
        norm = _check_box(norm, x_U, x_L, eps)
        bm = self._engine.get(layers, x_U)
        if norm == math.inf:
            lb, ub = bm.compute_bounds_box(x_L, x_U, method="IBP", C=C, sound=False, check_values=False)
        else:
            lb, ub = bm.compute_bounds(x_U, float(eps), norm=2, method="IBP", C=C, x_min=-math.inf,
                                       x_max=math.inf, sound=False, check_values=False)
        self._node_boxes = {nb.path: nb for nb in bm.node_bounds().values()}
        self._input_box, self._relu_bounds = (x_L, x_U), {}
        tight = unstable = dead = alive = 0
        for i in range(len(layers)):
            if isinstance(layers[i], BoundReLU):
                lo, up = self._ibp_box(i)
                unstab = self._keep_relu_bounds(i, lo, up)
                count = torch.count_nonzero(unstab)          # (no int64 copy of the mask, as .sum() makes)
                tight, unstable = tight + count, unstable + count
                dead, alive = dead + torch.count_nonzero(up < 0), alive + torch.count_nonzero(lo > 0)
        return ub, lb, tight, unstable, dead, alive

    def _ibp_box(self, i: int) -> tuple[Tensor, Tensor]:
        """(lower, upper) of layer i's input from the last IBP pass."""
        if i == 0:
            return self._input_box
        return self._node_boxes[str(i - 1)].box().end_points(False)

    def _keep_relu_bounds(self, i: int, lo: Tensor, up: Tensor) -> Tensor:
        """Keep the bounds of ReLU i's input (and its unstable mask, returned) as the original's layer does."""
        unstab = (lo < -UNSTABLE_GUARD) & (up > UNSTABLE_GUARD)
        vars(self[i]).update(lower_l=lo, upper_u=up, unstab=unstab)    # plain attributes, as the original's
        self._relu_bounds[i] = (lo, up)
        return unstab

    # ------------------------------------------------------------------------------------------ CROWN
    def backward_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, upper=False, lower=True,
                       modules=None):
        """CROWN-IBP's backward pass from ``C`` with the ReLU bounds kept by the last ``interval_range`` (or
        ``full_backward_range``): ``(ub, upper_sum_b, lb, lower_sum_b)``. ``modules``: a prefix of the layers
        (default all)."""
        sides = self._backward(norm, x_U, x_L, eps, C, upper, lower, self._prefix(modules))
        return _returned(sides, x_U)

    def full_backward_range(self, norm=math.inf, x_U=None, x_L=None, eps=None, C=None, upper=True, lower=True):
        """CROWN: IBP up to the first ReLU, the input bounds of every later ReLU by the backward pass over the
        layers before it, then the backward pass from ``C``: ``(ub, upper_sum_b, lb, lower_sum_b)``."""
        layers = list(self)
        norm = _check_box(norm, x_U, x_L, eps)
        first = next((i for i, m in enumerate(layers) if isinstance(m, BoundReLU)), None)
        if first is None:
            return self.backward_range(norm, x_U, x_L, eps, C, upper, lower)
        self.interval_range(norm, x_U, x_L, eps)          # the bounds of the first ReLU's input are IBP's
        shapes = self._layer_shapes(x_U)
        for i in range(first + 1, len(layers)):        # the later ReLUs' input bounds: CROWN, not IBP
            if not isinstance(layers[i], BoundReLU):
                continue
            shape = shapes[i - 1][1]
            n = math.prod(shape)
            eye = torch.eye(n, dtype=x_U.dtype, device=x_U.device).reshape(1, n, *shape)
            sides = self._backward(norm, x_U, x_L, eps, eye, True, True, i, batch=x_U.shape[0])
            lo, up = sides[False].bound, sides[True].bound
            self._keep_relu_bounds(i, lo.reshape(lo.shape[0], *shape), up.reshape(up.shape[0], *shape))
        return self.backward_range(norm, x_U, x_L, eps, C, upper, lower)

    def _prefix(self, modules) -> int:
        layers = list(self)
        if modules is None:
            return len(layers)
        modules = list(modules)
        if any(a is not b for a, b in zip(modules, layers)) or len(modules) > len(layers):
            raise ValueError("backward_range: modules must be a prefix of the model's layers")
        return len(modules)

    def _layer_shapes(self, x: Tensor) -> dict:
        """(input shape, output shape) per layer for examples shaped like ``x``'s (what the original's layers
        record in their forward)."""
        key = (tuple(x.shape[1:]), len(self))
        if key not in self._shapes:
            shapes, shape = {}, key[0]
            for i, m in enumerate(self):
                shapes[i] = (shape, _out_shape(m, shape))
                shape = shapes[i][1]
            self._shapes[key] = shapes
        return self._shapes[key]

    def _backward(self, norm, x_U, x_L, eps, C, upper: bool, lower: bool, stop: int, batch: int | None = None,
                  concretize_at: int = 0) -> dict:
        """The backward pass through layers ``[concretize_at, stop)`` for each side asked for, concretised over
        the box at the input of layer ``concretize_at`` (the input box for 0). ``C`` (B or 1, S, *output
        shape); ``batch``: B when ``C`` has a batch dimension of 1."""
        if C is None:
            raise ValueError("backward_range: the specification C (batch, n_spec, n_out) is required (the "
                             "original returns infinite bounds without it)")
        norm = _check_box(norm, x_U, x_L, eps)
        layers = list(self)
        shapes = self._layer_shapes(x_U)
        C = C.to(x_U.dtype)
        out = {}
        for side, want in ((True, upper), (False, lower)):
            if not want:
                continue
            A = C
            relu_bias = layer_bias = x_U.new_zeros((1,))
            for i in reversed(range(concretize_at, stop)):
                m = layers[i]
                if isinstance(m, BoundReLU):
                    if i not in self._relu_bounds:
                        raise RuntimeError("backward_range: no ReLU bounds yet; call interval_range (or "
                                           "full_backward_range) first")
                    lo, up = (t.reshape(t.shape[0], -1) for t in self._relu_bounds[i])
                    B, S = lo.shape[0], A.shape[1]
                    flat = A.reshape(A.shape[0], S, -1).expand(B, S, -1).contiguous()
                    A_in, b = crown_relu_backward(flat, lo, up, relu_lower_mode(m.bound_opts), side)
                    A, relu_bias = A_in.reshape(B, S, *A.shape[2:]), relu_bias + b
                elif isinstance(m, BoundFlatten):
                    A = A.reshape(A.shape[0], A.shape[1], *shapes[i][0])
                elif isinstance(m, BoundLinear):
                    if m.bias is not None:
                        layer_bias = layer_bias + A.matmul(m.bias)
                    A = A.matmul(m.weight)
                else:
                    if m.bias is not None:
                        layer_bias = layer_bias + (A.sum((3, 4)) * m.bias).sum(2)
                    A = _conv_transpose(m, A, shapes[i])
            out[side] = self._concretize(norm, x_U, x_L, eps, A, relu_bias, layer_bias, side, batch,
                                         concretize_at)
        return out

    def _concretize(self, norm, x_U, x_L, eps, A, relu_bias, layer_bias, side, batch, at) -> _Side:
        B = x_U.shape[0] if batch is None else batch
        S = A.shape[1]
        A_flat = A.reshape(A.shape[0], S, -1).expand(B, S, -1)
        bias = (relu_bias + layer_bias).expand(B, S)
        if norm == math.inf:
            lo, up = self._ibp_box(at) if at else (x_L, x_U)
            mid, rad = ((up + lo) / 2).reshape(B, -1), ((up - lo) / 2).reshape(B, -1)
            val = crown_concretize(A_flat.contiguous(), bias.contiguous(), mid, rad, None, None, side)
        else:          # the L2 ball; the L-inf box of the same radius contains it and is never the tighter one
            x = x_U.reshape(B, -1)
            e = torch.full((B,), float(eps), dtype=x.dtype, device=x.device)
            val = crown_concretize(A_flat.contiguous(), bias.contiguous(), x, e[:, None].expand_as(x).contiguous(),
                                   x, e, side)
        return _Side(val, relu_bias, layer_bias, A)


def _out_shape(m: nn.Module, shape: tuple) -> tuple:
    if isinstance(m, nn.Linear):
        return (m.out_features,)
    if isinstance(m, nn.Conv2d):
        return (m.out_channels,) + tuple((size + 2 * p - d * (k - 1) - 1) // st + 1 for size, k, st, p, d in
                                         zip(shape[1:], m.kernel_size, m.stride, m.padding, m.dilation))
    if isinstance(m, BoundFlatten):
        return (math.prod(shape),)
    return shape


def _conv_transpose(m: nn.Conv2d, A: Tensor, shapes) -> Tensor:
    """``A`` (B, S, C_out, H', W') through the transposed convolution of ``m`` to its input (B, S, C, H, W)."""
    (cin, hin, win), (_, hout, wout) = shapes
    opad = tuple(size - ((osz - 1) * s - 2 * p + d * (k - 1) + 1) for size, osz, k, s, p, d in
                 zip((hin, win), (hout, wout), m.weight.shape[2:], m.stride, m.padding, m.dilation))
    flat = A.reshape(A.shape[0] * A.shape[1], *A.shape[2:])
    out = F.conv_transpose2d(flat, m.weight, None, m.stride, m.padding, opad, m.groups, m.dilation)
    return out.reshape(A.shape[0], A.shape[1], cin, hin, win)


def _returned(sides: dict, x_U: Tensor):
    up, lo = sides.get(True), sides.get(False)
    ub, ub_sum = (up.bound, up.bias) if up is not None else (x_U.new_tensor([math.inf]), x_U.new_zeros((1,)))
    lb, lb_sum = (lo.bound, lo.bias) if lo is not None else (x_U.new_tensor([-math.inf]), x_U.new_zeros((1,)))
    return ub, ub_sum, lb, lb_sum


def _check_box(norm, x_U, x_L, eps) -> float:
    norm = float(norm)
    if norm not in (math.inf, 2.0):
        raise ValueError(f"norm must be np.inf or 2, got {norm}")
    if not isinstance(x_U, Tensor) or not isinstance(x_L, Tensor):
        raise ValueError("x_U and x_L must be tensors (for norm=2 pass the clean input as both, and eps)")
    if x_U.shape != x_L.shape:
        raise ValueError(f"x_U and x_L must have the same shape, got {tuple(x_U.shape)} and {tuple(x_L.shape)}")
    if norm == 2 and (eps is None or isinstance(eps, Tensor) and eps.numel() != 1):
        raise ValueError("norm=2 needs eps, a number (the L2 radius)")
    return norm


def _convert(cls, sequential_model: nn.Module, bound_opts):
    seq = sequential_model if isinstance(sequential_model, nn.Sequential) else getattr(sequential_model, "module",
                                                                                          None)
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"{cls.__name__}.convert: the model must be an nn.Sequential (or wrap one as .module), got "
                        f"{type(sequential_model).__name__}")
    layers = []
    for i, m in enumerate(seq):
        if isinstance(m, nn.Linear):
            layers.append(BoundLinear.convert(m, bound_opts))
        elif isinstance(m, nn.Conv2d):
            layers.append(BoundConv2d.convert(m, bound_opts))
        elif isinstance(m, nn.ReLU):
            layers.append(BoundReLU.convert(m, layers[-1] if layers else None, bound_opts))
        elif _is_flatten(m):
            layers.append(BoundFlatten(bound_opts))
        else:
            raise TypeError(f"{cls.__name__}.convert: layer {i} is {type(m).__name__}; CROWN-IBP's bound layers "
                            f"are Linear, Conv2d, ReLU and Flatten (the original drops other layers silently). "
                            f"Use robustkern.bounds.BoundedModule for models with other layers")
    return cls(*layers)


class BoundDataParallel(nn.DataParallel):
    """CROWN-IBP's ``BoundDataParallel``: the clean forward (``method_opt="forward"``) is split over the GPUs as
    ``DataParallel`` does (``disable_multi_gpu=True`` keeps it on one device); the bound computations run on the
    wrapped model's device."""

    def forward(self, *inputs, **kwargs):
        disable = kwargs.pop("disable_multi_gpu", False)
        if not self.device_ids or disable or kwargs.get("method_opt", "forward") != "forward" \
                or len(self.device_ids) == 1:
            return self.module(*inputs, **kwargs)
        return super().forward(*inputs, **kwargs)
