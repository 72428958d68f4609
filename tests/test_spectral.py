"""Operator norms (robustkern.bounds.spectral): the verification bound is an upper bound of the exact norm of the
stored weights (checked in 60-digit arithmetic for small matrices, against the explicit operator matrix for
convolutions) and tight; power iteration converges from below, keeps its iterate across calls and has the
gradient of the top singular value."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern.bounds import BoundedModule
from robustkern.bounds.lipschitz import power_iteration_for
from robustkern.bounds.spectral import conv_norm_upper, gram_upper, matrix_norm_upper


def _sigma_mp(W: torch.Tensor):
    """The exact largest singular value of the stored matrix, to 60 digits (mpmath)."""
    import mpmath
    mpmath.mp.dps = 60
    A = mpmath.matrix([[mpmath.mpf(float(v)) for v in row] for row in W.double().tolist()])
    G = A.T * A
    return mpmath.sqrt(max(mpmath.eigsy(G)[0]))


def _matrices():
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(5, 5, generator=g, dtype=torch.float64))
    s = torch.tensor([3.0, 3.0, 3.0 - 1e-12, 1e-3, 0.0], dtype=torch.float64)   # top singular value, multiplicity 3
    repeated = (u[:, :5] * s) @ v.t()
    return {
        "random": torch.randn(7, 5, generator=g),
        "wide": torch.randn(3, 8, generator=g),
        "repeated top": repeated.float(),
        "rank one": torch.outer(torch.randn(6, generator=g), torch.randn(4, generator=g)),
        "ill-conditioned": torch.diag(torch.tensor([1.0, 1e-7, 1e-20])) @ torch.randn(3, 3, generator=g),
        "tiny entries": torch.randn(4, 4, generator=g) * 1e-30,
        "huge entries": torch.randn(4, 4, generator=g).double() * 1e250,
        "zero": torch.zeros(3, 2),
        "one entry": torch.tensor([[-2.5]]),
    }


@pytest.mark.parametrize("name", list(_matrices()))
def test_matrix_bound_is_above_the_exact_norm_and_tight(name):
    W = _matrices()[name]
    up = matrix_norm_upper(W)
    exact = _sigma_mp(W)
    assert up >= exact
    assert up <= float(exact) * (1 + 1e-3) + 1e-300
    if name not in ("repeated top",):
        assert up <= float(exact) * (1 + 1e-9) + 1e-300


def test_batched_gram_bound_matches_each_matrix():
    g = torch.Generator().manual_seed(1)
    M = torch.randn(5, 6, 9, generator=g, dtype=torch.float64)
    up = gram_upper(M)
    exact = torch.linalg.matrix_norm(M, 2)
    assert torch.all(up >= exact) and torch.all(up <= exact * (1 + 1e-9))


def _conv_matrix(w, hw, **kw):
    c = w.shape[1] * kw.get("groups", 1)
    n = c * hw[0] * hw[1]
    eye = torch.eye(n, dtype=torch.float64).reshape(n, c, *hw)
    return F.conv2d(eye, w.double(), None, **kw).reshape(n, -1).t()


@pytest.mark.parametrize("o,c,k,stride,padding,hw,dilation,groups", [
    (8, 3, 3, 1, 1, (8, 8), 1, 1),
    (16, 8, 4, 2, 1, (10, 10), 1, 1),
    (6, 4, 3, 2, 0, (9, 7), 1, 2),
    (5, 3, 3, 1, 2, (8, 8), 2, 1),
    (4, 2, 5, 3, 2, (11, 13), 1, 1),
    (3, 1, 1, 1, 0, (5, 5), 1, 1),
])
def test_conv_bound_is_above_the_operator_norm(o, c, k, stride, padding, hw, dilation, groups):
    """Against the norm of the explicit matrix of the convolution (float64 SVD, ~1e-15 relative): above it, and
    within the boundary gap of a small image (zero padding vs the circular embedding)."""
    torch.manual_seed(o * 100 + k)
    w = torch.randn(o, c // groups, k, k)
    up = conv_norm_upper(w, hw, stride, padding, dilation, groups)
    exact = torch.linalg.matrix_norm(_conv_matrix(w, hw, stride=stride, padding=padding, dilation=dilation,
                                                  groups=groups), 2).item()
    assert exact * (1 + 1e-12) <= up <= exact * 1.3   # dilation 2 on 8x8: the widest gap here, 28%


def test_conv_bound_is_tight_on_a_large_image():
    torch.manual_seed(3)
    w = torch.randn(4, 1, 3, 3)
    up = conv_norm_upper(w, (28, 28), 1, 1)
    exact = torch.linalg.matrix_norm(_conv_matrix(w, (28, 28), padding=1), 2).item()
    assert exact <= up <= exact * 1.01


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, 2, 1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6))


def _power(net, seed=0):
    bm = BoundedModule(net, torch.zeros(1, 2, 7, 7))
    return bm.nodes, power_iteration_for(bm, seed)


def test_power_iteration_converges_from_below_on_the_operator():
    """A stride-2 convolution on an odd-sized input (its adjoint needs an output padding) and a linear layer."""
    net = _net()
    nodes, power = _power(net)
    conv, lin = (n for n in nodes if n.kind in ("conv2d", "linear"))
    exact_conv = torch.linalg.matrix_norm(_conv_matrix(net[0].weight, (7, 7), stride=2, padding=1), 2).item()
    exact_lin = torch.linalg.matrix_norm(net[3].weight.double(), 2).item()
    for node, exact in ((conv, exact_conv), (lin, exact_lin)):
        w = node.module.weight
        few = power.estimate(node, w, steps=1).item()
        many = power.estimate(node, w, steps=2000, tol=1e-9).item()
        assert few <= exact * (1 + 1e-6) and many <= exact * (1 + 1e-6)
        assert many == pytest.approx(exact, rel=1e-5)


def test_power_iteration_keeps_its_iterate_across_calls():
    net = _net()
    nodes, a = _power(net, seed=5)
    _, b = _power(net, seed=5)
    conv = next(n for n in nodes if n.kind == "conv2d")
    for _ in range(4):
        a.estimate(conv, conv.module.weight, steps=1)
    est_b = b.estimate(conv, conv.module.weight, steps=4)
    assert torch.allclose(a.iterates[conv.name], b.iterates[conv.name], atol=1e-6)
    state = a.state_dict()
    _, c = _power(net, seed=99)
    c.load_state_dict(state)
    assert c.estimate(conv, conv.module.weight, steps=0).item() == pytest.approx(est_b.item(), rel=1e-6)


def test_power_iteration_gradient_is_the_top_singular_pair():
    torch.manual_seed(2)
    lin = nn.Linear(5, 4).double()
    bm = BoundedModule(nn.Sequential(lin), torch.zeros(1, 5, dtype=torch.float64))
    est = power_iteration_for(bm).estimate(bm.nodes[1], lin.weight, steps=500)
    (g,) = torch.autograd.grad(est, lin.weight)
    w = lin.weight.detach().clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad(torch.linalg.matrix_norm(w, 2), w)
    assert torch.allclose(g, g_exact, atol=1e-8)
    assert est.item() == pytest.approx(math.sqrt(torch.linalg.eigvalsh(w.detach().t() @ w.detach())[-1].item()))


def test_power_iteration_refuses_iterates_of_another_model():
    nodes, a = _power(_net())
    conv = next(n for n in nodes if n.kind == "conv2d")
    a.estimate(conv, conv.module.weight, steps=1)
    other = BoundedModule(nn.Sequential(nn.Flatten(), nn.Linear(2 * 7 * 7, 3)), torch.zeros(1, 2, 7, 7))
    with pytest.raises(ValueError, match="does not fit this model"):
        power_iteration_for(other).load_state_dict(a.state_dict())
