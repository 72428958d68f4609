"""auto_LiRPA's ``BoundedModule`` on robustkern's bound propagation, with auto_LiRPA's rule for the bounds a
call leaves behind.

Methods, case-insensitive, normalised as auto_LiRPA does: "IBP" is ``method=None, IBP=True``; "CROWN-IBP",
"IBP+backward" and "IBP+CROWN" are "backward" with ``IBP=True``; "CROWN" is "backward"; "CROWN-Optimized" and
"alpha-CROWN" are alpha-CROWN (``robustkern.bounds.alpha_crown``), with the ``optimize_bound_args`` of
``bound_opts`` (auto_LiRPA's names; ``set_bound_opts`` updates them as auto_LiRPA's does).

Stored intermediate bounds (auto_LiRPA's ``compute_bounds``): every node's bounds stay on the graph until the
input is set again, by ``forward`` (``model(x)``) or by ``compute_bounds(x=...)``; a call with ``x=None``
starts from what is there instead of recomputing it. Per call without ``x``:

=====================  ===========================  ==========================================================
call                   stored since the input        result
=====================  ===========================  ==========================================================
IBP                    nothing or IBP                IBP (stored: IBP)
backward, IBP=True     nothing or IBP                CROWN-IBP (stored: IBP)
backward, IBP=False    IBP                           CROWN-IBP, its backward pass over the stored IBP boxes
backward, IBP=False    nothing                       CROWN (stored: CROWN)
backward               CROWN                         CROWN (its intermediate bounds are CROWN's again)
IBP                    CROWN                         refused: auto_LiRPA would start IBP from CROWN's bounds
alpha-CROWN            anything                      alpha-CROWN afresh (stored: CROWN)
=====================  ===========================  ==========================================================

After alpha-CROWN the stored intermediate bounds are CROWN's (auto_LiRPA keeps the optimised ones): a later
backward call without ``x`` gives CROWN's bound, which is sound but can be looser than auto_LiRPA's there.

So ``examples/vision/simple_training.py``'s ``model(x)``, ``compute_bounds(IBP=True, C=c, method=None)``,
``compute_bounds(IBP=False, C=c, method="backward")`` is IBP then CROWN-IBP, with one IBP pass in all as in
auto_LiRPA. ``reuse_ibp=True`` (with IBP) returns the IBP bounds of the last call that computed them.

auto_LiRPA also reuses stored bounds when what they came from has changed since (an optimiser step,
``load_state_dict``, a new ``ptb`` on the input, ``train()``/``eval()``, an in-place edit of the input): they
are stale then. The facade raises ``ValueError`` instead ("pass x=... to recompute").
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ...bounds import BoundedModule as _RKBoundedModule
from ...bounds.alpha_crown import check_optimize_bound_args
from .bounded_tensor import plain
from .wrapper import LOSS_FUSION_ADVICE, CrossEntropyWrapper, CrossEntropyWrapperMultiInput

__all__ = ["BoundedModule", "lirpa_method"]

_ACT = {None: "adaptive", "adaptive": "adaptive", "same-slope": "same-slope", "zero-lb": "zero", "one-lb": "one"}
_BACKWARD = {"crown": False, "backward": False, "crown-ibp": True, "ibp+backward": True, "ibp+crown": True}
_OPTIMIZED = ("crown-optimized", "alpha-crown")
# compute_bounds arguments that change what auto_LiRPA computes and have no counterpart here: refused when set
_REFUSED = ("interm_bounds", "reference_bounds", "aux_reference_bounds", "intermediate_constr",
            "alpha_idx", "need_A_only", "cutter", "update_mask", "ibp_nodes", "average_A", "cache_bounds")
_ACCEPTED = ("reuse_alpha", "decision_thresh")  # alpha-CROWN only: no effect on the methods here
_CALL_ONLY = ("disable_multi_gpu", "no_replicas", "node_class", "att_name")  # auto_LiRPA's __call__ drops them
_STALE = ("compute_bounds: the parameters, the train/eval mode or the input's perturbation changed since the "
          "stored intermediate bounds were computed (auto_LiRPA would reuse them stale); pass x=(...) to recompute")


def lirpa_method(method, IBP: bool = False) -> tuple[str | None, bool]:
    """auto_LiRPA's normalisation of ``(method, IBP)``: ``(None, True)`` (IBP only), ``("backward", ibp)``
    (a backward pass; IBP intermediate bounds when ``ibp``) or ``("CROWN-Optimized", False)`` (alpha-CROWN)."""
    if method is None:
        return None, bool(IBP)
    key = str(method).strip().lower()
    if key == "ibp":
        return None, True
    if key in _OPTIMIZED:
        return "CROWN-Optimized", False
    if key not in _BACKWARD:
        raise NotImplementedError(f"compute_bounds: method {method!r} is not supported by robustkern's facade; use "
                                  f"IBP, CROWN-IBP, CROWN or CROWN-Optimized (forward modes: auto_LiRPA itself)")
    return "backward", bool(IBP) or _BACKWARD[key]


def _same(a: tuple, b: tuple) -> bool:
    """Whether two ``_snapshot`` results agree: tensors and objects by identity, numbers by value."""
    return len(a) == len(b) and all(
        u is v or (isinstance(u, (int, float)) and not isinstance(u, bool) and type(u) is type(v) and u == v)
        for u, v in zip(a, b))


@dataclass
class _Stored:
    """Intermediate bounds left on the graph since the input was set: ``kind`` "IBP" (``boxes``: the per-node
    IBP boxes of that call) or "CROWN" (recomputed when reused: the same numbers, ``key`` unchanged)."""
    kind: str
    key: tuple
    boxes: dict | None = None


class BoundedModule(nn.Module):
    """auto_LiRPA's ``BoundedModule(model, global_input, bound_opts=None, device="auto")``: shares the model's
    parameters; ``bm(x)`` is the clean forward (it records training-mode BatchNorm statistics and sets the
    input); ``bm(method_opt="compute_bounds", ...)`` is ``compute_bounds``.

    ``bound_opts`` understood: ``activation_bound_option`` (None or "adaptive", "same-slope", "zero-lb",
    "one-lb"), ``crown_batch_size``, ``forward_before_compute_bounds``, ``optimize_bound_args`` (alpha-CROWN's,
    checked at construction: ``robustkern.bounds.alpha_crown``), and robustkern's own ``sound``
    (default False: auto_LiRPA's numbers, no rounding-error widening; True for certificates, see
    ``robustkern.bounds.crown``). Keys that only tune auto_LiRPA's own engine (``conv_mode``,
    ``sparse_intermediate_bounds``, ``loss_fusion`` on a plain model, ...) are accepted and ignored;
    ``compare_crown_with_ibp=True`` is refused."""

    def __init__(self, model: nn.Module, global_input, bound_opts: dict | None = None, device="auto",
                 verbose: bool = False, custom_ops=None):
        super().__init__()
        if isinstance(model, (CrossEntropyWrapper, CrossEntropyWrapperMultiInput)):
            raise NotImplementedError(f"BoundedModule: bounding a CrossEntropyWrapper (auto_LiRPA's loss fusion) is "
                                      f"not supported by the facade; {LOSS_FUSION_ADVICE}")
        if custom_ops:
            raise NotImplementedError("BoundedModule: custom_ops are not supported; robustkern.bounds takes the "
                                      "layers listed in robustkern.bounds.graph")
        self.bound_opts = dict(bound_opts or {})
        act = self.bound_opts.get("activation_bound_option")
        if act not in _ACT:
            raise ValueError(f"BoundedModule: activation_bound_option must be one of None, 'adaptive', "
                             f"'same-slope', 'zero-lb', 'one-lb', got {act!r}")
        if self.bound_opts.get("compare_crown_with_ibp"):
            raise NotImplementedError("BoundedModule: compare_crown_with_ibp is not supported; intersect with the "
                                      "IBP bounds yourself (torch.maximum(lb, ibp_lb))")
        self._relu_lower = _ACT[act]
        self.bound_opts["optimize_bound_args"] = dict(self.bound_opts.get("optimize_bound_args") or {})
        check_optimize_bound_args(self.bound_opts["optimize_bound_args"])
        self._sound = bool(self.bound_opts.get("sound", False))
        self._forward_first = bool(self.bound_opts.get("forward_before_compute_bounds", False))
        cbs = self.bound_opts.get("crown_batch_size", math.inf)
        self._crown_batch_size = None if cbs in (None, math.inf) else int(cbs)
        x = global_input[0] if isinstance(global_input, (tuple, list)) else global_input
        if isinstance(global_input, (tuple, list)) and len(global_input) != 1:
            raise NotImplementedError("BoundedModule: models with several inputs are not supported by robustkern")
        if device not in ("auto", None):
            model.to(device)
            x = x.to(device)
        self.bm = _RKBoundedModule(model, plain(x))
        self._modal = [m for m in model.modules() if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.Dropout))]
        self._input = None
        self._plain: Tensor | None = None
        self._stored: _Stored | None = None
        self._ibp_last: Callable[[], tuple] | None = None

    # ------------------------------------------------------------------ input and stored bounds
    def _set_input(self, x):
        """auto_LiRPA's ``set_input``: a new input; the bounds stored on the graph are dropped."""
        if x is not self._input:
            self._input, self._plain = x, plain(x)
        self._stored = None

    def _snapshot(self) -> tuple:
        """What stored bounds depend on: the input (and its version), its perturbation and that perturbation's
        tensors, every parameter (and their versions: optimiser steps and ``load_state_dict`` write in place) and
        the train/eval mode of BatchNorm and Dropout layers."""
        ptb = self._input.ptb
        refs = (self._input, ptb, getattr(ptb, "eps", None), getattr(ptb, "x_L", None), getattr(ptb, "x_U", None),
                *self.bm.model.parameters())
        versions = tuple(r._version for r in refs if isinstance(r, Tensor))
        return refs + versions + tuple(m.training for m in self._modal)

    def _store(self, kind: str):
        boxes = self.bm.node_bounds() if kind == "IBP" else None
        self._stored = _Stored(kind, self._snapshot(), boxes)

    def set_bound_opts(self, new_opts: dict) -> None:
        """auto_LiRPA's ``set_bound_opts``: a dict value updates the option's dict (``optimize_bound_args``), any
        other value replaces it. Options read at construction (``activation_bound_option``, ``sound``, ...) are
        refused: build a new BoundedModule for those."""
        for key, value in new_opts.items():
            if key != "optimize_bound_args":
                raise NotImplementedError(f"set_bound_opts: {key!r} is read when the BoundedModule is built; "
                                          f"build a new one with bound_opts={{{key!r}: ...}}")
            args = dict(self.bound_opts["optimize_bound_args"])
            if isinstance(value, dict):
                args.update(value)
            else:
                raise TypeError(f"set_bound_opts: optimize_bound_args must be a dict, got {type(value).__name__}")
            check_optimize_bound_args(args)
            self.bound_opts["optimize_bound_args"] = args

    def forward(self, *x, method_opt=None, final_node_name=None, interm_bounds=None, get_property=False,
                **kwargs):
        if get_property:
            raise NotImplementedError(f"BoundedModule: get_property (auto_LiRPA's node attributes such as "
                                      f"BoundExp.max_input) is not supported; {LOSS_FUSION_ADVICE}")
        for key in _CALL_ONLY:
            kwargs.pop(key, None)
        if method_opt == "compute_bounds":
            return self.compute_bounds(final_node_name=final_node_name, interm_bounds=interm_bounds, **kwargs)
        if method_opt not in (None, "forward"):
            raise ValueError(f"BoundedModule: method_opt must be 'forward' or 'compute_bounds', got {method_opt!r}")
        if final_node_name is not None or interm_bounds is not None:
            raise NotImplementedError("BoundedModule: final_node_name and interm_bounds are not supported")
        for key in kwargs:
            if key not in ("clear_forward_only", "reset_perturbed_nodes", "cache_bounds"):
                raise TypeError(f"BoundedModule.forward() got an unexpected keyword argument {key!r}")
        inputs = x[0] if len(x) == 1 and isinstance(x[0], (tuple, list)) else x
        if len(inputs) != 1:
            raise NotImplementedError("BoundedModule: models with several inputs are not supported by robustkern")
        self._set_input(inputs[0])
        return self.bm(self._plain)

    # ------------------------------------------------------------------ the graph
    @property
    def input_name(self) -> list[str]:
        """auto_LiRPA's ``input_name``: the names of the graph's input nodes (one here)."""
        return [n.name for n in self.bm.nodes if n.kind == "input"]

    @property
    def output_name(self) -> list[str]:
        """auto_LiRPA's ``output_name``: the name of the node whose value is the model's output."""
        return [n.inputs[0] for n in self.bm.nodes if n.kind == "output"]

    def visualize(self, output_path: str) -> str:
        """auto_LiRPA's ``visualize``: the bounded graph in Graphviz's DOT language, written to
        ``output_path + ".dot"`` (auto_LiRPA renders it with the ``graphviz`` package; here render it yourself:
        ``dot -Tpng bounded.dot -o bounded.png``). A node per step (kind and module path), an edge per input read.
        Returns the file's path."""
        lines = ["digraph bounded {", "  rankdir=TB;", "  node [shape=box, fontsize=10];"]
        for n in self.bm.nodes:
            lines.append(f'  "{n.name}" [label="{n.name}\\n{n.kind}: {n.path}"];')
            lines.extend(f'  "{src}" -> "{n.name}";' for src in n.inputs)
        lines.append("}")
        path = f"{output_path}.dot"
        with open(path, "w") as f:
            f.write("\n".join(lines) + "\n")
        return path

    # ------------------------------------------------------------------ bounds
    def compute_bounds(self, x=None, aux=None, C=None, method="backward", IBP=False, forward=False,
                       bound_lower=True, bound_upper=True, reuse_ibp=False, return_A=False, final_node_name=None,
                       **kwargs):
        """auto_LiRPA's ``compute_bounds``: ``(lb, ub)`` of the outputs, or of ``C`` times them; a side not
        requested is None for the backward methods (IBP returns both, as auto_LiRPA's). ``x=None`` uses the
        last input and the bounds stored since it was set (see the module docstring).

        ``return_A=True`` (CROWN-IBP, CROWN, CROWN-Optimized): ``(lb, ub, A_dict)`` with auto_LiRPA's
        ``A_dict[output_name[0]][input_name[0]] = {"lA", "uA", "lbias", "ubias"}``, the linear bounds of the final
        backward pass in the input (``lA`` (B, n_spec, *input shape); None for a side not requested), so that
        ``lb`` is ``lA x + lbias`` minimised over the input set. ``needed_A_dict`` may ask for that pair only."""
        needed_A = kwargs.pop("needed_A_dict", None)
        for key, value in kwargs.items():
            if key in _REFUSED:
                if value is not None and value is not False and not (isinstance(value, dict) and not value):
                    raise NotImplementedError(f"compute_bounds: {key} is not supported by robustkern's facade")
            elif key not in _ACCEPTED:
                raise TypeError(f"compute_bounds() got an unexpected keyword argument {key!r}")
        if forward or final_node_name is not None or aux is not None:
            raise NotImplementedError("compute_bounds: forward mode, final_node_name and aux are not supported by "
                                      "robustkern's facade")
        if return_A:
            self._check_needed_A(needed_A)
        if not bound_lower and not bound_upper:
            raise ValueError("compute_bounds: at least one of bound_lower and bound_upper must be True")
        method, ibp = lirpa_method(method, IBP)
        if method is None and not ibp:
            raise ValueError("compute_bounds: method=None needs IBP=True (or method='IBP')")
        if return_A and method is None:
            raise NotImplementedError("compute_bounds: return_A is supported for the backward methods (CROWN-IBP, "
                                      "CROWN, CROWN-Optimized), not for IBP; call method='backward' (CROWN) for the "
                                      "linear bounds")
        if method is None and reuse_ibp:
            if self._ibp_last is None:
                raise ValueError("compute_bounds: reuse_ibp=True but no IBP bounds were computed yet")
            return self._ibp_last()
        if x is not None:
            xt = x[0] if isinstance(x, (tuple, list)) else x
            if self._forward_first:
                self.forward(xt)
            self._set_input(xt)
        if self._input is None:
            raise ValueError("compute_bounds: no input given and none recorded; pass x=(BoundedTensor(...),)")
        if getattr(self._input, "ptb", None) is None:
            raise ValueError("compute_bounds: x must be a BoundedTensor with a PerturbationLpNorm")
        stored = self._stored
        if stored is not None and not _same(stored.key, self._snapshot()):
            raise ValueError(_STALE)
        if method == "CROWN-Optimized":
            out = self._run("alpha-CROWN", C, bound_lower, bound_upper, return_A=return_A)
            self._store("CROWN")
            return out
        if stored is not None and stored.kind == "CROWN":
            if method is None:
                raise NotImplementedError("compute_bounds: IBP without a new input after CROWN would start from "
                                          "CROWN's intermediate bounds in auto_LiRPA; pass x=(...) for IBP afresh")
            if ibp:
                self._ibp_last = _refuse_seeded_ibp
            return self._run("CROWN", C, bound_lower, bound_upper, return_A=return_A)
        if method is None:
            lb, ub = self._run("IBP", C, True, True)
            self._store("IBP")
            self._ibp_last = lambda: (lb, ub)
            return lb, ub
        if stored is not None:  # the stored IBP boxes are the intermediate bounds
            out = self._run("CROWN-IBP", C, bound_lower, bound_upper, intermediate=stored.boxes, return_A=return_A)
        else:
            out = self._run("CROWN-IBP" if ibp else "CROWN", C, bound_lower, bound_upper, return_A=return_A)
            self._store("IBP" if ibp else "CROWN")
        if ibp:
            self._ibp_last = self._later_ibp(C)
        return out

    def _later_ibp(self, C) -> Callable[[], tuple]:
        """The IBP bounds of this call's input and ``C``, computed when asked for (``reuse_ibp``)."""
        inp, key = self._input, self._snapshot()

        def ibp():
            saved = (self._input, self._plain, self._stored)
            self._set_input(inp)
            try:
                if not _same(key, self._snapshot()):
                    raise ValueError(_STALE)
                return self._run("IBP", C, True, True)
            finally:
                self._input, self._plain, self._stored = saved
        return ibp

    def _box(self) -> tuple[Tensor, Tensor]:
        ptb, x = self._input.ptb, self._plain
        if ptb.x_L is not None:
            return plain(torch.as_tensor(ptb.x_L)).to(x), plain(torch.as_tensor(ptb.x_U)).to(x)
        eps = torch.as_tensor(ptb.eps, dtype=x.dtype, device=x.device)
        if eps.dim() == 1 and eps.shape[0] == x.shape[0]:
            eps = eps.view(-1, *[1] * (x.dim() - 1))
        return x - eps, x + eps

    def _run(self, method: str, C, bound_lower: bool, bound_upper: bool, intermediate: dict | None = None,
             return_A: bool = False):
        """robustkern's ``compute_bounds`` (L2) or ``compute_bounds_box`` (L-inf) for the current input;
        ``intermediate``: stored IBP boxes for CROWN-IBP's backward pass (no second IBP pass); ``return_A``: with
        auto_LiRPA's ``A_dict`` of the final pass."""
        opts = dict(method=method, C=C, sound=self._sound, bound_lower=bound_lower, bound_upper=bound_upper,
                    relu_lower=self._relu_lower, crown_batch_size=self._crown_batch_size, intermediate=intermediate,
                    return_linear=return_A)
        if method == "alpha-CROWN":
            opts["optimize_bound_args"] = self.bound_opts["optimize_bound_args"]
        ptb = self._input.ptb
        if float(ptb.norm) == 2:
            out = self.bm.compute_bounds(self._plain, ptb.eps, norm=2, x_min=-math.inf, x_max=math.inf, **opts)
        else:
            lo, hi = self._box()
            out = self.bm.compute_bounds_box(lo, hi, x=self._plain, **opts)
        if not return_A:
            return out
        lower, upper = out[2]["lower"], out[2]["upper"]
        entry = {"lA": None if lower is None else lower[0], "lbias": None if lower is None else lower[1],
                 "uA": None if upper is None else upper[0], "ubias": None if upper is None else upper[1]}
        return out[0], out[1], {self.output_name[0]: {self.input_name[0]: entry}}

    def _check_needed_A(self, needed_A) -> None:
        """``needed_A_dict`` may name the output node and, under it, the input node only (the final pass's A)."""
        if needed_A is None:
            return
        out, inp = self.output_name[0], self.input_name[0]
        for key, wanted in dict(needed_A).items():
            if key != out or any(name != inp for name in wanted):
                raise NotImplementedError(f"compute_bounds: needed_A_dict may ask for {{{out!r}: {{{inp!r}}}}} "
                                          f"(output over input) only; the facade keeps no other A matrices")


def _refuse_seeded_ibp():
    raise NotImplementedError("compute_bounds: reuse_ibp after a call over CROWN's intermediate bounds: auto_LiRPA's "
                              "IBP bounds there start from CROWN's; pass x=(...) and method='IBP' instead")
