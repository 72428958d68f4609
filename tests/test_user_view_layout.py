"""Models whose forward flattens with ``Tensor.view`` (which needs NCHW-contiguous memory) work on every path
that runs them: bound propagation (IBP, CROWN-IBP, CROWN; the CPU boxes are channels-last internally),
``Smooth`` with default options (a channels-last private copy on the CPU), PGD and the flatness paths. Each
result equals the one of the same weights written with ``nn.Flatten`` / ``reshape`` (or with the layout
optimisation off), on every backend the whole-model tests use.

The models are the seeds' own ``.view`` models (``robustkern.reference.published.seed_models``): CROWN-IBP's / Loss
Landscape Matters' ``model_cnn_2layer`` with ``Flatten = x.view(x.size(0), -1)``, MACER's ``LeNet``
(``x.view(-1, 4*4*50)``) and LFR's / TRADES' ``SmallCNN`` (``features.view(-1, 64*4*4)``)."""
import math

import pytest
import torch
from torch import nn

from robustkern import use_backend
from robustkern.attacks import pgd
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.flatness import input_grad_norm, lfr_loss
from robustkern.reference.published.seed_models import Flatten, LeNet, SmallCNN, model_cnn_2layer
from robustkern.smoothing import Smooth
from robustkern.testing import backends_for

import _devices
from _devices import bound_backend_device_params

bound_device = _devices.bound_device  # the fixture

MODEL_CASES = bound_backend_device_params(backends_for("cpu", include_interpreter=False))


def cnn_2layer(flatten: nn.Module, in_ch=1, in_dim=12, width=1, linear_size=16) -> nn.Sequential:
    """CROWN-IBP's ``model_cnn_2layer`` with the given flatten layer."""
    model = model_cnn_2layer(in_ch, in_dim, width, linear_size)
    model[4] = flatten
    return model


def twin(cls, **kw):
    """The same weights as a ``.view`` model and as a ``reshape`` model."""
    torch.manual_seed(0)
    a = cls(view=True, **kw)
    b = cls(view=False, **kw)
    b.load_state_dict(a.state_dict())
    return a.eval(), b.eval()


# ------------------------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
def test_bounds_of_a_view_model_equal_those_of_its_flatten_twin(backend, bound_device, method):
    torch.manual_seed(1)
    viewed = cnn_2layer(Flatten()).double()
    flat = cnn_2layer(nn.Flatten()).double()
    flat.load_state_dict(viewed.state_dict())
    x = torch.rand(3, 1, 12, 12, dtype=torch.float64, device=bound_device)
    C = margin_spec(torch.tensor([1, 4, 7], device=bound_device), 10).double()
    viewed, flat = viewed.to(bound_device), flat.to(bound_device)
    with use_backend(backend):
        got = BoundedModule(viewed, x).compute_bounds(x, 0.05, method=method, C=C)
        want = BoundedModule(flat, x).compute_bounds(x, 0.05, method=method, C=C)
    for g, w in zip(got, want):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
def test_l2_bounds_and_node_bounds_of_a_view_model(backend, bound_device):
    torch.manual_seed(2)
    viewed = cnn_2layer(Flatten()).double()
    flat = cnn_2layer(nn.Flatten()).double()
    flat.load_state_dict(viewed.state_dict())
    x = torch.rand(2, 1, 12, 12, dtype=torch.float64, device=bound_device)
    viewed, flat = viewed.to(bound_device), flat.to(bound_device)
    with use_backend(backend):
        bv, bf = BoundedModule(viewed, x), BoundedModule(flat, x)
        got, want = bv.compute_bounds(x, 0.3, norm=2), bf.compute_bounds(x, 0.3, norm=2)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
        flat_bounds = {path: (lo, up) for path, lo, up in bf.named_bounds()}
        viewed_bounds = {path: (lo, up) for path, lo, up in bv.named_bounds()}
        assert set(viewed_bounds) == set(flat_bounds) - {"4"}   # the view is a method call, not a module there
        for path, (lo, up) in viewed_bounds.items():
            torch.testing.assert_close(lo, flat_bounds[path][0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(up, flat_bounds[path][1], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ smoothing
@pytest.mark.parametrize("device", _devices.device_params())
def test_smooth_with_default_options_runs_macer_lenet(device):
    viewed, _ = twin(LeNet)
    viewed = viewed.to(device)
    x = torch.rand(2, 1, 28, 28, device=device)
    got = Smooth(viewed, 10, 0.25).certify_batch(x, 20, 60, 0.001, 25, seed=3, return_counts=True)
    want = Smooth(viewed, 10, 0.25, channels_last=False).certify_batch(x, 20, 60, 0.001, 25, seed=3,
                                                                       return_counts=True)
    assert torch.equal(got[2], want[2]) and torch.equal(got[0], want[0])
    smooth = Smooth(viewed, 10, 0.25)
    assert smooth.predict(x[0], 40, 0.01, 16, seed=4) == Smooth(viewed, 10, 0.25, channels_last=False).predict(
        x[0], 40, 0.01, 16, seed=4)
    pred, rad = smooth.certify(x[1], 20, 60, 0.001, 25, seed=5)
    assert (pred, rad) == Smooth(viewed, 10, 0.25, channels_last=False).certify(x[1], 20, 60, 0.001, 25, seed=5)


def test_smooth_asked_for_channels_last_falls_back_on_a_view_model():
    viewed, flat = twin(LeNet)
    x = torch.rand(1, 1, 28, 28)
    got = Smooth(viewed, 10, 0.5, channels_last=True).certify_batch(x, 10, 40, 0.01, 20, seed=1,
                                                                    return_counts=True)[2]
    want = Smooth(flat, 10, 0.5, channels_last=False).certify_batch(x, 10, 40, 0.01, 20, seed=1,
                                                                    return_counts=True)[2]
    assert torch.equal(got, want)


def test_smooth_keeps_channels_last_for_models_that_work_with_it():
    flat = cnn_2layer(nn.Flatten(), in_ch=3, in_dim=8).eval()
    smooth = Smooth(flat, 10, 0.25)
    smooth.certify_batch(torch.rand(1, 3, 8, 8), 5, 5, 0.01, 10, seed=0)
    assert smooth._use_channels_last(torch.rand(1, 3, 8, 8))


# ------------------------------------------------------------------------------------------------ attacks
@pytest.mark.parametrize("device", _devices.device_params())
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_pgd_on_view_models(device, norm):
    for cls in (LeNet, SmallCNN):
        viewed, flat = twin(cls, **({"width": 0.25} if cls is SmallCNN else {}))
        viewed, flat = viewed.to(device), flat.to(device)
        x = torch.rand(3, 1, 28, 28, device=device)
        y = torch.tensor([0, 3, 9], device=device)
        eps = 0.1 if norm == "linf" else 1.0
        torch.manual_seed(7)
        got = pgd(viewed, x, y, eps, eps / 4, 3, norm)
        torch.manual_seed(7)
        want = pgd(flat, x, y, eps, eps / 4, 3, norm)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ flatness
@pytest.mark.parametrize("backend", ["auto", "torch", "fused"])
@pytest.mark.parametrize("p", [1, 2])
def test_input_grad_norm_on_view_models(backend, p):
    # the fused paths take nn.MaxPool2d (SmallCNN), not F.max_pool2d (LeNet: "auto" runs it through autograd)
    for cls in (LeNet, SmallCNN) if backend != "fused" else (SmallCNN,):
        viewed, flat = twin(cls, **({"width": 0.25} if cls is SmallCNN else {}))
        viewed, flat = viewed.double(), flat.double()
        x = torch.rand(3, 1, 28, 28, dtype=torch.float64)
        y = torch.tensor([1, 2, 5])
        got = input_grad_norm(viewed, x, y, p=p, backend=backend)
        want = input_grad_norm(flat, x, y, p=p, backend="torch")
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        (g_got,) = torch.autograd.grad(got.sum(), viewed.fc1.weight if cls is LeNet else viewed.classifier.fc1.weight)
        (g_want,) = torch.autograd.grad(want.sum(), flat.fc1.weight if cls is LeNet else flat.classifier.fc1.weight)
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["auto", "torch", "fused"])
def test_lfr_loss_on_view_models(backend):
    viewed, flat = twin(SmallCNN, width=0.25)
    viewed, flat = viewed.double(), flat.double()
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    y = torch.tensor([1, 2, 5, 0])
    noise = torch.randn_like(x)
    got = lfr_loss(viewed, x, y, epsilon=0.1, step_size=0.02, perturb_steps=3, lam=0.5, noise=noise, backend=backend)
    want = lfr_loss(flat, x, y, epsilon=0.1, step_size=0.02, perturb_steps=3, lam=0.5, noise=noise, backend="torch")
    for g, w in zip(got, want):
        assert math.isfinite(float(g.detach()))
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)
