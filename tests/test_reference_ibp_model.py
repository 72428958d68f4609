"""The hand-written whole-model IBP (robustkern.reference.ibp_model) against brute force."""
import copy

import pytest
import torch
from torch import nn

from robustkern.nn import Normalize
from robustkern.reference.ibp_model import margin_spec, naive_ibp, record_bn_stats, robust_cross_entropy

DTYPE = torch.float64


def conv_net(gen: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(
        Normalize([0.4, 0.5], [0.2, 0.3]),
        nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU()),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Identity(),
        nn.Linear(6, 5),
    )
    return _randomise(net, gen)


def mlp(gen: torch.Generator) -> nn.Sequential:
    net = nn.Sequential(nn.Flatten(), nn.Linear(2 * 8 * 8, 7), nn.ReLU(), nn.Linear(7, 7), nn.ReLU(),
                        nn.Linear(7, 5))
    return _randomise(net, gen)


def _randomise(net, gen):
    """Random weights and non-trivial BatchNorm running statistics and affine parameters."""
    net = net.to(DTYPE)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DTYPE) * 0.5)
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen, dtype=DTYPE) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen, dtype=DTYPE) + 0.5)
    return net.eval()


def random_box(gen, batch=3, eps=0.05):
    x = torch.rand(batch, 2, 8, 8, generator=gen, dtype=DTYPE)
    return x, (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)


def points_in_box(gen, lower, upper, n=200):
    """n points per example: uniform ones and vertices of the box, shape (n, B, ...)."""
    shape = (n,) + lower.shape
    t = torch.rand(shape, generator=gen, dtype=DTYPE)
    t[n // 2:] = t[n // 2:].round()                        # the second half are vertices
    return lower + t * (upper - lower)


def assert_contains(net, lower, upper, C, lb, ub, gen):
    pts = points_in_box(gen, lower, upper)
    with torch.no_grad():
        out = torch.stack([torch.einsum("bsk,bk->bs", C, net(p)) for p in pts])
    slack = 1e-9 * (1 + out.abs())
    assert int((out < lb - slack).sum()) == 0
    assert int((out > ub + slack).sum()) == 0
    assert bool((lb <= ub).all())


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("make_net", [conv_net, mlp])
def test_random_points_stay_inside(make_net, seed):
    gen = torch.Generator().manual_seed(seed)
    net = make_net(gen)
    x, lower, upper = random_box(gen)
    y = torch.randint(5, (len(x),), generator=gen)
    C = margin_spec(y, 5, dtype=DTYPE)
    lb, ub = naive_ibp(net, lower, upper, C)
    assert lb.shape == (len(x), 4)
    assert_contains(net, lower, upper, C, lb, ub, gen)


def test_training_mode_batchnorm_uses_clean_batch_statistics():
    gen = torch.Generator().manual_seed(0)
    net = conv_net(gen).train()
    x, lower, upper = random_box(gen, batch=4)
    C = torch.eye(5, dtype=DTYPE).expand(len(x), -1, -1)
    with pytest.raises(ValueError, match="record_bn_stats"):
        naive_ibp(net, lower, upper, C)
    frozen = copy.deepcopy(net)
    out, stats = record_bn_stats(net, x)
    lb, ub = naive_ibp(net, lower, upper, C, bn_stats=stats)
    # The same network in eval mode with the clean batch's statistics as running statistics.
    for name, bn in net.named_modules():
        if bn in stats:
            mean, var = stats[bn]
            frozen.get_submodule(name).running_mean.copy_(mean.detach())
            frozen.get_submodule(name).running_var.copy_(var.detach())
    frozen.eval()
    torch.testing.assert_close(frozen(x), out)
    lb_eval, ub_eval = naive_ibp(frozen, lower, upper, C)
    torch.testing.assert_close((lb, ub), (lb_eval, ub_eval))
    assert_contains(frozen, lower, upper, C, lb, ub, gen)


SINGLE_LAYERS = {
    "conv": lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1),
    "batchnorm": lambda: nn.BatchNorm2d(2),
    "normalize": lambda: Normalize([0.4, 0.5], [0.2, 0.3]),
    "avgpool": lambda: nn.AvgPool2d(3, stride=2, padding=1),
    "flatten": lambda: nn.Flatten(),
    "relu": lambda: nn.ReLU(),
}


@pytest.mark.parametrize("name", SINGLE_LAYERS)
def test_single_layer_bounds_are_attained(name):
    """Through one affine or monotone layer IBP is exact: every bound is the output at a box vertex."""
    gen = torch.Generator().manual_seed(2)
    net = _randomise(nn.Sequential(SINGLE_LAYERS[name]()), gen)
    _, lower, upper = random_box(gen, batch=2, eps=0.2)
    lb, ub = naive_ibp(net, lower, upper)
    if name == "relu":
        exact_lb, exact_ub = net(lower), net(upper)
    else:  # affine: f(mid) -/+ |J| rad with the Jacobian J of one example
        mid, rad = (upper + lower) / 2, (upper - lower) / 2
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], mid[0])
        jac = jac.reshape(lb[0].numel(), mid[0].numel()).abs()
        spread = torch.stack([(jac @ r.flatten()).reshape(lb[0].shape) for r in rad])
        exact_lb, exact_ub = net(mid) - spread, net(mid) + spread
    torch.testing.assert_close((lb, ub), (exact_lb.detach(), exact_ub.detach()))


@pytest.mark.parametrize("with_spec", [False, True])
def test_single_linear_closed_form(with_spec):
    gen = torch.Generator().manual_seed(1)
    layer = nn.Linear(6, 4).to(DTYPE)
    lower = torch.randn(3, 6, generator=gen, dtype=DTYPE)
    upper = lower + torch.rand(3, 6, generator=gen, dtype=DTYPE)
    W, b = layer.weight.detach(), layer.bias.detach()
    if with_spec:
        C = torch.randn(3, 2, 4, generator=gen, dtype=DTYPE)
        W, b = C @ W, C @ b                                   # (B, S, K), (B, S)
    else:
        C = None
        W, b = W.expand(3, -1, -1), b.expand(3, -1)
    # Each output coordinate is minimised at the vertex taking lower where the weight is positive.
    x_min = torch.where(W > 0, lower[:, None, :], upper[:, None, :])
    x_max = torch.where(W > 0, upper[:, None, :], lower[:, None, :])
    expected_lb = (W * x_min).sum(-1) + b
    expected_ub = (W * x_max).sum(-1) + b
    lb, ub = naive_ibp(nn.Sequential(layer), lower, upper, C)
    torch.testing.assert_close(lb, expected_lb)
    torch.testing.assert_close(ub, expected_ub)


def test_margin_spec_and_robust_cross_entropy():
    logits = torch.randn(5, 10, dtype=DTYPE)
    y = torch.tensor([0, 3, 9, 3, 7])
    margins = torch.einsum("bsk,bk->bs", margin_spec(y, 10, DTYPE), logits)
    expected = torch.stack([logits[i, y[i]] - logits[i][torch.arange(10) != y[i]] for i in range(5)])
    torch.testing.assert_close(margins, expected)
    # With exact margins, robust cross-entropy is the ordinary cross-entropy.
    torch.testing.assert_close(robust_cross_entropy(margins), nn.functional.cross_entropy(logits, y))
