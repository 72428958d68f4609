"""robustkern.compat.auto_lirpa: an auto_LiRPA-style script runs after changing only its import line."""
import math

import numpy as np
import pytest
import torch

from robustkern.bounds import BoundedModule as RKModule, margin_spec
from robustkern.compat.auto_lirpa import BoundedModule, BoundedTensor, PerturbationLpNorm
from test_bounds_ibp import random_sequential


def test_script_style_calls_match_robustkern():
    model = random_sequential(4)
    x = torch.rand(3, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 1, 3]), 4)
    eps = 0.03
    lirpa = BoundedModule(model, torch.zeros(1, 2, 6, 6), bound_opts={"conv_mode": "patches"})
    ptb = PerturbationLpNorm(norm=np.inf, eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1))
    bx = BoundedTensor(x, ptb)
    out = lirpa(bx)
    assert type(out) is torch.Tensor and out.shape == (3, 4)
    rk = RKModule(model, x)
    for method, want in [("IBP", "IBP"), ("crown-ibp", "CROWN-IBP"), ("IBP+backward", "CROWN-IBP"),
                         ("backward", "CROWN"), ("CROWN", "CROWN")]:
        lb, ub = lirpa.compute_bounds(x=(bx,), C=C, method=method)
        rl, ru = rk.compute_bounds(x, eps, C=C, method=want, sound=False)
        torch.testing.assert_close(lb, rl, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(ub, ru, atol=1e-6, rtol=1e-6)
    lb, ub = lirpa.compute_bounds(x=(bx,), C=C, method=None, IBP=True)
    torch.testing.assert_close(lb, rk.compute_bounds(x, eps, C=C, sound=False)[0], atol=1e-6, rtol=1e-6)
    # IBP=True with "backward": IBP intermediate bounds, i.e. CROWN-IBP
    lb, ub = lirpa.compute_bounds(x=(bx,), C=C, method="backward", IBP=True, bound_upper=False)
    assert ub is None
    torch.testing.assert_close(lb, rk.compute_bounds(x, eps, C=C, method="CROWN-IBP", sound=False)[0])
    lb, ub = lirpa.compute_bounds(x=(bx,), C=C, method="CROWN-IBP", bound_lower=False)
    assert lb is None and ub.shape == (3, 3)
    # no x: the last input is reused
    lb2, _ = lirpa.compute_bounds(C=C, method="CROWN-IBP")
    assert lb2.shape == (3, 3)
    # gradients reach the model's parameters
    lb, _ = lirpa.compute_bounds(x=(bx,), C=C, method="CROWN-IBP", bound_upper=False)
    lb.sum().backward()
    assert any(p.grad is not None for p in lirpa.parameters())


def test_unclipped_eps_l2_and_options():
    model = random_sequential(6, bn=False)
    x = torch.rand(2, 2, 6, 6)
    lirpa = BoundedModule(model, x, bound_opts={"activation_bound_option": "same-slope", "crown_batch_size": 8})
    rk = RKModule(model, x)
    lb, ub = lirpa.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(eps=0.02)),), method="CROWN-IBP")
    rl, ru = rk.compute_bounds_box(x - 0.02, x + 0.02, method="CROWN-IBP", sound=False, relu_lower="same-slope")
    torch.testing.assert_close(lb, rl)
    lb, ub = lirpa.compute_bounds(x=(BoundedTensor(x, PerturbationLpNorm(norm=2, eps=0.5)),), method="CROWN")
    rl, ru = rk.compute_bounds(x, 0.5, norm=2, method="CROWN", sound=False, relu_lower="same-slope",
                               x_min=-math.inf, x_max=math.inf)
    torch.testing.assert_close(lb, rl)


def test_unsupported_is_a_clear_error():
    model = random_sequential(6, bn=False)
    x = torch.rand(2, 2, 6, 6)
    lirpa = BoundedModule(model, x)
    bx = BoundedTensor(x, PerturbationLpNorm(eps=0.02))
    with pytest.raises(NotImplementedError, match="not supported"):
        lirpa.compute_bounds(x=(bx,), method="forward")
    with pytest.raises(NotImplementedError, match="return_A"):
        lirpa.compute_bounds(x=(bx,), method="IBP", return_A=True)
    with pytest.raises(ValueError, match="BoundedTensor"):
        lirpa.compute_bounds(x=(x,), method="IBP")
    with pytest.raises(NotImplementedError, match="norm must be inf or 2"):
        PerturbationLpNorm(norm=1, eps=0.1)


def test_crown_optimized_is_alpha_crown_with_the_bound_opts_arguments():
    """auto_LiRPA's "CROWN-Optimized" / "alpha-CROWN" with ``bound_opts["optimize_bound_args"]`` (and
    ``set_bound_opts``) is robustkern's alpha-CROWN with those arguments; a later backward call without x
    gives CROWN."""
    model = random_sequential(6, bn=False)
    x = torch.rand(2, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 2]), 4)
    eps = 0.05
    args = {"iteration": 5, "lr_alpha": 0.3, "lr_decay": 0.9}
    lirpa = BoundedModule(model, x, bound_opts={"optimize_bound_args": dict(args), "sound": True})
    bx = BoundedTensor(x, PerturbationLpNorm(eps=eps, x_L=(x - eps).clamp(0, 1), x_U=(x + eps).clamp(0, 1)))
    rk = RKModule(model, x)
    want = rk.compute_bounds(x, eps, C=C, method="alpha-CROWN", optimize_bound_args=args)
    crown = rk.compute_bounds(x, eps, C=C, method="CROWN")
    for name in ("CROWN-Optimized", "alpha-crown"):
        lb, ub = lirpa.compute_bounds(x=(bx,), C=C, method=name)
        torch.testing.assert_close(lb, want[0], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ub, want[1], rtol=1e-6, atol=1e-6)
    lb, _ = lirpa.compute_bounds(C=C, method="backward")
    torch.testing.assert_close(lb, crown[0], rtol=1e-6, atol=1e-6)
    lirpa.set_bound_opts({"optimize_bound_args": {"iteration": 0}})
    assert lirpa.bound_opts["optimize_bound_args"] == dict(args, iteration=0)
    lb, _ = lirpa.compute_bounds(x=(bx,), C=C, method="CROWN-Optimized", bound_upper=False)
    torch.testing.assert_close(lb, crown[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="unknown key 'iterations'"):
        lirpa.set_bound_opts({"optimize_bound_args": {"iterations": 3}})
    with pytest.raises(NotImplementedError, match="read when the BoundedModule is built"):
        lirpa.set_bound_opts({"activation_bound_option": "same-slope"})
    with pytest.raises(NotImplementedError, match="beta-CROWN"):
        BoundedModule(model, x, bound_opts={"optimize_bound_args": {"enable_beta_crown": True}})
