"""Soundness of the L2 certificates of BCP, LMT and CAP (robustkern.bounds.bcp / lipschitz / cap): points of the
ball found by PGD towards each margin (and random points) are evaluated exactly (robustkern.bounds.exact,
rigorous interval arithmetic) and must not beat a lower bound; for float32 and float64 models, with input
normalisation, strided convolutions, BatchNorm in eval and training mode. BCP's ball and box must contain the
exact activations they describe. The dual bound of the last step is the exact maximum; the training bounds
agree with a faithful transcription of BCP's code."""
import copy
import math

import pytest
import torch
from torch import nn

from robustkern.bounds import BoundedModule, margin_spec
from robustkern.bounds.batch_stats import forward_with_statistics
from robustkern.bounds.bcp import bcp_bounds, bcp_loss, optimal_multiplier, support_ball_box
from robustkern.bounds.cap import cap_bounds, cap_loss, projected_relu_bounds
from robustkern.bounds.exact import exact_forward, exact_spec, to_intervals
from robustkern.bounds.lipschitz import (estimated_norms, lmt_bounds, lmt_loss, power_iteration_for,
                                         propagate_ball, upper_norms)
from robustkern.graph import UnsupportedLayerError, capture
from robustkern.nn import Normalize
from robustkern.reference.published.bcp import bcp_loss_reference, lmt_loss_reference
from robustkern.reference.published.convex_adversarial import relu_bounds_reference, robust_loss_reference
from robustkern.reference.published.convex_adversarial import dual_objective_reference
from test_soundness_property import attack_points, closest, exactly_inside

pytestmark = pytest.mark.usefixtures("one_thread")
CLASSES = 3


def _bn(n):
    bn = nn.BatchNorm2d(n)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.3, 0.3)
    return bn


def _model(kind: str, dtype):
    torch.manual_seed({"mlp": 1, "cnn": 2, "cnn_train_bn": 3}[kind])
    if kind == "mlp":
        model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                              nn.Linear(16, CLASSES))
    else:
        model = nn.Sequential(Normalize([0.4, 0.5], [0.3, 0.25]), nn.Conv2d(2, 4, 3, 2, 1), _bn(4), nn.ReLU(),
                              nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(),
                              nn.Linear(8, CLASSES))
    model = model.to(dtype)
    return model.train() if kind == "cnn_train_bn" else model.eval()


METHODS = {
    "bcp": lambda bm, x, eps, C: bcp_bounds(bm, x, eps, C),
    "lmt": lambda bm, x, eps, C: lmt_bounds(bm, x, eps, C),
    "lmt_pairwise": lambda bm, x, eps, C: lmt_bounds(bm, x, eps, C, last_layer="pairwise"),
    "cap": lambda bm, x, eps, C: cap_bounds(bm, x, eps, C),
}


@pytest.mark.parametrize("kind", ["mlp", "cnn", "cnn_train_bn"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_no_exact_margin_beats_a_certificate(kind, dtype):
    x = torch.rand(3, 2, 7, 7, generator=torch.Generator().manual_seed(7)).to(dtype)
    x64 = x.double()      # the centre of the certified ball, exactly
    model = _model(kind, dtype)
    y = model(x).argmax(1)
    C = margin_spec(y, CLASSES, dtype)
    C64 = C.double()
    bm = BoundedModule(model, x)
    nodes = capture(copy.deepcopy(model).double())
    train_bn = kind == "cnn_train_bn"   # BatchNorm normalises by the clean batch's statistics
    stats = forward_with_statistics(nodes, x64)[1] if train_bn else None
    verified, problems = 0, []
    for eps in (0.02, 0.1, 0.4):
        eps64 = torch.full((3,), eps, dtype=torch.float64)
        pts, vals = attack_points(nodes, stats, x64, eps64, 2.0, 0.0, 1.0, C64, CLASSES - 1, steps=8)
        lbs = {name: bound(bm, x, eps, C).detach().double() for name, bound in METHODS.items()}
        wanted = sorted({(int(i), b) for lb in lbs.values() for row in closest(vals, lb, None, k=2)
                         for b, i in enumerate(row)})
        points = torch.cat([exactly_inside(pts[i][b:b + 1], x64[b:b + 1], eps64[b:b + 1], 2.0, 0.0, 1.0)
                            for i, b in wanted])
        out = exact_forward(model, points, clean_batch=x64 if train_bn else None)
        exact = {key: exact_spec(C64[key[1]:key[1] + 1], out[j:j + 1])[0] for j, key in enumerate(wanted)}
        for name, lb in lbs.items():
            verified += int((lb > 0).sum())
            for (i, b), row in exact.items():
                problems += [f"{name} eps {eps}: exact {row[s]} < {float(lb[b, s])!r} (example {b}, row {s})"
                             for s in range(row.shape[0]) if row[s].b < float(lb[b, s])]
    assert problems == [], "\n".join(problems[:10])
    assert verified > 0   # the certificates are not vacuous here, so the check has something to bite on


def _attained_model(dtype):
    """Flatten - Linear(a b^T, bias 5) - ReLU - Linear(c a^T): the ReLUs stay active on the ball and both weights
    are rank one with matching singular vectors, so ||W2 W1|| = ||W2|| ||W1|| and the margin e_0 - e_1 moves by
    exactly sqrt(2) ||W2|| ||W1|| eps: every certificate here is attained by a point of the ball."""
    g = torch.Generator().manual_seed(11)
    a, b = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(16, generator=g, dtype=torch.float64)
    c = torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.outer(a, b))
        model[1].bias.fill_(5.0)
        model[3].weight.copy_(torch.outer(c, a) * 0.1)
        model[3].bias.copy_(torch.tensor([3.0, 0.0, 0.0]))
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_certificates_are_attained_and_sound_where_the_lipschitz_bound_is_exact(dtype):
    """The margin z_0 - z_1 (label 0) of ``_attained_model``: PGD reaches each certificate to within 1e-7 of the
    margin's scale and no exact value beats it, so a norm bound 0.1% too small would be caught (checked by
    planting one)."""
    model = _attained_model(dtype)
    x = (0.5 + 0.01 * torch.rand(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))).to(dtype)
    x64, eps = x.double(), 0.05
    C = margin_spec(torch.zeros(2, dtype=torch.int64), 3, dtype)[:, :1]     # the row e_0 - e_1
    bm = BoundedModule(model, x)
    eps64 = torch.full((2,), eps, dtype=torch.float64)
    pts, vals = attack_points(capture(copy.deepcopy(model).double()), None, x64, eps64, 2.0, 0.0, 1.0, C.double(), 1,
                              steps=20)
    norms = upper_norms(bm)
    planted = {k: v * 0.999 for k, v in norms.items()}
    bounds = {"bcp": lambda n: bcp_bounds(bm, x, eps, C, norms=n),
              "lmt": lambda n: lmt_bounds(bm, x, eps, C, norms=n),
              "lmt_pairwise": lambda n: lmt_bounds(bm, x, eps, C, norms=n, last_layer="pairwise"),
              "cap": lambda n: cap_bounds(bm, x, eps, C)}
    for name, fn in bounds.items():
        lb = fn(norms).detach().double()
        (i,) = closest(vals, lb, None, k=1)
        for b in range(2):
            p = exactly_inside(pts[int(i[b])][b:b + 1], x64[b:b + 1], eps64[b:b + 1], 2.0, 0.0, 1.0)
            v = exact_spec(C.double()[b:b + 1], exact_forward(model, p))[0][0]
            assert v.b >= float(lb[b, 0]), (name, b, float(v.b) - float(lb[b, 0]))   # sound
            assert float(v.a) - float(lb[b, 0]) < 1e-7 * abs(float(lb[b, 0])) + 1e-7, name   # attained
            if name != "cap":
                assert v.b < float(fn(planted)[b, 0].detach()), name           # a slightly too small norm is caught


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
def test_bcp_ball_and_box_contain_the_exact_activations(dtype):
    """The state before the final layer: every exact activation at PGD and random points lies in the box and
    within ``radius`` of the centre (the squared distance computed in interval arithmetic)."""
    from mpmath import iv
    model = _model("cnn", dtype)
    x = torch.rand(2, 2, 7, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    x64, eps = x.double(), 0.3
    bm = BoundedModule(model, x)
    state, _ = propagate_ball(bm, x, eps, upper_norms(bm), box=True, stop_before_last=True)
    lo, hi = state.box.end_points(True)
    body = copy.deepcopy(model[:-1]).double()
    eps64 = torch.full((2,), eps, dtype=torch.float64)
    pts, _ = attack_points(capture(body), None, x64, eps64, 2.0, 0.0, 1.0, None, 8, steps=5)
    for p in pts:
        for b in range(2):
            q = exactly_inside(p[b:b + 1], x64[b:b + 1], eps64[b:b + 1], 2.0, 0.0, 1.0)
            h = exact_forward(model[:-1], q)[0]
            c = to_intervals(state.center[b])
            dist2 = sum((h[k] - c[k]) ** 2 for k in range(h.shape[0]))
            assert dist2.a <= iv.mpf(float(state.radius[b].detach())) ** 2
            for k in range(h.shape[0]):
                assert h[k].b >= float(lo[b, k].detach()) and h[k].a <= float(hi[b, k].detach())


def _primal_max(q, l, u, r):
    """max q.d over ||d|| <= r, l <= d <= u by bisection on the scale (float64; an independent check)."""
    def d_of(lam):
        return torch.minimum(torch.maximum(q * lam, l), u)
    corner = d_of(torch.tensor(1e300, dtype=torch.float64))
    if corner.norm() <= r:
        return (q * corner).sum(), corner
    lo, hi = 0.0, 1.0
    while d_of(torch.tensor(hi, dtype=torch.float64)).norm() < r:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if d_of(torch.tensor(mid, dtype=torch.float64)).norm() < r else (lo, mid)
    d = d_of(torch.tensor(lo, dtype=torch.float64))
    return (q * d).sum(), d


@pytest.mark.parametrize("case", range(8))
def test_the_dual_bound_is_the_exact_maximum_over_ball_and_box(case):
    g = torch.Generator().manual_seed(case)
    n = [1, 5, 40, 40, 100, 7, 12, 30][case]
    q = torch.randn(n, dtype=torch.float64, generator=g)
    if case == 5:
        q[2:] = 0.0
    l = -torch.rand(n, dtype=torch.float64, generator=g) * (0.05 if case == 6 else 1.0)
    u = torch.rand(n, dtype=torch.float64, generator=g) * (0.05 if case == 6 else 1.0)
    r = torch.tensor([0.3, 0.5, 0.5, 5.0, 1.0, 0.4, 10.0, 1e-3][case], dtype=torch.float64)
    best, d = _primal_max(q, l, u, r)
    h = support_ball_box(q, l, u, r)
    h_sound = support_ball_box(q, l, u, r, sound=True)
    assert float(h) == pytest.approx(float(best), rel=1e-9, abs=1e-12)
    assert h_sound >= h and float(h_sound) <= float(h) + 1e-12 * (1 + abs(float(h)))
    for _ in range(50):   # any feasible point is below the bound
        z = torch.randn(n, dtype=torch.float64, generator=g)
        z = torch.minimum(torch.maximum(z * float(r) / z.norm() * float(torch.rand(1, generator=g)), l), u)
        assert (q * z).sum() <= h_sound
    mu = optimal_multiplier(q, l, u, r)
    for scale in (0.5, 2.0, 10.0):   # a worse multiplier gives a larger, still valid, bound
        assert support_ball_box(q, l, u, r, mu * scale + (1e-3 if float(mu) == 0 else 0.0)) >= h - 1e-12


def test_training_bounds_with_converged_norms_match_the_certificate():
    """On a dense network the rigorous norms equal the converged estimates to ~1e-12, so the unwidened training
    bounds and the certificate agree closely: the rigorous path costs no tightness."""
    model = _model("mlp", torch.float64)
    x = torch.rand(4, 2, 7, 7, dtype=torch.float64)
    C = margin_spec(model(x).argmax(1), CLASSES, torch.float64)
    bm = BoundedModule(model, x)
    est = estimated_norms(bm, power_iteration_for(bm), 3000)
    for fn in (bcp_bounds, lmt_bounds):
        sound = fn(bm, x, 0.2, C)
        train = fn(bm, x, 0.2, C, norms=est, sound=False)
        assert torch.all(sound <= train + 1e-12) and torch.allclose(sound, train.detach(), atol=1e-8)


def test_training_losses_match_the_transcription_of_bcps_code():
    """BCP's net_BCP + BCP_translation (opt_iter 1000) and LMT on its power iterations, transcribed in
    robustkern.reference.published.bcp: the same losses and margin bounds once both power iterations have converged
    (no input clipping, as BCP)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 8, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16), nn.ReLU(), nn.Linear(16, 10)).double()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 10, (6,))
    bm = BoundedModule(model, x)
    power = power_iteration_for(bm)
    norms = estimated_norms(bm, power, 3000)
    free = dict(x_min=-math.inf, x_max=math.inf)
    for eps in (0.1, 0.5):
        loss, lb = bcp_loss(bm, x, y, eps, norms=estimated_norms(bm, power, 0), **free)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        ref_loss, ref_lb, _ = bcp_loss_reference(model, x, y, eps, None, 3000, 1000)
        ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-7)
        assert torch.allclose(lb, ref_lb, atol=1e-7)
        for g, rg in zip(grads, ref_grads):   # at convergence both give the top singular pair's derivative
            assert torch.allclose(g, rg, rtol=1e-3, atol=1e-5)
        loss, lb = lmt_loss(bm, x, y, eps, norms=norms, **free)
        ref_loss, ref_lb, _ = lmt_loss_reference(model, x, y, eps, None, 3000)
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-7)
        assert torch.allclose(lb, ref_lb, atol=1e-7)


def test_bcp_is_at_least_as_tight_as_the_pairwise_lipschitz_bound():
    model = _model("cnn", torch.float64)
    x = torch.rand(5, 2, 7, 7, dtype=torch.float64)
    C = margin_spec(model(x).argmax(1), CLASSES, torch.float64)
    bm = BoundedModule(model, x)
    norms = upper_norms(bm)
    for eps in (0.05, 0.5):
        b = bcp_bounds(bm, x, eps, C, norms=norms)
        p = lmt_bounds(bm, x, eps, C, norms=norms, last_layer="pairwise")
        l = lmt_bounds(bm, x, eps, C, norms=norms)
        assert torch.all(b >= p - 1e-12) and torch.all(p >= l - 1e-12)


def test_gradients_flow_to_every_parameter():
    model = _model("cnn", torch.float32).train()
    x = torch.rand(8, 2, 7, 7)
    y = torch.randint(0, CLASSES, (8,))
    bm = BoundedModule(model, x)
    power = power_iteration_for(bm)
    losses = {
        "bcp": lambda: bcp_loss(bm, x, y, 0.1, norms=estimated_norms(bm, power))[0],
        "lmt": lambda: lmt_loss(bm, x, y, 0.1, norms=estimated_norms(bm, power))[0],
        "lmt_pairwise": lambda: lmt_loss(bm, x, y, 0.1, norms=estimated_norms(bm, power), last_layer="pairwise")[0],
        "cap": lambda: cap_loss(bm, x, y, 0.1)[0],
        "cap_projected": lambda: cap_loss(bm, x, y, 0.1, projections=5)[0],
    }
    for name, fn in losses.items():
        model.zero_grad()
        fn().backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, (name, pname)


def test_bounds_are_differentiable_in_the_input_and_the_norms():
    """gradcheck in float64 of the ball walk, BCP's box and dual last step, and LMT's pairwise bound, with respect
    to the input and to the layers' operator norms."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.rand(2, 1, 2, 3, dtype=torch.float64, requires_grad=True)
    C = margin_spec(torch.tensor([0, 2]), 3, torch.float64)
    bm = BoundedModule(model, x.detach())
    names = [n.name for n in bm.nodes if n.kind == "linear"]
    s1 = torch.linalg.matrix_norm(model[1].weight.detach(), 2).requires_grad_(True)
    s2 = torch.linalg.matrix_norm(model[3].weight.detach(), 2).requires_grad_(True)
    for fn, kw in ((bcp_bounds, {}), (lmt_bounds, {"last_layer": "pairwise"}), (lmt_bounds, {})):
        assert torch.autograd.gradcheck(
            lambda xx, a, b: fn(bm, xx, 0.3, C, norms={names[0]: a, names[1]: b}, sound=False, **kw), (x, s1, s2))


@pytest.mark.parametrize("norm,eps", [(2.0, 0.3), (math.inf, 0.02)], ids=["l2", "linf"])
def test_cap_projection_estimate(norm, eps):
    """With at least as many directions as dimensions the projections are identity matrices and the estimate is
    CAP's exact dual bound (robustkern's CROWN with same-slope relaxations, up to its intersection with IBP);
    with fewer it estimates the intermediate bounds closely (Gaussian directions for L2, Cauchy medians for L-inf
    and the ReLU terms); it is never offered as a certificate."""
    model = _model("mlp", torch.float64)
    x = torch.rand(4, 2, 7, 7, dtype=torch.float64)
    C = margin_spec(model(x).argmax(1), CLASSES, torch.float64)
    bm = BoundedModule(model, x)
    free = dict(x_min=-math.inf, x_max=math.inf)
    exact = cap_bounds(bm, x, eps, C, norm=norm, sound=False, **free)
    full = cap_bounds(bm, x, eps, C, norm=norm, sound=False, projections=1000, **free)
    assert torch.allclose(full, exact, rtol=1e-6, atol=1e-9)
    eps_b = torch.full((4,), eps, dtype=torch.float64)
    ref = projected_relu_bounds(bm, x, eps_b, norm, 1000)
    g = torch.Generator().manual_seed(0)
    # 98 input dimensions, 16 units per hidden layer: 60 directions project the input term only, 12 every term
    single, tol = projected_relu_bounds(bm, x, eps_b, norm, 60, generator=g), (0.1 if norm == 2 else 0.25)
    draws = [projected_relu_bounds(bm, x, eps_b, norm, 12, generator=g) for _ in range(40)]
    for name, (lo, hi) in ref.items():
        rel = ((single[name][1] - single[name][0]) / (hi - lo) - 1).abs()
        assert rel.median() < tol, (name, rel.median())
        ratios = torch.stack([(d[name][1] - d[name][0]) / (hi - lo) for d in draws])
        typical = (ratios.median(0).values - 1).abs()          # the estimate's typical value, unit by unit
        assert typical.median() < (0.1 if norm == 2 else 0.2), (name, typical.median())
    with pytest.raises(ValueError, match="not a bound"):
        cap_bounds(bm, x, eps, C, norm=norm, projections=50)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_cap_is_convex_adversarials_dual_network_bound(kind, norm):
    """The exact bound (projections=0, unwidened, no input clipping) against the transcription of
    convex_adversarial's DualNetwork and robust_loss: the same margins, loss and parameter gradients where
    robustkern's intersection with IBP does not bite, and never looser where it does (a large radius)."""
    torch.manual_seed(5)
    if kind == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(32, 20), nn.ReLU(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5))
        x = torch.rand(6, 2, 4, 4, dtype=torch.float64)
    else:
        net = nn.Sequential(nn.Conv2d(2, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 4, 3, 1, 1), nn.ReLU(), nn.Flatten(),
                            nn.Linear(64, 10), nn.ReLU(), nn.Linear(10, 5))
        x = torch.rand(6, 2, 8, 8, dtype=torch.float64)
    net = net.double()
    y = torch.randint(0, 5, (6,))
    bm = BoundedModule(net, x)
    p = 2.0 if norm == "l2" else math.inf
    eps = 0.1 if norm == "l2" else 0.01
    free = dict(x_min=-math.inf, x_max=math.inf)
    loss, lb = cap_loss(bm, x, y, eps, norm=p, **free)
    grads = torch.autograd.grad(loss, list(net.parameters()))
    ref_loss, _ = robust_loss_reference(net, eps, x, y, norm)
    ref_grads = torch.autograd.grad(ref_loss, list(net.parameters()))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-10)
    for g, rg in zip(grads, ref_grads):
        assert torch.allclose(g, rg, rtol=1e-7, atol=1e-10)
    C = margin_spec(y, 5, torch.float64)
    for radius in (eps, 10 * eps):
        ours = cap_bounds(bm, x, radius, C, norm=p, sound=False, **free).detach()
        ref = dual_objective_reference(list(net.children()), relu_bounds_reference(net, x, radius, norm), x, radius,
                                       C, norm).detach()
        assert torch.all(ours >= ref - 1e-10)
        if radius == eps:
            assert torch.allclose(ours, ref, rtol=1e-10, atol=1e-12)


def test_cap_linf_certificate_is_sound():
    model = _model("cnn", torch.float32)
    x = torch.rand(2, 2, 7, 7)
    x64 = x.double()
    C = margin_spec(model(x).argmax(1), CLASSES)
    bm = BoundedModule(model, x)
    nodes = capture(copy.deepcopy(model).double())
    eps64 = torch.full((2,), 0.03, dtype=torch.float64)
    lb = cap_bounds(bm, x, 0.03, C, norm=math.inf).double()
    pts, vals = attack_points(nodes, None, x64, eps64, math.inf, 0.0, 1.0, C.double(), CLASSES - 1, steps=8)
    order = closest(vals, lb, None, k=2)
    for k in range(order.shape[0]):
        for b in range(2):
            p = exactly_inside(pts[int(order[k, b])][b:b + 1], x64[b:b + 1], eps64[b:b + 1], math.inf, 0.0, 1.0)
            row = exact_spec(C.double()[b:b + 1], exact_forward(model, p))[0]
            assert all(row[s].b >= float(lb[b, s]) for s in range(row.shape[0]))


def test_models_the_lipschitz_methods_cannot_take_are_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 3)

        def forward(self, x):
            return self.b(x + torch.relu(self.a(x)))

    model = Residual()
    x = torch.rand(2, 4)
    C = margin_spec(torch.tensor([0, 1]), 3)
    bm = BoundedModule(model, x)
    with pytest.raises(UnsupportedLayerError, match="chain"):
        bcp_bounds(bm, x, 0.1, C)
    with pytest.raises(UnsupportedLayerError, match="chain"):
        lmt_bounds(bm, x, 0.1, C)
    assert cap_bounds(bm, x, 0.1, C).shape == (2, 2)      # the exact dual bound takes any captured graph
    with pytest.raises(UnsupportedLayerError):
        cap_bounds(bm, x, 0.1, C, sound=False, projections=2)
    with pytest.raises(ValueError, match="last_layer"):
        lmt_bounds(BoundedModule(_model("mlp", torch.float32), torch.rand(1, 2, 7, 7)), torch.rand(1, 2, 7, 7), 0.1,
                   margin_spec(torch.tensor([0]), 3), last_layer="all")
