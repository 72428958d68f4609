"""Models that apply their weights as functions (``F.linear``, ``x.matmul(w.t())``, ``x @ w``, ``F.conv2d``) of their
own parameters, buffers or tensor attributes are bounded like the same model built from nn.Linear / nn.Conv2d:
the same bounds, the same gradients, and bounds that follow the parameters after an optimiser step."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern.bounds import BoundedModule, UnsupportedLayerError, margin_spec, robust_cross_entropy


class ToyMatmul(nn.Module):
    """auto_LiRPA's examples/simple/toy.py shape: plain tensor attributes, ``x.matmul(w.t())``, F.relu."""

    def __init__(self):
        super().__init__()
        self.w1 = torch.tensor([[1.0, -1.0], [2.0, -1.0]])
        self.w2 = torch.tensor([[1.0, -1.0]])

    def forward(self, x):
        return F.relu(x.matmul(self.w1.t())).matmul(self.w2.t())


class FunctionalCNN(nn.Module):
    """Parameters applied with F.conv2d, F.linear and ``@`` (a parameter stored as (in, out))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Parameter(torch.randn(4, 1, 3, 3) * 0.5)
        self.conv_b = nn.Parameter(torch.randn(4) * 0.1)
        self.fc = nn.Parameter(torch.randn(16, 4 * 4 * 4) * 0.2)
        self.fc_b = nn.Parameter(torch.randn(16) * 0.1)
        self.out = nn.Parameter(torch.randn(16, 10) * 0.3)      # used as x @ out

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.conv, self.conv_b, stride=2, padding=1))
        h = F.relu(F.linear(h.flatten(1), self.fc, bias=self.fc_b))
        return h @ self.out


def modular(model: FunctionalCNN) -> nn.Sequential:
    """The same network from nn modules sharing the functional model's parameters' values."""
    seq = nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(64, 16), nn.ReLU(),
                        nn.Linear(16, 10, bias=False))
    with torch.no_grad():
        seq[0].weight.copy_(model.conv)
        seq[0].bias.copy_(model.conv_b)
        seq[3].weight.copy_(model.fc)
        seq[3].bias.copy_(model.fc_b)
        seq[5].weight.copy_(model.out.t())
    return seq


def test_toy_matmul_model_is_the_linear_chain():
    model = ToyMatmul()
    seq = nn.Sequential(nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        seq[0].weight.copy_(model.w1)
        seq[2].weight.copy_(model.w2)
    lower, upper = torch.tensor([[-1.0, -2.0]]), torch.tensor([[2.0, 1.0]])
    for method in ("IBP", "CROWN-IBP", "CROWN"):
        got = BoundedModule(model, lower).compute_bounds_box(lower, upper, method=method, sound=False)
        want = BoundedModule(seq, lower).compute_bounds_box(lower, upper, method=method, sound=False)
        torch.testing.assert_close(got, want)
    assert not [k for k in vars(model) if k.startswith("_tensor_constant")]   # tracing left the model as it was


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_functional_layers_give_the_module_bounds_and_gradients(method):
    torch.manual_seed(0)
    model = FunctionalCNN()
    seq = modular(model)
    x = torch.rand(3, 1, 8, 8)
    y = model(x).argmax(1)
    torch.testing.assert_close(model(x), seq(x), rtol=1e-5, atol=1e-5)
    C = margin_spec(y, 10)
    bm, ref = BoundedModule(model, x), BoundedModule(seq, x)
    for sound in (False, True):
        lb, ub = bm.compute_bounds(x, 0.03, method=method, C=C, sound=sound)
        want = ref.compute_bounds(x, 0.03, method=method, C=C, sound=sound)
        torch.testing.assert_close(lb, want[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ub, want[1], rtol=1e-5, atol=1e-5)
    # the gradient of a robust loss reaches the model's own parameters, equal to the modules'
    robust_cross_entropy(bm.compute_bounds(x, 0.03, method=method, C=C, sound=False, bound_upper=False)[0]).backward()
    robust_cross_entropy(ref.compute_bounds(x, 0.03, method=method, C=C, sound=False,
                                            bound_upper=False)[0]).backward()
    pairs = ((model.conv, seq[0].weight), (model.conv_b, seq[0].bias), (model.fc, seq[3].weight),
             (model.fc_b, seq[3].bias))
    for mine, theirs in pairs:
        assert mine.grad is not None
        torch.testing.assert_close(mine.grad, theirs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.out.grad, seq[5].weight.grad.t(), rtol=1e-4, atol=1e-6)


def test_bounds_follow_an_optimiser_step():
    torch.manual_seed(1)
    model = FunctionalCNN()
    x = torch.rand(2, 1, 8, 8)
    bm = BoundedModule(model, x)
    before = bm.compute_bounds(x, 0.02, method="CROWN-IBP", sound=False)[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).sum().backward()
    opt.step()
    after = bm.compute_bounds(x, 0.02, method="CROWN-IBP", sound=False)[0]
    want = BoundedModule(modular(model), x).compute_bounds(x, 0.02, method="CROWN-IBP", sound=False)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, want, rtol=1e-5, atol=1e-5)


def test_what_is_not_a_functional_layer_is_a_clear_error():
    class TwoTraced(nn.Module):
        def forward(self, x):
            return x @ x.t()

    class MadeInForward(nn.Module):
        def forward(self, x):
            return x @ torch.ones(4, 2)

    class ConstantFirst(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return (self.w @ x.t()).t()

    for model in (TwoTraced(), ConstantFirst()):
        with pytest.raises(UnsupportedLayerError, match="unsupported"):
            BoundedModule(model, torch.rand(2, 4))
    with pytest.raises(UnsupportedLayerError, match="made in forward"):
        BoundedModule(MadeInForward(), torch.rand(2, 4))


def test_functional_model_is_sound_at_sampled_points():
    torch.manual_seed(2)
    model = FunctionalCNN()
    x = torch.rand(2, 1, 8, 8)
    bm = BoundedModule(model, x)
    with torch.no_grad():
        lb, ub = bm.compute_bounds(x, 0.05, method="CROWN", sound=True, x_min=-math.inf, x_max=math.inf)
        for _ in range(50):
            out = model(x + (torch.rand_like(x) * 2 - 1) * 0.05)
            assert bool((lb <= out).all()) and bool((out <= ub).all())
