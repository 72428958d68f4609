"""CROWN-IBP's ``bound_layers`` API (``robustkern.compat.crown_ibp``) gives the numbers of the original: the
call sequence of CROWN-IBP's ``train.py`` (``convert``, forward, ``interval_range``, ``backward_range``,
``full_backward_range``, the robust loss and an optimiser step) on its own models (``model_defs``, rewritten in
``robustkern.reference.published.seed_models``) against a float64 transcription of the original's bound computation
(``robustkern.reference.published.crown_ibp``) on the same weights: bounds and bias sums to 1e-6 relative, ReLU
counts exactly, losses and parameter gradients to 1e-6; on every backend the whole-model tests use."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern import use_backend
from robustkern.compat.crown_ibp import BoundConv2d, BoundLinear, BoundSequential
from robustkern.reference.published.crown_ibp import BoundSequentialReference
from robustkern.reference.published.seed_models import (model_cnn_2layer, model_cnn_3layer_fixed, model_cnn_4layer,
                                              model_mlp_any)
from robustkern.testing import backends_for

import _devices
from _devices import bound_backend_device_params

bound_device = _devices.bound_device  # the fixture

MODEL_CASES = bound_backend_device_params(backends_for("cpu", include_interpreter=False))
OPTS = [{}, {"same-slope": True}, {"zero-lb": True}, {"one-lb": True}]
# the seeds' configs' models, at small sizes: (constructor, in_ch, in_dim)
MODELS = {
    "cnn_2layer": (lambda: model_cnn_2layer(1, 8, 1, 8), 1, 8),
    "cnn_3layer_k3": (lambda: model_cnn_3layer_fixed(1, 4, 3, 1, 8), 1, 4),
    "cnn_3layer_k5": (lambda: model_cnn_3layer_fixed(1, 8, 5, 1, 8), 1, 8),
    "cnn_4layer": (lambda: model_cnn_4layer(2, 8, 1, 8), 2, 8),
    "mlp": (lambda: model_mlp_any(36, [20, 12]), 1, 6),
}


def close(got, want, rtol=1e-6):
    """Equal to ``rtol`` relative to the largest magnitude (bounds of different sizes share one scale)."""
    scale = float(want.detach().abs().max()) if want.numel() else 1.0
    torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * max(scale, 1e-12))


def spec(labels, num_class=10):
    """train.py's specification: rows e_y - e_j for j != y, (B, 9, 10), and its scatter indices."""
    eye = torch.eye(num_class, dtype=torch.float64, device=labels.device)
    c = eye[labels].unsqueeze(1) - eye.unsqueeze(0)
    keep = labels.unsqueeze(1) != torch.arange(num_class, device=labels.device).unsqueeze(0)
    sa = torch.tensor([[j if j < i else j + 1 for j in range(num_class - 1)] for i in range(num_class)],
                      device=labels.device)
    return c[keep].view(labels.shape[0], num_class - 1, num_class), sa[labels]


def box(x, eps, std, bounded):
    """train.py's input box for normalised data: ``data -/+ eps / std``, clipped to the data range when
    ``bounded_input`` (mean 0 here)."""
    lo, up = x - eps / std, x + eps / std
    if bounded:
        lo, up = torch.max(lo, -0.0 / std), torch.min(up, 1.0 / std)
    return up, lo


def setup(name, device, seed=0, batch=2):
    make, ch, dim = MODELS[name]
    torch.manual_seed(seed)
    model = make().double().to(device)
    x = torch.rand(batch, ch, dim, dim, dtype=torch.float64, device=device)
    labels = torch.randint(0, 10, (batch,), device=device)
    std = torch.full((1, ch, 1, 1), 0.5, dtype=torch.float64, device=device)
    return model, x, labels, std


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
@pytest.mark.parametrize("name", list(MODELS))
def test_bound_methods_equal_the_original(backend, bound_device, name):
    model, x, labels, std = setup(name, bound_device)
    C, _ = spec(labels)
    x_U, x_L = box(x, 0.1, std, bounded=name != "mlp")
    for opts in OPTS if name == "cnn_2layer" else OPTS[:1]:
        with use_backend(backend):
            ours = BoundSequential.convert(model, opts)
            ref = BoundSequentialReference(model, opts)
            close(ours(x, method_opt="forward"), ref.forward(x))
            got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.1, C=C, method_opt="interval_range")
            want = ref.interval_range(math.inf, x_U, x_L, 0.1, C)
            close(got[0], want[0])
            close(got[1], want[1])
            assert [int(t) for t in got[2:]] == [int(t) for t in want[2:]]
            got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.1, C=C, method_opt="backward_range")
            want = ref.backward_range(math.inf, x_U, x_L, 0.1, C)
            assert got[0].shape == (1,) and got[0].item() == math.inf and float(got[1]) == 0.0
            close(got[2], want[2])
            close(got[3], want[3])
            got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.1, C=C, upper=True, lower=True,
                       method_opt="backward_range")
            want = ref.backward_range(math.inf, x_U, x_L, 0.1, C, upper=True, lower=True)
            for g, w in zip(got, want):
                close(g, w)
            got = ours(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.1, C=C, method_opt="full_backward_range")
            want = ref.full_backward_range(math.inf, x_U, x_L, 0.1, C)
            for g, w in zip(got, want):
                close(g, w)
            # the bounds hold: C f(x) lies between them
            margins = torch.bmm(C, ours(x, method_opt="forward").unsqueeze(-1)).squeeze(-1)
            assert bool((got[2] <= margins + 1e-9).all()) and bool((margins <= got[0] + 1e-9).all())


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
def test_l2_bounds_of_an_mlp_equal_the_original(backend, bound_device):
    model, x, labels, _ = setup("mlp", bound_device)
    C, _ = spec(labels)
    with use_backend(backend):
        ours, ref = BoundSequential.convert(model), BoundSequentialReference(model)
        ours(x, method_opt="forward")
        ref.forward(x)
        got = ours(norm=2, x_U=x, x_L=x, eps=0.4, C=C, method_opt="interval_range")
        want = ref.interval_range(2, x, x, 0.4, C)
        close(got[0], want[0])
        close(got[1], want[1])
        got = ours(norm=2, x_U=x, x_L=x, eps=0.4, C=C, upper=True, lower=True, method_opt="backward_range")
        want = ref.backward_range(2, x, x, 0.4, C, upper=True, lower=True)
        for g, w in zip(got, want):
            close(g, w)


def train_step(model, bounds, opt, x, labels, std, eps, beta, kappa, bound_type):
    """One step of CROWN-IBP's train.py ``Train`` (method robust_natural, bounded input)."""
    C, sa_labels = spec(labels)
    x_U, x_L = box(x, eps, std, bounded=True)
    opt.zero_grad()
    output = bounds(x, "forward")
    regular_ce = F.cross_entropy(output, labels)
    if bound_type == "interval":
        lb = bounds(dict(norm=math.inf, x_U=x_U, x_L=x_L, eps=eps, C=C), "interval_range")[1]
    elif bound_type == "crown-full":
        lb = bounds(dict(norm=math.inf, x_U=x_U, x_L=x_L, eps=eps, C=C, upper=False, lower=True),
                    "full_backward_range")[2]
    else:
        ilb = bounds(dict(norm=math.inf, x_U=x_U, x_L=x_L, eps=eps, C=C), "interval_range")[1]
        clb = bounds(dict(norm=math.inf, x_U=x_U, x_L=x_L, eps=eps, C=C), "backward_range")[2]
        lb = clb * beta + ilb * (1 - beta)
    lb = torch.zeros(x.shape[0], 10, dtype=x.dtype, device=x.device).scatter(1, sa_labels, lb)
    loss = (1 - kappa) * F.cross_entropy(-lb, labels) + kappa * regular_ce
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return loss.detach(), grads


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
@pytest.mark.parametrize("bound_type", ["crown-interval", "interval", "crown-full"])
def test_training_steps_equal_the_original(backend, bound_device, bound_type):
    """Two optimiser steps of train.py (Adam on the converted model's parameters), the original's step on a
    copy of the weights: the same losses and parameter gradients."""
    model, x, labels, std = setup("cnn_4layer" if bound_type != "crown-full" else "cnn_2layer", bound_device, seed=3,
                                  batch=4)
    reference_model = copy.deepcopy(model)
    with use_backend(backend):
        ours = BoundSequential.convert(model, {})
        ref = BoundSequentialReference(reference_model, {})
        opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-3)
        opt_ref = torch.optim.Adam(reference_model.parameters(), lr=1e-3)
        for step in range(2):
            got = train_step(ours, lambda kw, opt: ours(**kw, method_opt=opt) if opt != "forward" else
                             ours(kw, method_opt="forward"), opt_ours, x, labels, std, 0.05, 0.7, 0.4, bound_type)
            want = train_step(reference_model, lambda kw, opt: getattr(ref, opt)(**kw) if opt != "forward" else
                              ref.forward(kw), opt_ref, x, labels, std, 0.05, 0.7, 0.4, bound_type)
            torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-9)
            for g, w in zip(got[1], want[1]):
                close(g, w)
    assert [k for k in ours.state_dict()] == [k for k in model.state_dict()]


def test_float32_on_the_default_backend_is_close_to_float64():
    model, x, labels, std = setup("cnn_4layer", "cpu", seed=5, batch=8)
    C, _ = spec(labels)
    x_U, x_L = box(x, 0.05, std, bounded=True)
    ref = BoundSequentialReference(model)
    ref.forward(x)
    ref.interval_range(math.inf, x_U, x_L, 0.05, C)
    want = ref.backward_range(math.inf, x_U, x_L, 0.05, C)[2]
    ours = BoundSequential.convert(model.float())
    ours(x.float(), method_opt="forward")
    ours(norm=math.inf, x_U=x_U.float(), x_L=x_L.float(), eps=0.05, C=C.float(), method_opt="interval_range")
    got = ours(norm=math.inf, x_U=x_U.float(), x_L=x_L.float(), eps=0.05, C=C.float(), method_opt="backward_range")[2]
    assert got.dtype == torch.float32
    close(got.double(), want, rtol=1e-4)


def test_layers_and_errors():
    model = model_cnn_2layer(1, 12, 1, 16)
    bs = BoundSequential.convert(model, {})
    assert [type(m).__name__ for m in bs] == ["BoundConv2d", "BoundReLU", "BoundConv2d", "BoundReLU",
                                              "BoundFlatten", "BoundLinear", "BoundReLU", "BoundLinear"]
    assert isinstance(bs[0], BoundConv2d) and isinstance(bs[5], BoundLinear)
    assert bs[0].weight is not model[0].weight and torch.equal(bs[0].weight, model[0].weight)
    x = torch.rand(2, 1, 12, 12)
    with pytest.raises(ValueError, match="method_opt"):
        bs(x)
    with pytest.raises(ValueError, match="specification C"):
        bs(norm=math.inf, x_U=x, x_L=x, eps=0.0, C=None, method_opt="backward_range")
    with pytest.raises(TypeError, match="layer 1 is BatchNorm2d"):
        BoundSequential.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU()))
    with pytest.raises(NotImplementedError, match="optimised lower slopes"):
        BoundSequential.convert(model, {"ours": True})
    with pytest.raises(ValueError, match="norm"):
        bs(norm=1, x_U=x, x_L=x, eps=0.0, C=None, method_opt="interval_range")
    wrapped = torch.nn.DataParallel(model)
    assert len(BoundSequential.convert(wrapped)) == len(model)


def test_copies_after_a_bound_call():
    """``copy.deepcopy`` of the model after ``backward_range`` (the kept bounds are part of an autograd graph)
    gives a model that computes the same bounds."""
    model, x, labels, std = setup("cnn_2layer", "cpu", seed=6)
    C, _ = spec(labels)
    x_U, x_L = box(x, 0.05, std, bounded=True)
    bs = BoundSequential.convert(model)
    bs(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.05, C=C, method_opt="interval_range")
    want = bs(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.05, C=C, method_opt="backward_range")[2]
    twin = copy.deepcopy(bs)
    twin(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.05, C=C, method_opt="interval_range")
    close(twin(norm=math.inf, x_U=x_U, x_L=x_L, eps=0.05, C=C, method_opt="backward_range")[2], want)
    assert all(a is not b for a, b in zip(twin.parameters(), bs.parameters()))
