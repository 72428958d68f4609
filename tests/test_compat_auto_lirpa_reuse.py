"""robustkern.compat.auto_lirpa: auto_LiRPA's rule for the intermediate bounds a call leaves behind.

auto_LiRPA keeps every node's bounds on its graph until the input is set again (``forward`` or
``compute_bounds(x=...)``); a ``compute_bounds(x=None)`` call reuses them. So IBP followed by
``compute_bounds(IBP=False, method="backward")`` is CROWN-IBP, not CROWN (``examples/vision/simple_training.py``).
"""
import math

import numpy as np
import pytest
import torch
from torch import nn

from robustkern.bounds import BoundedModule as RKModule, crown_ibp_loss, margin_spec, robust_cross_entropy
from robustkern.bounds.ibp import propagate
from robustkern.compat.auto_lirpa import BoundedModule, BoundedTensor, PerturbationLpNorm


def _cnn(bn: bool = False) -> nn.Module:
    torch.manual_seed(1)
    layers = [nn.Conv2d(1, 4, 3, stride=2, padding=1)] + ([nn.BatchNorm2d(4)] if bn else []) + [
        nn.ReLU(), nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 4 * 4, 16),
        nn.ReLU(), nn.Linear(16, 5)]
    return nn.Sequential(*layers)


def _case(eps: float = 0.1, batch: int = 6):
    x = torch.rand(batch, 1, 14, 14)
    y = torch.randint(0, 5, (batch,))
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    return x, y, lo, hi, margin_spec(y, 5)


def _setup(bn: bool = False, **opts):
    """A model, its case, the facade on it and the batch as a BoundedTensor over the clipped box."""
    model = _cnn(bn)
    x, y, lo, hi, C = _case()
    lirpa = BoundedModule(model, torch.zeros(2, 1, 14, 14), **opts)
    xb = BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=0.1, x_L=lo, x_U=hi))
    return model, x, y, lo, hi, C, lirpa, xb


def _rk(model, x, lo, hi, C, method):
    return RKModule(model, x).compute_bounds_box(lo, hi, method=method, C=C, sound=False, x=x)[0]


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_ibp_then_backward_without_input_is_crown_ibp():
    model, x, y, lo, hi, C, lirpa, xb = _setup(bound_opts={"activation_bound_option": None})
    ilb, iub = lirpa.compute_bounds(x=(xb,), IBP=True, method=None, C=C)
    clb, cub = lirpa.compute_bounds(IBP=False, C=C, method="backward", bound_upper=False)
    assert cub is None and iub is not None
    _close(ilb, _rk(model, x, lo, hi, C, "IBP"))
    _close(clb, _rk(model, x, lo, hi, C, "CROWN-IBP"))
    # the two methods differ on this case, so the rule decides the answer
    assert not torch.allclose(clb, _rk(model, x, lo, hi, C, "CROWN"), rtol=1e-3, atol=1e-3)


def test_example_call_sequence_forward_ibp_backward(monkeypatch):
    """simple_training.py: ``model(x)``, then both calls without ``x``; one IBP pass in all (the backward pass
    runs over the first call's boxes, as in auto_LiRPA); the gradients are CROWN-IBP's too."""
    import robustkern.bounds.module as engine
    passes = []
    monkeypatch.setattr(engine, "propagate", lambda *a, **k: passes.append(1) or propagate(*a, **k))
    model, x, y, lo, hi, C, lirpa, xb = _setup()
    out = lirpa(xb)
    ilb, _ = lirpa.compute_bounds(IBP=True, C=C, method=None)
    clb, _ = lirpa.compute_bounds(IBP=False, C=C, method="backward", bound_upper=False)
    assert len(passes) == 1
    monkeypatch.undo()
    factor = 0.3
    loss = robust_cross_entropy(clb * factor + ilb * (1 - factor)) + 0 * out.sum()
    loss.backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    rk = RKModule(model, x)
    ref, info = crown_ibp_loss(rk, x, y, 0.1, beta=factor, sound=False)
    _close(loss, ref)
    ref.backward()
    for g, p in zip(got, model.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6)


def test_given_input_or_forward_clears_the_stored_bounds():
    model, x, y, lo, hi, C, lirpa, xb = _setup()
    crown = _rk(model, x, lo, hi, C, "CROWN")
    lirpa.compute_bounds(x=(xb,), IBP=True, method=None, C=C)
    _close(lirpa.compute_bounds(x=(xb,), C=C, method="backward", bound_upper=False)[0], crown)
    lirpa.compute_bounds(x=(xb,), IBP=True, method=None, C=C)
    lirpa(xb)  # a forward sets the input again
    _close(lirpa.compute_bounds(C=C, method="backward", bound_upper=False)[0], crown)
    # CROWN's own intermediate bounds are reused by a CROWN call without input: the same numbers again
    _close(lirpa.compute_bounds(C=C, method="CROWN", bound_upper=False)[0], crown)
    # a new input without any bounds yet: CROWN
    lirpa(xb)
    _close(lirpa.compute_bounds(C=C, method="backward", bound_upper=False)[0], crown)


def test_ibp_flag_with_backward_and_crown_ibp_after_ibp():
    model, x, y, lo, hi, C, lirpa, xb = _setup()
    want = _rk(model, x, lo, hi, C, "CROWN-IBP")
    lirpa.compute_bounds(x=(xb,), method="IBP", C=C)
    _close(lirpa.compute_bounds(C=C, method="CROWN-IBP")[0], want)
    # after a CROWN-IBP call the stored bounds are IBP's: a following plain backward call is CROWN-IBP too
    _close(lirpa.compute_bounds(C=C, method="backward")[0], want)
    # a different specification in the second call: the intermediate bounds do not depend on C
    C2 = margin_spec((y + 1) % 5, 5)
    lirpa.compute_bounds(x=(xb,), method="IBP", C=C)
    _close(lirpa.compute_bounds(C=C2, method="backward")[0], _rk(model, x, lo, hi, C2, "CROWN-IBP"))


def test_ibp_returns_both_sides_and_reuse_ibp():
    model, x, y, lo, hi, C, lirpa, xb = _setup()
    with pytest.raises(ValueError, match="no IBP bounds"):
        lirpa.compute_bounds(x=(xb,), IBP=True, method=None, reuse_ibp=True)
    ilb, iub = lirpa.compute_bounds(x=(xb,), IBP=True, method=None, C=C, bound_upper=False)
    assert iub is not None  # auto_LiRPA's IBP returns both sides
    rlb, rub = lirpa.compute_bounds(IBP=True, method=None, reuse_ibp=True)
    assert rlb is ilb and rub is iub
    # after CROWN-IBP, reuse_ibp gives that call's IBP bounds (its own C)
    C2 = margin_spec((y + 2) % 5, 5)
    lirpa.compute_bounds(x=(xb,), C=C2, method="CROWN-IBP")
    rlb, _ = lirpa.compute_bounds(method="IBP", reuse_ibp=True)
    _close(rlb, _rk(model, x, lo, hi, C2, "IBP"))


@pytest.mark.parametrize("change", ["adam", "sgd", "load_state_dict", "new_perturbation", "eval_mode"])
def test_a_change_since_the_stored_bounds_is_an_error(change):
    """auto_LiRPA would reuse bounds computed before the change (stale); the facade says so instead."""
    model, x, y, lo, hi, C, lirpa, xb = _setup(bn=True)
    lirpa.train()
    lirpa(xb)
    ilb, _ = lirpa.compute_bounds(IBP=True, C=C, method=None)
    if change in ("adam", "sgd"):
        opt = (torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True) if change == "adam"
               else torch.optim.SGD(model.parameters(), lr=1e-3))
        robust_cross_entropy(ilb).backward()
        opt.step()
    elif change == "load_state_dict":
        model.load_state_dict({k: v + 0.01 for k, v in model.state_dict().items()})
    elif change == "new_perturbation":
        xb.ptb = PerturbationLpNorm(norm=np.inf, eps=0.05, x_L=(x - 0.05).clamp(0, 1), x_U=(x + 0.05).clamp(0, 1))
    else:
        lirpa.eval()
    with pytest.raises(ValueError, match="changed since"):
        lirpa.compute_bounds(IBP=False, C=C, method="backward", bound_upper=False)
    # giving the input again recomputes everything
    lirpa.compute_bounds(x=(xb,), IBP=False, C=C, method="backward", bound_upper=False)


def test_ibp_without_input_after_crown_is_refused():
    model, x, y, lo, hi, C, lirpa, xb = _setup()
    lirpa.compute_bounds(x=(xb,), C=C, method="CROWN")
    with pytest.raises(NotImplementedError, match="pass x="):
        lirpa.compute_bounds(C=C, method="IBP")
    # CROWN-IBP over CROWN's stored intermediate bounds is the CROWN bound itself
    _close(lirpa.compute_bounds(C=C, method="CROWN-IBP")[0], _rk(model, x, lo, hi, C, "CROWN"))


def test_l2_and_eps_only_perturbations_reuse_too():
    model = _cnn()
    x, y, lo, hi, C = _case()
    lirpa = BoundedModule(model, x)
    rk = RKModule(model, x)
    xb = BoundedTensor(x, PerturbationLpNorm(norm=2, eps=0.5))
    lirpa(xb)
    lirpa.compute_bounds(IBP=True, C=C, method=None)
    got = lirpa.compute_bounds(C=C, method="backward")[0]
    _close(got, rk.compute_bounds(x, 0.5, norm=2, C=C, method="CROWN-IBP", sound=False, x_min=-math.inf,
                                  x_max=math.inf)[0])
    xb = BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=0.05))
    lirpa(xb)
    lirpa.compute_bounds(IBP=True, C=C, method=None)
    _close(lirpa.compute_bounds(C=C, method="backward")[0],
           rk.compute_bounds_box(x - 0.05, x + 0.05, C=C, method="CROWN-IBP", sound=False)[0])


def test_activation_bound_option():
    model = _cnn()
    x, y, lo, hi, C = _case()
    xb = BoundedTensor(x, PerturbationLpNorm(norm=np.inf, eps=0.1, x_L=lo, x_U=hi))
    got = {}
    for opt in (None, "adaptive", "same-slope", "zero-lb", "one-lb"):
        lirpa = BoundedModule(model, x, bound_opts={"activation_bound_option": opt, "conv_mode": "patches"})
        got[opt] = lirpa.compute_bounds(x=(xb,), C=C, method="CROWN-IBP")[0]
    _close(got[None], got["adaptive"])  # auto_LiRPA: None (the example's default) is the adaptive lower slope
    rk = RKModule(model, x)
    for opt, mode in (("same-slope", "same-slope"), ("zero-lb", "zero"), ("one-lb", "one")):
        _close(got[opt], rk.compute_bounds_box(lo, hi, C=C, method="CROWN-IBP", sound=False, relu_lower=mode)[0])
    with pytest.raises(ValueError, match="activation_bound_option"):
        BoundedModule(model, x, bound_opts={"activation_bound_option": "sigmoid-ish"})
