"""CROWN-IBP and CROWN on whole models: agreement with an independent dense float64 implementation, soundness
(random and PGD points, L-inf and L2, residual model), tightness against IBP, options, training loss,
verified accuracy, bad input. The agreement and soundness tests also run on CUDA (marked gpu; the default
backend, Triton; tests/_devices.py ``bound_device``: cudnn.benchmark off and on, TF32 disallowed)."""
import math

import pytest
import torch
from torch import nn

from robustkern.bounds import (BoundedModule, crown_ibp_beta, crown_ibp_loss, margin_spec, robust_cross_entropy,
                               smoothed_eps, verified_accuracy)
from robustkern.reference.crown import dense_crown
import _devices
from _devices import bound_device_params
from test_bounds_ibp import Residual, count_violations, random_sequential, spec_values

bound_device = _devices.bound_device  # the fixture

METHODS = ["CROWN-IBP", "CROWN"]


def violations(model, x, eps, norm, C, lb, ub, **kw):
    """``count_violations`` on the real-valued network, approximated in float64: the sound CROWN bounds are
    tight to the real network's values (float64 backward pass), and a float32 forward pass is itself off by
    its rounding (~1e-7 relative), which is not what a certificate is about."""
    try:
        return count_violations(model.double(), x.double(), eps.double(), norm, C.double(), lb.double(),
                                ub.double(), **kw)
    finally:
        model.float()


@pytest.mark.parametrize("bound_device", bound_device_params(), indirect=True)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", range(3))
def test_matches_independent_dense_float64_crown(method, seed, bound_device):
    model = random_sequential(seed)
    x = torch.rand(3, 2, 6, 6)
    C = margin_spec(torch.randint(0, 4, (3,)), 4)
    eps = 0.05
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    ref_lb, ref_ub = dense_crown(model.double(), lo.double(), hi.double(), C.double(), method=method.lower())
    model.float()                                                       # the reference: float64 on the CPU
    model, x, C = model.to(bound_device), x.to(bound_device), C.to(bound_device)
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x, eps, C=C, method=method, sound=False)
    slb, sub = bm.compute_bounds(x, eps, C=C, method=method, sound=True)
    assert lb.device == x.device
    lb, ub, slb, sub = lb.cpu(), ub.cpu(), slb.cpu(), sub.cpu()
    scale = float(ref_ub.abs().max() + ref_lb.abs().max())
    torch.testing.assert_close(lb.double(), ref_lb, atol=scale * 1e-5, rtol=1e-5)
    torch.testing.assert_close(ub.double(), ref_ub, atol=scale * 1e-5, rtol=1e-5)
    # sound=True (float64 backward, widened) differs only by rounding-level amounts and is never tighter
    torch.testing.assert_close(slb.double(), ref_lb, atol=scale * 1e-4, rtol=1e-4)
    assert bool((slb <= lb + scale * 1e-5).all() and (sub >= ub - scale * 1e-5).all())


@pytest.mark.parametrize("bound_device", bound_device_params(), indirect=True)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", [math.inf, 2])
@pytest.mark.parametrize("seed", range(2))
def test_no_point_leaves_the_bounds(method, norm, seed, bound_device):
    torch.manual_seed(seed)
    model = random_sequential(200 + seed).to(bound_device)
    x = torch.rand(4, 2, 6, 6).to(bound_device)
    C = margin_spec(torch.randint(0, 4, (4,)), 4).to(bound_device)
    eps = (torch.tensor([0.0, 0.02, 0.1, 0.3]) * (3 if norm == 2 else 1)).to(bound_device)
    lb, ub = BoundedModule(model, x).compute_bounds(x, eps, norm=norm, C=C, method=method)
    assert violations(model, x, eps, norm, C, lb, ub, samples=12, pgd_steps=10) == 0


@pytest.mark.parametrize("bound_device", bound_device_params(), indirect=True)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("norm", [math.inf, 2])
def test_residual_model_is_sound(method, norm, bound_device):
    model = Residual().eval()
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.running_mean.uniform_(-0.3, 0.3)
    model = model.to(bound_device)
    x = torch.rand(3, 1, 6, 6).to(bound_device)
    C = margin_spec(torch.tensor([0, 1, 3]), 4).to(bound_device)
    eps = torch.full((3,), 0.08 * (3 if norm == 2 else 1), device=bound_device)
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x, eps, norm=norm, C=C, method=method, crown_batch_size=20)
    assert violations(model, x, eps, norm, C, lb, ub, samples=12, pgd_steps=10) == 0
    ilb, iub = bm.compute_bounds(x, eps, norm=norm, C=C, method="IBP")
    assert float((ub - lb).mean().detach()) <= float((iub - ilb).mean().detach())


def test_crown_is_tighter_than_ibp_on_average():
    crown_better, crown_ibp_better, n = 0, 0, 0
    for seed in range(6):
        model = random_sequential(300 + seed)
        x = torch.rand(4, 2, 6, 6)
        bm = BoundedModule(model, x)
        w = {}
        for method in ["IBP", "CROWN-IBP", "CROWN"]:
            lb, ub = bm.compute_bounds(x, 0.03, method=method, sound=False)
            w[method] = float((ub - lb).mean().detach())
        crown_better += w["CROWN"] <= w["IBP"] + 1e-6
        crown_ibp_better += w["CROWN-IBP"] <= w["IBP"] + 1e-6
        n += 1
        assert w["CROWN"] <= w["CROWN-IBP"] * 1.05 + 1e-6
    assert crown_better == n and crown_ibp_better >= n - 2


def test_options_chunking_sides_and_relu_slopes():
    model = random_sequential(11)
    x = torch.rand(3, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    bm = BoundedModule(model, x)
    a = bm.compute_bounds(x, 0.05, C=C, method="crown", sound=False)
    b = bm.compute_bounds(x, 0.05, C=C, method="backward", sound=False, crown_batch_size=7)
    torch.testing.assert_close(a, b)
    lb, ub = bm.compute_bounds(x, 0.05, C=C, method="ibp+backward", bound_upper=False)
    assert ub is None and lb.shape == (3, 3)
    lb, ub = bm.compute_bounds(x, 0.05, C=C, method="Crown-IBP", bound_lower=False)
    assert lb is None and ub.shape == (3, 3)
    for mode in ["adaptive", "zero", "one", "same-slope"]:
        lb, ub = bm.compute_bounds(x, 0.05, C=C, method="CROWN-IBP", relu_lower=mode)
        assert violations(model, x, torch.full((3,), 0.05), math.inf, C, lb, ub, samples=8, pgd_steps=0) == 0
    # eps = 0: CROWN is exact up to rounding
    lb0, ub0 = bm.compute_bounds(x, 0.0, C=C, method="CROWN")
    z = spec_values(model.double(), x.double(), C.double()).float()
    model.float()
    assert bool((lb0 <= z).all() and (z <= ub0).all())
    torch.testing.assert_close(lb0, z, atol=1e-4, rtol=1e-4)


def test_explicit_box_equals_clipped_ball_and_bad_input():
    model = random_sequential(12)
    x = torch.rand(2, 2, 6, 6)
    bm = BoundedModule(model, x)
    for method in ["IBP", "CROWN-IBP", "CROWN"]:
        a = bm.compute_bounds(x, 0.04, method=method, sound=False)
        b = bm.compute_bounds_box((x - 0.04).clamp(0, 1), (x + 0.04).clamp(0, 1), method=method, sound=False)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="relu_lower must be one of"):
        bm.compute_bounds(x, 0.1, method="CROWN-IBP", relu_lower="magic")
    with pytest.raises(ValueError, match="lower must be <= upper"):
        bm.compute_bounds_box(x + 0.1, x)
    with pytest.raises(ValueError, match="same shape"):
        bm.compute_bounds_box(x, x[:1])
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bm.compute_bounds(x, -0.1, method="CROWN")
    with pytest.raises(ValueError, match="C must have shape"):
        bm.compute_bounds(x, 0.1, method="CROWN-IBP", C=torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="optimize_bound_args: unknown key 'iterations'"):
        bm.compute_bounds(x, 0.1, method="alpha-CROWN", optimize_bound_args={"iterations": 2})
    with pytest.raises(NotImplementedError, match="beta-CROWN"):
        bm.compute_bounds(x, 0.1, method="CROWN-Optimized", optimize_bound_args={"enable_beta_crown": True})


def test_nan_weights_give_infinite_bounds():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    x = torch.rand(2, 1, 2, 2)
    lb, ub = BoundedModule(model, x).compute_bounds(x, 0.1, method="CROWN-IBP")
    assert not bool(torch.isnan(lb).any() or torch.isnan(ub).any())
    assert bool((lb[torch.isinf(lb)] < 0).all()) and bool(torch.isinf(lb).any())


def test_crown_ibp_loss_mixes_bounds_and_trains():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4)).train()
    x, y = torch.rand(5, 1, 6, 6), torch.randint(0, 4, (5,))
    bm = BoundedModule(model, x)
    l0, i0 = crown_ibp_loss(bm, x, y, 0.02, beta=0.0)
    l1, i1 = crown_ibp_loss(bm, x, y, 0.02, beta=1.0)
    lh, ih = crown_ibp_loss(bm, x, y, 0.02, beta=0.5, kappa=0.25)
    torch.testing.assert_close(ih["lb"], 0.5 * i0["lb"] + 0.5 * i1["lb"])
    torch.testing.assert_close(lh, 0.25 * ih["natural"] + 0.75 * robust_cross_entropy(ih["lb"]))
    C = margin_spec(y, 4)
    ref, _ = bm.compute_bounds(x, 0.02, C=C, method="IBP", sound=False)
    torch.testing.assert_close(i0["lb"], ref)
    lh.backward()
    assert model[0].weight.grad is not None and bool(model[0].weight.grad.abs().sum() > 0)
    assert model[1].weight.grad is not None
    lf, fi = crown_ibp_loss(bm, x, y, 0.02, beta=1.0, loss_fusion=True)  # more in test_crown_loss_fusion.py
    assert fi["lb"] is None and float(lf) >= float(i1["natural"]) - 1e-5
    eps = [smoothed_eps(s, 10, 100, 0.3) for s in range(0, 130, 5)]
    assert eps[0] == 0 and eps[-1] == pytest.approx(0.3) and all(a <= b for a, b in zip(eps, eps[1:]))
    assert crown_ibp_beta(0.0, 0.3) == 1.0 and crown_ibp_beta(0.3, 0.3) == 0.0


def test_verified_accuracy():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.rand(12, 2, 2, 2)
    y = model(x).argmax(1)
    y[:3] = (y[:3] + 1) % 3  # three wrong labels can never be verified
    acc0, mask0 = verified_accuracy(model, x, y, 0.0, return_mask=True)
    assert acc0 == pytest.approx(9 / 12) and not bool(mask0[:3].any())
    accs = [verified_accuracy(model, x, y, e, methods=("IBP",)) for e in (0.01, 0.1)]
    full = verified_accuracy(model, x, y, 0.1)
    assert accs[0] >= accs[1] and full >= accs[1]
    acc64 = verified_accuracy(model, x, y, 0.1, dtype=torch.float64)
    assert acc64 == pytest.approx(full, abs=1 / 12)
    assert next(model.parameters()).dtype == torch.float32
    acc2 = verified_accuracy(model, x, y, 0.2, norm=2, methods=("CROWN-IBP",))
    assert 0.0 <= acc2 <= 0.75


@pytest.mark.parametrize("loss_fusion", [False, True])
def test_crown_ibp_loss_end_weights_leave_out_the_other_term(loss_fusion):
    """kappa = 0 (the default) is the robust loss alone: its backward pass does not run through the clean
    forward (``0 * natural`` would, for nothing); kappa = 1 is the clean loss alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x, y = torch.rand(4, 2, 2, 2), torch.tensor([0, 1, 2, 0])
    bm = BoundedModule(model, x)
    for kappa, kept, left_out in ((0.0, "robust", "logits"), (1.0, "natural", None)):
        loss, info = crown_ibp_loss(bm, x, y, 0.05, beta=0.5, kappa=kappa, loss_fusion=loss_fusion)
        assert loss is info[kept]
        if left_out is not None:
            assert torch.autograd.grad(loss, info[left_out], allow_unused=True)[0] is None
    mixed, info = crown_ibp_loss(bm, x, y, 0.05, beta=0.5, kappa=0.25, loss_fusion=loss_fusion)
    torch.testing.assert_close(mixed, 0.25 * info["natural"] + 0.75 * info["robust"])


@pytest.mark.parametrize("sound", [False, True])
def test_crown_ibp_over_the_ibp_boxes_of_an_earlier_call(sound):
    """``intermediate=bm.node_bounds()`` of an IBP call over the same input: the CROWN-IBP backward pass runs
    over those boxes (no second IBP pass) and gives the numbers of a fresh CROWN-IBP call."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3)).train()
    x = torch.rand(4, 1, 4, 4)
    lo, hi = (x - 0.1).clamp(0, 1), (x + 0.1).clamp(0, 1)
    C = margin_spec(torch.tensor([0, 2, 1, 0]), 3)
    bm = BoundedModule(model, x)
    for box in (True, False):
        run = ((lambda **k: bm.compute_bounds_box(lo, hi, C=C, sound=sound, x=x, **k)) if box else
               (lambda **k: bm.compute_bounds(x, 0.1, C=C, sound=sound, **k)))
        want = run(method="CROWN-IBP")
        run(method="IBP")
        got = run(method="CROWN-IBP", intermediate=bm.node_bounds())
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
        with pytest.raises(ValueError, match="intermediate"):
            run(method="CROWN", intermediate=bm.node_bounds())


@pytest.mark.parametrize("sound", [False, True])
def test_crown_passes_split_to_a_memory_budget_by_default(sound, monkeypatch):
    """Without crown_batch_size, CROWN's intermediate passes on dense rows (every neuron, patches off) take as many
    identity rows as keep their coefficient matrices within CROWN_PASS_BYTES (so a large model does not build
    (neurons x neurons) matrices for a whole layer at once); the bounds equal those of one pass per layer."""
    from robustkern.bounds import crown as crown_mod

    monkeypatch.setattr(crown_mod, "PATCHES", False)
    monkeypatch.setattr(crown_mod, "SPARSE_INTERMEDIATE", False)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(64, 10)).eval()
    x = torch.rand(3, 1, 8, 8)
    C = margin_spec(torch.tensor([0, 1, 2]), 10)
    bm = BoundedModule(model, x)
    with torch.no_grad():   # (with a gradient to record, sound bounds also run an unsound float32 pass)
        whole = bm.compute_bounds(x, 0.05, C=C, method="CROWN", sound=sound, crown_batch_size=10 ** 6)
    rows = []
    pass_ = crown_mod.backward_bound

    def spy(ctx, start, A0, *a, **k):
        rows.append(A0.shape[1])
        return pass_(ctx, start, A0, *a, **k)

    monkeypatch.setattr(crown_mod, "backward_bound", spy)
    itemsize = 8 if sound else 4
    monkeypatch.setattr(crown_mod, "CROWN_PASS_BYTES", 3 * 256 * itemsize * crown_mod.LIVE_MATRICES * 40)
    with torch.no_grad():
        split = bm.compute_bounds(x, 0.05, C=C, method="CROWN", sound=sound)
    # first ReLU input: 256 neurons, widest node 256 -> 40 rows a pass; second: 64 neurons -> 40 rows
    assert rows[:-1] == [40] * 6 + [16] + [40, 24], rows
    assert rows[-1] == C.shape[1]
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
