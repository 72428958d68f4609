"""alpha-CROWN: CROWN with the ReLU lower slopes optimised on the bound (Xu, Zhang, Wang, Wang, Jana, Lin, Hsieh,
ICLR 2021, "Fast and Complete: Enabling Complete Neural Network Verification with Rapid and Massively Parallel
Incomplete Verifiers"; auto_LiRPA's ``compute_bounds(method="CROWN-Optimized")`` / ``"alpha-CROWN"``,
``optimized_bounds.py`` with the ``alpha`` of ``operators/relu.py``).

Every backward pass of CROWN gets its own slopes: for each node whose bounds a backward pass computes (the input
of each later ReLU, with both sides, and the specification ``C``, with the side asked for) and each ReLU before
it, a lower slope per specification row and neuron, ``alpha`` (B, rows, N) per side (auto_LiRPA's alpha of
shape (2, rows, B, N)). They start at CROWN's own slopes (the ``relu_lower`` rule on CROWN's bounds) and are
optimised jointly, on the final bound alone, by ``iteration`` steps of Adam (learning rate ``lr_alpha``, decayed
by ``lr_decay`` per step) on ``-sum(lb)`` (or ``sum(ub)``), each followed by a projection onto [0, 1]; each
iteration recomputes the intermediate bounds with their slopes, so the final bound's relaxation tightens too.
Lower and upper bounds are two separate optimisations, as in auto_LiRPA.

Why this is sound: any lower slope in [0, 1] gives a valid lower line of the ReLU on ``[l, u]``
(``relu(z) >= d z`` for ``z`` there), so every iterate's bound is a bound, computed with the same rounding-error
accounting as CROWN's (``robustkern.bounds.crown``; ``robustkern::crown_relu_backward_slopes`` clamps the slopes
itself). The intermediate bounds of an iterate are intersected with CROWN's (and IBP's), which are bounds too.

What is returned: the element-wise best (largest lower, smallest upper) of CROWN's bound and of every iterate's,
so it is never looser than ``method="CROWN"``. auto_LiRPA keeps the best per example (the sum over the
specification improving) and takes the element-wise best among those: the same iterates give equal or tighter
bounds here. Like auto_LiRPA (``sparse_intermediate_bounds``), only the neurons unstable under CROWN's
intermediate bounds (in some example of the batch) are recomputed; the others keep CROWN's bounds. Where an
intersection with CROWN's bound chooses CROWN's value, the gradient is still the iterate's own (auto_LiRPA's
``reference_bounds`` rule), so the slopes keep moving.

``optimize_bound_args`` (auto_LiRPA's names and defaults): ``iteration`` 20 (bound evaluations; the last one
takes no step), ``lr_alpha`` 0.5, ``lr_decay`` 0.98, ``optimizer`` "adam" (or "sgd": momentum 0.9),
``early_stop_patience`` 10 (stop after more iterations than that without an example improving),
``keep_best`` True (False: the last iterate's bound, still intersected with CROWN's), ``use_shared_alpha``
False (True: one slope per neuron shared by a pass's specification rows), ``stop_criterion_func`` (a function
of the current bound, True or a (B,) mask: those examples stop contributing to the loss; all True ends the
optimisation), ``loss_reduction_func`` (reduces the (B, S) bound per example; default the sum), ``max_time``
(seconds). Accepted with no effect here: ``enable_alpha_crown`` (True), ``init_alpha`` (True),
``fix_interm_bounds``, ``start_save_best``, ``deterministic``, ``use_float64_in_last_iteration``,
``pruning_in_iteration``, ``pruning_in_iteration_threshold``, ``multi_spec_keep_func``, ``lr_beta``,
``lr_cut_beta``, ``lr_coeffs``, ``intermediate_refinement_layers``. Refused (``NotImplementedError``):
``enable_beta_crown``, ``apply_output_constraints_to``, ``tighten_input_bounds``, ``directly_optimize``, the
"adam-autolr" optimizer.
"""
from __future__ import annotations

import time

import torch
from torch import Tensor

from ..ops.crown import crown_relu_lower_slopes
from . import crown as crown_passes
from .crown import (CrownSetup, backward_bound, crown_intermediate, crown_setup, finish, identity_bounds, output_spec,
                    row_slopes, unstable_rows)

__all__ = ["DEFAULT_OPTIMIZE_BOUND_ARGS", "check_optimize_bound_args", "alpha_crown_bounds"]


def _sum_over_specs(bound: Tensor) -> Tensor:
    return bound.sum(1, keepdim=True)


DEFAULT_OPTIMIZE_BOUND_ARGS = {
    "iteration": 20, "lr_alpha": 0.5, "lr_decay": 0.98, "optimizer": "adam", "early_stop_patience": 10,
    "keep_best": True, "use_shared_alpha": False, "stop_criterion_func": None,
    "loss_reduction_func": _sum_over_specs, "max_time": 1e9,
}
_NO_EFFECT = {"enable_alpha_crown": True, "init_alpha": True, "fix_interm_bounds": None, "start_save_best": None,
              "deterministic": None, "use_float64_in_last_iteration": None, "pruning_in_iteration": None,
              "pruning_in_iteration_threshold": None, "multi_spec_keep_func": None, "lr_beta": None,
              "lr_cut_beta": None, "lr_coeffs": None, "intermediate_refinement_layers": None, "oc_lr": None,
              "share_gammas": None, "best_of_oc_and_no_oc": None}
_REFUSED = {"enable_beta_crown": (False,), "apply_output_constraints_to": ((), []), "tighten_input_bounds": (False,),
            "directly_optimize": ((), [])}


def check_optimize_bound_args(args: dict | None) -> dict:
    """``args`` over ``DEFAULT_OPTIMIZE_BOUND_ARGS``, checked (module docstring)."""
    if args is not None and not isinstance(args, dict):
        raise TypeError(f"optimize_bound_args must be a dict, got {type(args).__name__}")
    out = dict(DEFAULT_OPTIMIZE_BOUND_ARGS)
    for key, value in (args or {}).items():
        if key in _REFUSED:
            if value not in _REFUSED[key]:
                raise NotImplementedError(f"optimize_bound_args: {key}={value!r} is not supported (alpha-CROWN "
                                          f"only: beta-CROWN, output constraints and input tightening are not)")
        elif key in _NO_EFFECT:
            if key in ("enable_alpha_crown", "init_alpha") and not value:
                raise NotImplementedError(f"optimize_bound_args: {key}=False is not supported: alpha-CROWN always "
                                          f"optimises the slopes, starting from CROWN's")
        elif key in out:
            out[key] = value
        else:
            known = sorted(set(DEFAULT_OPTIMIZE_BOUND_ARGS) | set(_NO_EFFECT) | set(_REFUSED))
            raise ValueError(f"optimize_bound_args: unknown key {key!r}; known: {', '.join(known)}")
    if out["loss_reduction_func"] is None:
        out["loss_reduction_func"] = _sum_over_specs
    if isinstance(out["iteration"], bool) or not isinstance(out["iteration"], int) or out["iteration"] < 0:
        raise ValueError(f"optimize_bound_args: iteration must be an int >= 0, got {out['iteration']!r}")
    for key in ("lr_alpha", "lr_decay"):
        if not isinstance(out[key], (int, float)) or isinstance(out[key], bool) or not out[key] > 0:
            raise ValueError(f"optimize_bound_args: {key} must be a number > 0, got {out[key]!r}")
    if out["optimizer"] not in ("adam", "sgd"):
        raise NotImplementedError(f"optimize_bound_args: optimizer must be 'adam' or 'sgd', got {out['optimizer']!r}")
    return out


def _straight_through(value: Tensor, grad_of: Tensor) -> Tensor:
    """``value`` with the gradient of ``grad_of`` (auto_LiRPA's rule for intermediate bounds intersected with a
    reference: the value is the intersection, the gradient the iterate's own)."""
    return value.detach() - grad_of.detach() + grad_of


class _Passes:
    """The backward passes of one alpha-CROWN optimisation (one side of the final bound) and their slopes."""

    def __init__(self, setup: CrownSetup, reference: dict, out_src: str, A0: Tensor, upper: bool, shared: bool,
                 crown_batch_size: int | None):
        ctx = setup.ctx
        self.setup, self.reference, self.out_src, self.A0, self.upper = setup, reference, out_src, A0, upper
        self.chunk = crown_batch_size
        relus = [n for n in ctx.nodes if n.kind == "relu"]
        B = A0.shape[0]
        init = {}
        for n in relus:
            lo, hi = reference[n.inputs[0]]
            init[n.name] = crown_relu_lower_slopes(lo, hi, ctx.mode)  # CROWN's own slopes, (B, N)

        def slopes_for(start: str, rows: Tensor | int, sides: tuple) -> dict:
            """Per side and ReLU before ``start``: shared (B, 1, N), or per row of the identity ``rows``
            (``row_slopes``), or per specification row (B, S, N) when ``rows`` is the count S."""
            before = [n for n in relus if ctx.index[n.name] < ctx.index[start]]

            def one(n):
                if shared or isinstance(rows, int):
                    return init[n.name].unsqueeze(1).expand(B, 1 if shared else rows, -1).clone()
                t = row_slopes(setup, start, rows, n.name, init[n.name])
                if t.dim() == 3 and n.name in hwc:   # held (B, R, H, W, C), the order of channels-last A
                    c, h, w = ctx.shapes[n.inputs[0]]
                    t = t.reshape(B, -1, c, h, w).permute(0, 1, 3, 4, 2).contiguous()
                    self.hwc.add(id(t))
                return t
            return {side: {n.name: one(n).requires_grad_(True) for n in before} for side in sides}

        # ReLUs whose coefficients a dense pass carries channels-last (their only user a convolution, whose
        # transposed convolution gives channels-last A, robustkern.bounds.crown): their per-row slopes are held in
        # that order, so the ReLU step reads them without a copy
        hwc = {n.name for n in relus if not ctx.sound and crown_passes.CHANNELS_LAST
               and len(ctx.shapes[n.inputs[0]]) == 3
               and [m.kind for m in ctx.nodes if n.name in m.inputs] == ["conv2d"]}
        self.hwc: set = set()

        self.rows: dict[str, Tensor] = {}          # ReLU-input node -> the neurons recomputed (unstable somewhere)
        self.slopes: dict[str, dict] = {}          # start node -> {side: {relu: slopes}}
        for name in setup.relu_inputs:
            if not any(ctx.index[n.name] < ctx.index[name] for n in relus):
                continue                           # no ReLU before it: its bounds do not depend on slopes
            lo, hi = reference[name]
            rows = unstable_rows((lo, hi))
            if rows.numel():
                self.rows[name] = rows
                self.slopes[name] = slopes_for(name, rows, (False, True))
        self.slopes[out_src] = slopes_for(out_src, A0.shape[1], (upper,))

    def passed(self, start: str) -> dict:
        """The slopes of the passes from ``start`` as ``backward_bound`` takes them: (B, R, C, H, W) views of the
        ones held channels-last."""
        return {side: {k: v.permute(0, 1, 4, 2, 3) if id(v) in self.hwc else v for k, v in per.items()}
                for side, per in self.slopes[start].items()}

    def parameters(self) -> list[Tensor]:
        return [t for per_start in self.slopes.values() for per_side in per_start.values() for t in per_side.values()]

    def clamp_(self) -> None:
        with torch.no_grad():
            for t in self.parameters():
                t.clamp_(0.0, 1.0)

    def bound(self, linear: dict | None = None) -> Tensor:
        """The final bound with the current slopes (intermediate bounds recomputed first); ``linear`` receives
        the final pass's linear bound (``backward_bound``)."""
        setup = self.setup
        ctx = setup.ctx
        ctx.relu_bounds = dict(self.reference)
        for name in setup.relu_inputs:
            rows = self.rows.get(name)
            if rows is None:
                continue
            lo_new, hi_new = identity_bounds(setup, name, rows, self.chunk, self.passed(name))
            lo_ref, hi_ref = self.reference[name]
            lo_sel = _straight_through(torch.maximum(lo_ref[:, rows], lo_new), lo_new)
            hi_sel = _straight_through(torch.minimum(hi_ref[:, rows], hi_new), hi_new)
            ctx.relu_bounds[name] = (lo_ref.index_copy(1, rows, lo_sel), hi_ref.index_copy(1, rows, hi_sel))
        r = backward_bound(ctx, self.out_src, self.A0, (self.upper,), setup.input_box, setup.ball, ctx.sound,
                           self.passed(self.out_src), linear=linear)
        return r[self.upper]


def _optimize(passes: _Passes, crown: Tensor, upper: bool, args: dict, linear: dict | None = None) -> Tensor:
    """auto_LiRPA's optimisation loop for one side; returns the element-wise best bound (module docstring).
    ``linear``: ``{upper: (A, bias)}`` of the CROWN pass on entry; on return, per specification row, those of
    the pass whose bound was returned."""
    params = passes.parameters()
    reduce = args["loss_reduction_func"]
    sign = 1.0 if upper else -1.0     # the loss to minimise: sign * bound
    best = crown.detach().clone()
    last = None
    keep = _LinearOfBest(linear, upper, crown)
    if not params or args["iteration"] == 0:
        return best
    if args["optimizer"] == "adam":
        # the fused implementation: one pass over each slope tensor per step (the same update, up to rounding)
        opt = torch.optim.Adam(params, lr=args["lr_alpha"], fused=True)
    else:
        opt = torch.optim.SGD(params, lr=args["lr_alpha"], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(opt, args["lr_decay"])
    patience, start = 0, time.time()
    iterations = args["iteration"]
    for i in range(iterations):
        final = i == iterations - 1
        with torch.enable_grad() if not final else torch.no_grad():
            bound = passes.bound(keep.request())
        with torch.no_grad():
            value = bound.detach()
            keep.update(value, best, upper)
            improved = (sign * reduce(value) < sign * reduce(best)).any()
            best = torch.minimum(best, value) if upper else torch.maximum(best, value)
            last = value
            patience = 0 if improved else patience + 1
            stop = args["stop_criterion_func"](-value if upper else value) if args["stop_criterion_func"] else False
            stop_all = bool(stop) if isinstance(stop, bool) else bool(stop.all())
        if final or stop_all or patience > args["early_stop_patience"] or time.time() - start > args["max_time"]:
            break
        with torch.enable_grad():      # the caller may run under torch.no_grad()
            per_example = sign * reduce(bound)
            if isinstance(stop, Tensor):
                per_example = per_example * (~stop.reshape(-1, *([1] * (per_example.dim() - 1)))).to(bound.dtype)
            grads = torch.autograd.grad(per_example.sum(), params, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g if g is None or g.is_contiguous() else g.contiguous()   # the fused step reads both flat
        del grads
        opt.step()
        opt.zero_grad(set_to_none=True)   # the gradients are not kept through the next bound evaluation
        passes.clamp_()
        scheduler.step()
    if not args["keep_best"] and last is not None:
        best = torch.minimum(crown, last) if upper else torch.maximum(crown, last)
        keep.last_against_crown(crown, last, upper)
    keep.store()
    return best


class _LinearOfBest:
    """The linear bound ``(A, bias)`` behind each row of the bound ``_optimize`` returns (``return_linear``):
    that of the CROWN pass, replaced by an iterate's where the iterate's bound is better."""

    def __init__(self, linear: dict | None, upper: bool, crown: Tensor):
        self.linear, self.upper = linear, upper
        if linear is not None:
            A, bias = linear[upper]
            self.crown = self.best = (A.detach(), bias.detach())
        self.latest: dict = {}

    def request(self) -> dict | None:
        self.latest = {} if self.linear is not None else None
        return self.latest

    @staticmethod
    def _pick(better: Tensor, new: tuple, old: tuple) -> tuple:
        mask = better.reshape(better.shape + (1,) * (new[0].dim() - 2))
        return torch.where(mask, new[0].detach(), old[0]), torch.where(better, new[1].detach(), old[1])

    def update(self, value: Tensor, best: Tensor, upper: bool) -> None:
        if self.linear is None:
            return
        self.last = self.latest[upper]
        better = value < best if upper else value > best
        self.best = self._pick(better, self.last, self.best)

    def last_against_crown(self, crown: Tensor, last: Tensor, upper: bool) -> None:
        if self.linear is not None:
            better = last < crown if upper else last > crown
            self.best = self._pick(better, self.last, self.crown)

    def store(self) -> None:
        if self.linear is not None:
            self.linear[self.upper] = self.best


def alpha_crown_bounds(nodes, shapes, ibp_bounds: dict, C: Tensor | None, num_outputs: int, *, bound_lower: bool,
                       bound_upper: bool, sound: bool, coeffs, norm: float, x: Tensor, eps: Tensor,
                       relu_lower: str = "adaptive", crown_batch_size: int | None = None,
                       optimize_bound_args: dict | None = None, linear: dict | None = None):
    """alpha-CROWN bounds on ``C f(x)`` (or ``f(x)``): ``(lb, ub)``, None for a side not requested (module
    docstring; the arguments as ``robustkern.bounds.crown.crown_bounds``'s). ``linear`` receives, per side, the
    linear bound of the pass behind each specification row's returned bound (``backward_bound``)."""
    args = check_optimize_bound_args(optimize_bound_args)
    setup = crown_setup(nodes, shapes, ibp_bounds, sound=sound, coeffs=coeffs, norm=norm, x=x, eps=eps,
                        relu_lower=relu_lower)
    ctx = setup.ctx
    sides = tuple(s for s, want in ((False, bound_lower), (True, bound_upper)) if want)
    with torch.no_grad():
        crown_intermediate(setup, crown_batch_size)
        reference = {k: (lo.detach(), hi.detach()) for k, (lo, hi) in ctx.relu_bounds.items()}
        out_src, A0 = output_spec(setup, C, num_outputs)
        A0 = A0.detach()
        crown = backward_bound(ctx, out_src, A0, sides, setup.input_box, setup.ball, sound, linear=linear)
    result = {}
    for side in sides:
        passes = _Passes(setup, reference, out_src, A0, side, bool(args["use_shared_alpha"]), crown_batch_size)
        result[side] = _optimize(passes, crown[side], side, args, linear)
    ctx.relu_bounds = dict(reference)
    if linear is not None:
        for side, (A, bias) in linear.items():
            linear[side] = (A.to(setup.work), bias.to(setup.work))
    return finish(setup, result.get(False), result.get(True))
