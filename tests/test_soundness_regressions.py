"""False certificates found by attacking the bounds, each kept as a test: the exact value of the network (rigorous
interval arithmetic, robustkern.bounds.exact) must lie inside every sound bound.

1. training-mode BatchNorm statistics of older weights reused; 2. one BatchNorm module applied twice; 3. batch
statistics of a channel with a large mean and a small spread; 4. autocast; 5. a float64 specification on a float32
model; 6. an L2 radius that float32 rounds down; 7. a float64 centre on a float32 model; 8. cancelling terms in
the backward sums, and float64 models at eps = 0; 10. a global float32 matmul precision below IEEE.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern import _backend, use_backend
from robustkern.bounds import BoundedModule, margin_spec, verified_accuracy
from robustkern.bounds.exact import exact_forward, exact_spec, inside_l2, violations
from robustkern.testing import backends_for

from test_bounds_ibp import random_sequential

METHODS = ["IBP", "CROWN-IBP", "CROWN"]


def exact_misses(model, x, lb, ub, C=None, clean_batch=None):
    return violations(exact_spec(C, exact_forward(model, x, clean_batch=clean_batch)), lb, ub)


# ------------------------------------------------------------------------------------------ training-mode BatchNorm
def bn_mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).train()


@pytest.mark.parametrize("method", METHODS)
def test_training_statistics_belong_to_the_current_weights(method):
    model = bn_mlp()
    x = torch.rand(6, 4)
    bm = BoundedModule(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = bm(x).pow(2).sum()          # the clean forward records statistics of these weights ...
    loss.backward()
    opt.step()                          # ... which the step then changes
    lb, ub = bm.compute_bounds(x, 0.0, method=method)
    assert exact_misses(model, x, lb, ub, clean_batch=x) == 0


@pytest.mark.parametrize("method", METHODS)
def test_training_statistics_follow_in_place_edits_of_the_input(method):
    model = bn_mlp(1)
    x = torch.rand(6, 4)
    bm = BoundedModule(model, x)
    bm(x)
    with torch.no_grad():
        x.mul_(0.5)
    lb, ub = bm.compute_bounds(x, 0.0, method=method)
    assert exact_misses(model, x, lb, ub, clean_batch=x) == 0


class TiedBatchNorm(nn.Module):
    """One BatchNorm module applied after two different layers (weight tying)."""

    def __init__(self):
        super().__init__()
        self.lin1, self.lin2, self.out = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.bn = nn.BatchNorm1d(6)
        with torch.no_grad():
            self.lin2.bias.add_(3.0)
            self.lin2.weight.mul_(4.0)

    def forward(self, x):
        h = F.relu(self.bn(self.lin1(x)))
        return self.out(F.relu(self.bn(self.lin2(h))))


@pytest.mark.parametrize("method", METHODS)
def test_a_batchnorm_applied_twice_gets_each_call_its_own_statistics(method):
    torch.manual_seed(0)
    model = TiedBatchNorm().train()
    x = torch.rand(5, 4)
    bm = BoundedModule(model, x)
    bm(x)
    lb, ub = bm.compute_bounds(x, 0.0, method=method)
    assert exact_misses(model, x, lb, ub, clean_batch=x) == 0


def large_mean_model():
    """Channel 0 of the first layer has mean ~1e5 and spread ~1e-2 over the batch: float32 cannot hold its
    deviations from the mean to better than ~0.004."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 2)).train()
    with torch.no_grad():
        model[0].weight[0].uniform_(-1e-2, 1e-2)
        model[0].bias[0] = 1e5
    return model


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("eps", [0.0, 0.01])
def test_batch_statistics_of_a_large_mean_channel(method, eps):
    model = large_mean_model()
    x = torch.rand(8, 4)
    bm = BoundedModule(model, x)
    bm(x)
    lb, ub = bm.compute_bounds(x, eps, method=method)
    assert exact_misses(model, x, lb, ub, clean_batch=x) == 0
    if eps:
        xp = (x + (torch.rand_like(x) * 2 - 1) * eps).clamp(0, 1)
        xp = torch.where((xp - x).abs() <= eps, xp, x)
        assert exact_misses(model, xp, lb, ub, clean_batch=x) == 0


# ------------------------------------------------------------------------------------------ autocast
@pytest.mark.parametrize("backend", backends_for("cpu", include_interpreter=False))
@pytest.mark.parametrize("method", METHODS)
def test_bounds_ignore_autocast(backend, method):
    model = random_sequential(5).eval()
    x = torch.rand(3, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 1, 2]), 4)
    bm = BoundedModule(model, x)
    with use_backend(backend), torch.autocast("cpu", dtype=torch.bfloat16):
        lb, ub = bm.compute_bounds(x, 0.0, C=C, method=method)
    assert lb.dtype == torch.float32
    assert exact_misses(model, x, lb, ub, C) == 0


@pytest.mark.triton
@pytest.mark.parametrize("method", METHODS)
def test_bounds_ignore_autocast_on_the_triton_kernels(method):
    if not _backend.available("triton", "cpu"):
        pytest.skip("the Triton kernels run on the CPU only under the interpreter")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
                          nn.Linear(2 * 4 * 4, 3)).eval()
    x = torch.rand(2, 1, 4, 4)
    C = margin_spec(torch.tensor([0, 1]), 3)
    with use_backend("triton"), torch.autocast("cpu", dtype=torch.bfloat16):
        lb, ub = BoundedModule(model, x).compute_bounds(x, 0.0, C=C, method=method)
    assert exact_misses(model, x, lb, ub, C) == 0


# ------------------------------------------------------------------------------------------ dtypes of C, eps and x
@pytest.mark.parametrize("method", METHODS)
def test_a_float64_specification_is_not_rounded_to_the_model_dtype(method):
    model = nn.Sequential(nn.Linear(1, 2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.full((1, 1), 1000.0)
    C = torch.tensor([[[1 - 2.0 ** -30, -1.0]]], dtype=torch.float64)   # float32 would round it to [1, -1]
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x, 0.0, C=C, method=method, x_min=-math.inf, x_max=math.inf)
    assert exact_misses(model, x, lb, ub, C) == 0


def ball_model(a=2.0 ** 10, bias=0.0):
    model = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[a, -a, a, -a]]))   # ||w||_2 = 2a exactly
        model[0].bias.fill_(bias)
    return model


def worst_point_of_ball(model, x64, eps):
    w = model[0].weight.detach().double()[0]
    return inside_l2(x64 - eps * (1 - 1e-12) * (w / w.norm()).reshape(1, -1), x64, eps)


@pytest.mark.parametrize("method", METHODS)
def test_an_l2_radius_that_float32_rounds_down(method):
    eps = 0.7
    assert float(torch.tensor(eps, dtype=torch.float32)) < eps
    a = 2.0 ** 10
    model = ball_model(a)
    x = torch.tensor([[2.0 ** -30, 0.0, 0.0, 0.0]])      # w.x is a hair above 0, the float32 grid's point
    lb, ub = BoundedModule(model, x).compute_bounds(x, eps, norm=2, method=method, x_min=-math.inf,
                                                    x_max=math.inf)
    xs = worst_point_of_ball(model, x.double(), eps)
    assert exact_misses(model, xs, lb, ub) == 0


@pytest.mark.parametrize("method", METHODS)
def test_a_float64_centre_is_not_rounded_to_the_model_dtype(method):
    a = 2.0 ** 10
    model = ball_model(a, bias=a * 2.0 ** -30)
    x64 = torch.tensor([[0.5 - 2.0 ** -27, 0.5, 0.5, 0.5]], dtype=torch.float64)  # float32: [0.5] * 4
    eps = 0.5
    lb, ub = BoundedModule(model, x64.float()).compute_bounds(x64, eps, norm=2, method=method,
                                                              x_min=-math.inf, x_max=math.inf)
    xs = worst_point_of_ball(model, x64, eps)
    assert exact_misses(model, xs, lb, ub) == 0


@pytest.mark.parametrize("method", METHODS)
def test_a_float64_centre_in_an_linf_ball(method):
    a = 2.0 ** 10
    model = ball_model(a, bias=a * 2.0 ** -30)
    x64 = torch.tensor([[0.5 - 2.0 ** -27, 0.5, 0.5, 0.5]], dtype=torch.float64)
    lb, ub = BoundedModule(model, x64.float()).compute_bounds(x64, 0.0, method=method, x_min=-math.inf,
                                                              x_max=math.inf)
    assert exact_misses(model, x64, lb, ub) == 0


# ------------------------------------------------------------------------------------------ float64 backward sums
def cancelling_model(seed):
    """relu(W1 x + b1) -> W2 with W2 = [M, -M'], M ~ 1e16: the bias term M b1_0 - M' b1_1 cancels."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1)).double()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.copy_(1 + torch.rand(2, generator=g, dtype=torch.float64) * 1e-15)
        m = 1e16 * (1 + torch.rand(1, generator=g, dtype=torch.float64))
        model[2].weight.copy_(torch.cat([m, -m * (1 + torch.rand(1, generator=g, dtype=torch.float64) * 1e-15)])
                              .reshape(1, 2))
        model[2].bias.zero_()
    return model


@pytest.mark.parametrize("method", ["CROWN-IBP", "CROWN"])
def test_cancelling_backward_sums_are_bounded(method):
    misses = 0
    for seed in range(20):
        model = cancelling_model(seed)
        x = torch.zeros(1, 1, dtype=torch.float64)
        lb, ub = BoundedModule(model, x).compute_bounds(x, 0.0, method=method, x_min=-1, x_max=1)
        misses += exact_misses(model, x, lb, ub)
    assert misses == 0


@pytest.mark.parametrize("method", METHODS)
def test_float64_models_at_eps_zero(method):
    misses = 0
    for seed in range(4):
        model = random_sequential(seed).double().eval()
        x = torch.rand(3, 2, 6, 6, dtype=torch.float64)
        C = margin_spec(torch.tensor([0, 1, 3]), 4, dtype=torch.float64)
        for eps in (0.0, 1e-300):
            lb, ub = BoundedModule(model, x).compute_bounds(x, eps, C=C, method=method)
            misses += exact_misses(model, x, lb, ub, C)
    assert misses == 0


def test_verified_accuracy_l2_does_not_certify_a_flipped_point():
    # margin z_0 - z_1 = w.x + b, with b placing the worst point of the ball just below zero
    a, eps = 2.0 ** 10, 0.7
    b = float(torch.tensor(eps, dtype=torch.float32)) * 2 * a     # eps rounded to float32, times ||w||_2
    model = nn.Sequential(nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[a, -a, a, -a], [0.0, 0.0, 0.0, 0.0]]))
        model[0].bias.copy_(torch.tensor([b, 0.0]))
    x = torch.tensor([[2.0 ** -30, 0.0, 0.0, 0.0]])
    xs = worst_point_of_ball(model, x.double(), eps)
    margin = exact_spec(margin_spec(torch.tensor([0]), 2, dtype=torch.float64), exact_forward(model, xs))
    assert margin[0, 0].b < 0                          # a point of the ball is classified 1
    acc = verified_accuracy(model, x, torch.tensor([0]), eps, norm=2, methods=("CROWN",), x_min=-math.inf,
                            x_max=math.inf)
    assert acc == 0.0


# ------------------------------------------------------------------------------------------ global matmul precision
def effective_cpu_precision(conv: bool) -> str:
    b = torch.backends
    op = b.mkldnn.conv if conv else b.mkldnn.matmul
    return next((p for p in (op.fp32_precision, b.mkldnn.fp32_precision, b.fp32_precision) if p != "none"), "ieee")


class CpuPrecisionRecorder(torch.utils._python_dispatch.TorchDispatchMode):
    GEMMS = ("mm", "addmm", "bmm", "baddbmm", "matmul", "convolution", "_convolution", "conv2d", "linear")

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.GEMMS:
            self.seen.append((name, effective_cpu_precision("conv" in name)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", backends_for("cpu", include_interpreter=False))
@pytest.mark.parametrize("norm", [math.inf, 2])
def test_products_inside_bounds_are_ieee_whatever_the_global_setting(backend, norm):
    model = random_sequential(2).eval()
    x = torch.rand(2, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 1]), 4)
    bm = BoundedModule(model, x)
    saved = torch.get_float32_matmul_precision()
    b = torch.backends
    knobs = (b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn, b.cuda.matmul, b.cudnn.conv)
    before = [k.fp32_precision for k in knobs]
    torch.set_float32_matmul_precision("medium")
    b.mkldnn.conv.fp32_precision = "bf16"
    try:
        during = [k.fp32_precision for k in knobs]
        rec = CpuPrecisionRecorder()
        with use_backend(backend), rec:
            for method in METHODS:
                bm.compute_bounds(x, 0.05, norm=norm, C=C, method=method)
        assert rec.seen, "no product reached ATen"
        assert [s for s in rec.seen if s[1] != "ieee"] == []
        assert [k.fp32_precision for k in knobs] == during, "the user's settings were not restored"
    finally:
        torch.set_float32_matmul_precision(saved)
        for k, v in zip(knobs, before):
            k.fp32_precision = v


@pytest.mark.parametrize("backend", backends_for("cpu", include_interpreter=False))
def test_a_bound_op_called_alone_runs_ieee_products_and_restores_the_settings(backend, monkeypatch):
    """The interval ops called directly (outside compute_bounds) run with IEEE products on their device, whatever
    the user's settings (a lowered matmul precision, bf16 convolutions, an autocast region), and restore those
    settings after. The reference and Triton run inside the Python context (seen at the call); a compiled kernel
    holds its own scope, so its results under the lowered settings are those under the defaults, bit for bit."""
    from robustkern import ops
    from robustkern.ops._registry import _COMPILED, Op

    seen = []
    run = Op._run

    def spy(backend, impl, args):
        seen.append((impl, effective_cpu_precision(False), effective_cpu_precision(True)))
        return run(backend, impl, args)

    monkeypatch.setattr(Op, "_run", staticmethod(spy))
    g = torch.Generator().manual_seed(0)
    mid, rad = torch.rand(3, 2, 6, 6, generator=g), torch.rand(3, 2, 6, 6, generator=g) * 0.1
    w, bias = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, generator=g)
    w2 = torch.randn(5, 4 * 36, generator=g)

    def calls():
        with use_backend(backend):
            m, r = ops.interval_conv2d(mid, rad, w, bias, 1, 1, relu=True)
            return (m, r) + ops.interval_linear(m.flatten(1), r.flatten(1), w2)

    expected = calls()
    seen.clear()
    b = torch.backends
    knobs = (b.mkldnn.matmul, b.mkldnn.conv, b.mkldnn, b.cuda.matmul, b.cudnn.conv)
    before = [k.fp32_precision for k in knobs]
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    b.mkldnn.conv.fp32_precision = "bf16"
    try:
        during = [k.fp32_precision for k in knobs]
        assert (effective_cpu_precision(False), effective_cpu_precision(True)) != ("ieee", "ieee")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = calls()
            assert torch.is_autocast_enabled("cpu"), "the user's autocast region was left"
        # the compiled interval ops go to the dispatcher directly (their Autograd kernel is the extension's)
        assert len(seen) == (0 if backend in _COMPILED else 2)
        if backend in _COMPILED:
            for a, e in zip(got, expected):
                assert a.dtype == torch.float32
                torch.testing.assert_close(a, e, rtol=0, atol=0)
        else:
            assert all(s[1:] == ("ieee", "ieee") for s in seen), seen
        assert [k.fp32_precision for k in knobs] == during, "the user's settings were not restored"
    finally:
        torch.set_float32_matmul_precision(saved)
        for k, v in zip(knobs, before):
            k.fp32_precision = v


def test_ieee_products_scoped_to_a_device_and_nested():
    """A context for one device leaves the other's settings alone; a context nested in it still sets the
    devices the outer one does not hold, and each restores exactly what it changed."""
    from robustkern._numerics import ieee_products, ieee_products_held

    b = torch.backends
    before = (b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision)
    b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision = "bf16", "tf32"
    try:
        with ieee_products("cpu"):
            assert ieee_products_held("cpu") and not ieee_products_held("cuda")
            assert (b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision) == ("ieee", "tf32")
            with ieee_products():
                assert ieee_products_held("cuda")
                assert (b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision) == ("ieee", "ieee")
            assert (b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision) == ("ieee", "tf32")
            assert not ieee_products_held("cuda")
        assert (b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision) == ("bf16", "tf32")
        assert not ieee_products_held("cpu")
        with ieee_products("meta"):          # a device without products: every device's settings held
            assert (b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision) == ("ieee", "ieee")
    finally:
        b.mkldnn.matmul.fp32_precision, b.cuda.matmul.fp32_precision = before


# ------------------------------------------------------------------------------------------ reused intermediate boxes
def test_intermediate_boxes_serve_only_their_own_input_set_and_soundness():
    model = random_sequential(4).eval()
    x = torch.rand(2, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 1]), 4)
    bm = BoundedModule(model, x)
    bm.compute_bounds(x, 0.01, C=C, method="IBP", sound=True)
    small = bm.node_bounds()
    with pytest.raises(ValueError, match="another input set"):
        bm.compute_bounds(x, 0.1, C=C, method="CROWN-IBP", intermediate=small)   # boxes of a smaller ball
    lb, ub = bm.compute_bounds(x, 0.01, C=C, method="CROWN-IBP", intermediate=small)
    assert exact_misses(model, x, lb, ub, C) == 0
    bm.compute_bounds(x, 0.01, C=C, method="IBP", sound=False)
    with pytest.raises(ValueError, match="sound=False"):
        bm.compute_bounds(x, 0.01, C=C, method="CROWN-IBP", intermediate=bm.node_bounds())
