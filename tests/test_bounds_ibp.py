"""BoundedModule IBP on whole models: agreement with an independent float64 IBP, soundness (random and
PGD-maximised points, L-inf and L2), BatchNorm modes, specifications, per-node bounds, bad input. The agreement
and soundness tests also run on CUDA (marked gpu; tests/_devices.py ``bound_device``) for each GPU backend, with
cuDNN choosing convolution algorithms by heuristics and by timing, TF32 disallowed by the user's flags; and on
CUDA the bounds must not use TF32 when the user allows it."""
import copy
import math

import pytest
import torch
from torch import nn

import robustkern
from robustkern import use_backend
from robustkern.bounds import BoundedModule, UnsupportedLayerError, margin_spec, robust_cross_entropy
from robustkern.reference.ibp_model import naive_ibp, record_bn_stats
from robustkern.testing import assert_box_contains, backends_for

import _devices
from _devices import (GPU_BOUND_BACKENDS, CUDNN_BENCHMARK, Fp32GemmRecorder, bound_backend_device_params,
                      cuda_settings, skip_unavailable, tf32_allowed)

bound_device = _devices.bound_device  # the fixture

# Whole-model tests use the compiled/reference backends on the CPU (the interpreted Triton kernels are tested
# per op), and every GPU backend on CUDA (bound_device: cudnn.benchmark off and on).
MODEL_BACKENDS = backends_for("cpu", include_interpreter=False)
MODEL_CASES = bound_backend_device_params(MODEL_BACKENDS)


def random_sequential(seed: int, in_ch=2, size=6, classes=4, bn=True):
    g = torch.Generator().manual_seed(seed)
    pick = lambda n: int(torch.randint(0, n, (1,), generator=g))  # noqa: E731
    layers = [robustkern.nn.Normalize([0.4] * in_ch, [0.3] * in_ch)] if pick(2) else []
    ch = in_ch
    for _ in range(1 + pick(2)):
        out = 2 + pick(3)
        stride = 1 + pick(2)
        layers.append(nn.Conv2d(ch, out, 3, stride=stride, padding=1, groups=1))
        size = (size + 2 - 3) // stride + 1
        if bn and pick(2):
            layers.append(nn.BatchNorm2d(out))
        layers.append(nn.ReLU())
        ch = out
    if size % 2 == 0 and pick(2):
        layers.append(nn.AvgPool2d(2))
        size //= 2
    layers.append(nn.Flatten())
    width = 3 + pick(5)
    layers += [nn.Linear(ch * size * size, width)]
    if bn and pick(2):
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.ReLU(), nn.Linear(width, classes)]
    model = nn.Sequential(*layers)
    with torch.no_grad():  # non-trivial BatchNorm running statistics and affine parameters
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-0.5, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(-1.5, 1.5, generator=g)
                m.bias.uniform_(-0.5, 0.5, generator=g)
    return model.eval()


class Residual(nn.Module):
    def __init__(self, ch=3, classes=4):
        super().__init__()
        self.conv0 = nn.Conv2d(1, ch, 3, padding=1)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(ch)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(ch * 9, classes)

    def forward(self, x):
        h = torch.relu(self.conv0(x))
        h = self.relu(h + self.conv2(self.relu(self.bn1(self.conv1(h)))))
        return self.fc(self.pool(h).view(h.size(0), -1))


def spec_values(model, x, C):
    return torch.bmm(C, model(x).unsqueeze(-1)).squeeze(-1)


def project(x0, xp, eps, norm):
    d = xp - x0
    if norm == 2:
        n = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x0.dim() - 1))
        d = d * torch.clamp(eps.view_as(n) / n, max=1.0)
    else:
        d = torch.maximum(torch.minimum(d, eps.view(-1, *[1] * (x0.dim() - 1))), -eps.view(-1, *[1] * (x0.dim() - 1)))
    return (x0 + d).clamp(0, 1)


def count_violations(model, x, eps, norm, C, lb, ub, samples=32, pgd_steps=20):
    """Random points of the ball and PGD points that push each spec output up and down, evaluated by a float64
    copy of the model: sound bounds are as tight as float32 allows, so the float32 forward's own rounding (and a
    float32 projection's) may put a value an ulp outside them; 1e-6 of the bounds' scale is allowed for that
    (tests/test_soundness_property.py checks candidates in exact arithmetic)."""
    viol = 0
    m64, C64 = copy.deepcopy(model).double(), C.double()
    tol = 1e-6 * torch.maximum(lb.abs(), ub.abs()).double().amax(1, keepdim=True)
    lo, hi = lb.double() - tol, ub.double() + tol

    def misses(xp, times=1):
        z = spec_values(m64, xp.double(), C64 if times == 1 else C64.repeat(times, 1, 1))
        return int(((z < lo.repeat(times, 1)) | (z > hi.repeat(times, 1))).sum())

    with torch.no_grad():
        for _ in range(samples):
            d = torch.randn_like(x) if norm == 2 else torch.rand_like(x) * 2 - 1
            d = d * (eps.view(-1, *[1] * (x.dim() - 1)) * (2 if norm == 2 else 1))
            viol += misses(project(x, x + d, eps, norm))
    # PGD on every (spec row, direction) pair at once: the batch is repeated 2 S times
    S, B = C.shape[1], x.shape[0]
    rep = lambda t: t.repeat(2 * S, *[1] * (t.dim() - 1))  # noqa: E731
    xr, er, Cr = rep(x), rep(eps), rep(C)
    w = torch.zeros(2 * S, B, S, device=x.device)
    for s in range(S):
        w[2 * s, :, s], w[2 * s + 1, :, s] = 1.0, -1.0
    w = w.reshape(2 * S * B, S)
    shape = (-1,) + (1,) * (x.dim() - 1)
    step = er.view(shape) / 4
    xa = project(xr, xr + (torch.rand_like(xr) * 2 - 1) * step, er, norm).requires_grad_(True)
    for _ in range(pgd_steps):
        (g,) = torch.autograd.grad((w * spec_values(model, xa, Cr)).sum(), xa)
        if norm == 2:
            g = g / g.flatten(1).norm(dim=1).clamp_min(1e-12).view(shape)
            xa = project(xr, xa + 2.5 * step * g, er, norm)
        else:
            xa = project(xr, xa + step * g.sign(), er, norm)
        xa = xa.detach().requires_grad_(True)
    with torch.no_grad():
        viol += misses(xa, 2 * S)
    return viol


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
@pytest.mark.parametrize("seed", range(6))
def test_matches_independent_float64_ibp(backend, bound_device, seed):
    skip_unavailable(backend, bound_device)
    model = random_sequential(seed)
    x = torch.rand(3, 2, 6, 6)
    y = torch.randint(0, 4, (3,))
    C = margin_spec(y, 4)
    eps = 0.05
    # the input set in float64 (float32 end points could round outwards, past what the sound bounds cover)
    lo, hi = (x.double() - eps).clamp(0, 1), (x.double() + eps).clamp(0, 1)
    ref_lb, ref_ub = naive_ibp(model.double(), lo, hi, C.double())   # on the CPU
    model.float()
    model, x, C = model.to(bound_device), x.to(bound_device), C.to(bound_device)
    bm = BoundedModule(model, x)
    with use_backend(backend):
        lb, ub = bm.compute_bounds(x, eps, C=C, sound=False)
        slb, sub = bm.compute_bounds(x, eps, C=C, sound=True)
    assert lb.device == x.device
    lb, ub, slb, sub = lb.cpu(), ub.cpu(), slb.cpu(), sub.cpu()
    scale = ref_ub.abs().max() + ref_lb.abs().max()
    torch.testing.assert_close(lb.double(), ref_lb, atol=float(scale) * 1e-5, rtol=1e-5)
    torch.testing.assert_close(ub.double(), ref_ub, atol=float(scale) * 1e-5, rtol=1e-5)
    # floating-point soundness: the float32 sound bounds contain the float64 bounds
    assert_box_contains(slb, sub, ref_lb, ref_ub, "sound float32 IBP")


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
@pytest.mark.parametrize("norm", [math.inf, 2])
@pytest.mark.parametrize("seed", range(4))
def test_no_point_leaves_the_bounds(backend, bound_device, norm, seed):
    skip_unavailable(backend, bound_device)
    torch.manual_seed(seed)
    model = random_sequential(100 + seed).to(bound_device)
    x = torch.rand(4, 2, 6, 6).to(bound_device)
    C = margin_spec(torch.randint(0, 4, (4,)), 4).to(bound_device)
    eps = (torch.tensor([0.0, 0.02, 0.1, 0.3]) * (3 if norm == 2 else 1)).to(bound_device)
    with use_backend(backend):
        lb, ub = BoundedModule(model, x).compute_bounds(x, eps, norm=norm, C=C)
    assert count_violations(model, x, eps, norm, C, lb, ub) == 0


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
@pytest.mark.parametrize("norm", [math.inf, 2])
def test_residual_model_is_sound_and_per_node_bounds_hold(backend, bound_device, norm):
    skip_unavailable(backend, bound_device)
    model = Residual().eval()
    with torch.no_grad():
        model.bn1.running_var.uniform_(0.5, 2)
        model.bn1.running_mean.uniform_(-0.3, 0.3)
    model = model.to(bound_device)
    x = torch.rand(3, 1, 6, 6).to(bound_device)
    C = margin_spec(torch.tensor([0, 1, 3]), 4).to(bound_device)
    eps = torch.full((3,), 0.08, device=bound_device)
    bm = BoundedModule(model, x)
    with use_backend(backend):
        lb, ub = bm.compute_bounds(x, eps, norm=norm, C=C)
    assert count_violations(model, x, eps, norm, C, lb, ub) == 0
    # every module's bounds contain its activations at random points of the ball
    acts = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: acts.__setitem__(n, o)) for n, m in model.named_modules() if n]
    paths = [p for p, _, _ in bm.named_bounds()]
    once = {p for p in paths if paths.count(p) == 1}  # self.relu is applied at two places
    assert {"conv0", "conv1", "bn1", "conv2", "pool", "fc"} <= once
    for _ in range(20):
        d = (torch.rand_like(x) * 2 - 1) * 0.08 / (math.sqrt(36) if norm == 2 else 1)
        model(project(x, x + d, eps, norm))
        for path, lo, hi in bm.named_bounds():
            if path in once and path != "fc":  # with C, fc's entry bounds C @ logits
                assert bool((acts[path] >= lo).all() and (acts[path] <= hi).all()), path
    for h in hooks:
        h.remove()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BOUND_BACKENDS)
@pytest.mark.parametrize("cudnn_benchmark", CUDNN_BENCHMARK)
@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP", "CROWN"])
@pytest.mark.parametrize("sound", [False, True])
def test_cuda_bounds_use_no_tf32_when_the_user_allows_it(backend, cudnn_benchmark, method, sound):
    """No TF32 inside bound computations (DESIGN.md): with TF32 allowed by the user's flags (cuDNN's default),
    every float32 matmul and convolution of a bound computation that reaches ATen runs with TF32 off, the bounds
    equal those computed with TF32 disallowed (TF32 keeps 10 mantissa bits: ~1e-3 relative per product), and
    the user's flags are as they were."""
    skip_unavailable(backend, "cuda")
    model = random_sequential(7).cuda()
    x = torch.rand(4, 2, 6, 6).cuda()
    C = margin_spec(torch.randint(0, 4, (4,)), 4).cuda()
    bm = BoundedModule(model, x)
    with use_backend(backend):
        with cuda_settings(cudnn_benchmark, tf32=False):
            want = bm.compute_bounds(x, 0.05, C=C, method=method, sound=sound)
        with cuda_settings(cudnn_benchmark, tf32=True):
            with Fp32GemmRecorder("cuda") as rec:
                got = bm.compute_bounds(x, 0.05, C=C, method=method, sound=sound)
            assert tf32_allowed() == (True, True)
    assert rec.with_tf32() == [], f"TF32 allowed in the bound computation for {rec.with_tf32()}"
    scale = float(want[1].abs().max() + want[0].abs().max())
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=scale * 1e-5, rtol=1e-5)


def test_fused_and_unfused_agree_and_all_nodes_reachable():
    model = random_sequential(3)
    x = torch.rand(2, 2, 6, 6)
    a = BoundedModule(model, x)
    b = BoundedModule(model, x, fuse=False)
    assert a.groups and not b.groups
    la, ua = a.compute_bounds(x, 0.05)
    lb, ub = b.compute_bounds(x, 0.05)
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(ua, ub)
    na, nb = a.node_bounds(), b.node_bounds()
    assert list(na) == list(nb) and len(na) == len(a.nodes) - 1
    for k in na:
        torch.testing.assert_close(na[k].lower, nb[k].lower)
        torch.testing.assert_close(na[k].upper, nb[k].upper)


def test_training_mode_batchnorm_uses_clean_batch_statistics_and_gradients_flow():
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4))
    model.train()
    x = torch.rand(5, 1, 6, 6)
    C = margin_spec(torch.randint(0, 4, (5,)), 4)
    bm = BoundedModule(model, x)
    bm(x)
    running = model[1].running_mean.clone()
    lb, _ = bm.compute_bounds(x, 0.03, C=C, sound=False)
    # a different tensor: statistics recomputed, running statistics not updated a second time
    lb2, _ = bm.compute_bounds(x.clone(), 0.03, C=C, sound=False)
    torch.testing.assert_close(lb2, lb)
    assert torch.equal(model[1].running_mean, running)
    _, stats = record_bn_stats(model, x)
    ref_lb, _ = naive_ibp(model, (x - 0.03).clamp(0, 1), (x + 0.03).clamp(0, 1), C, bn_stats=stats)
    torch.testing.assert_close(lb, ref_lb, atol=1e-4, rtol=1e-4)
    robust_cross_entropy(lb).backward()
    assert model[1].weight.grad is not None and bool(model[1].weight.grad.abs().sum() > 0)
    assert model[0].weight.grad is not None and bool(model[0].weight.grad.abs().sum() > 0)


def test_spec_folding_is_tighter_than_bounding_logits_and_eps_zero_is_exact():
    model = random_sequential(5, bn=False)
    x = torch.rand(3, 2, 6, 6)
    C = margin_spec(torch.tensor([0, 2, 3]), 4)
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x, 0.05, C=C)
    llb, lub = bm.compute_bounds(x, 0.05)  # logits, then C as intervals
    mid, rad = (lub + llb) / 2, (lub - llb) / 2
    post_lb = torch.bmm(C, mid.unsqueeze(-1)).squeeze(-1) - torch.bmm(C.abs(), rad.unsqueeze(-1)).squeeze(-1)
    assert bool((lb >= post_lb - 1e-5).all()) and bool((lb > post_lb + 1e-6).any())
    lb0, ub0 = bm.compute_bounds(x, 0.0, C=C)
    z = spec_values(copy.deepcopy(model).double(), x.double(), C.double())   # float32's forward rounds (~1e-7)
    assert bool((lb0.double() <= z).all() and (z <= ub0.double()).all())
    torch.testing.assert_close(lb0.double(), z, atol=1e-4, rtol=1e-4)


def test_per_example_eps_and_sides():
    model = random_sequential(7)
    x = torch.rand(3, 2, 6, 6)
    bm = BoundedModule(model, x)
    lb, ub = bm.compute_bounds(x, torch.tensor([0.0, 0.01, 0.1]))
    width = (ub - lb).mean(1)
    assert width[0] < width[1] < width[2]
    lbo, ubo = bm.compute_bounds(x, 0.01, bound_upper=False)
    assert ubo is None and lbo.shape == (3, 4)


def test_nan_weights_give_infinite_bounds_not_zero():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("nan")
    x = torch.rand(2, 1, 2, 2)
    lb, ub = BoundedModule(model, x).compute_bounds(x, 0.1)
    assert bool(torch.isinf(lb).any()) and not bool(torch.isnan(lb).any())
    assert bool((lb[torch.isinf(lb)] < 0).all()) and bool((ub[torch.isinf(ub)] > 0).all())


def test_bad_input_is_a_clear_error():
    model = random_sequential(1)
    x = torch.rand(2, 2, 6, 6)
    bm = BoundedModule(model, x)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bm.compute_bounds(x, -0.1)
    with pytest.raises(ValueError, match="eps must be a float or a"):
        bm.compute_bounds(x, torch.rand(3))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contains NaN"):
        bm.compute_bounds(bad, 0.1)
    with pytest.raises(ValueError, match=r"must lie in \[x_min, x_max\]"):
        bm.compute_bounds(x + 1.5, 0.1)
    with pytest.raises(ValueError, match="must have shape"):
        bm.compute_bounds(torch.rand(2, 3, 6, 6), 0.1)
    with pytest.raises(ValueError, match="C must have shape"):
        bm.compute_bounds(x, 0.1, C=torch.rand(2, 3, 5))
    with pytest.raises(ValueError, match="C must have shape"):
        bm.compute_bounds(x, 0.1, C=torch.rand(3, 3, 4))
    with pytest.raises(ValueError, match="norm must be"):
        bm.compute_bounds(x, 0.1, norm=1)
    with pytest.raises(ValueError, match="optimize_bound_args takes method 'alpha-CROWN'"):
        bm.compute_bounds(x, 0.1, method="CROWN", optimize_bound_args={"iteration": 2})
    with pytest.raises(ValueError, match="unknown method"):
        bm.compute_bounds(x, 0.1, method="magic")
    with pytest.raises(ValueError, match="labels must lie"):
        margin_spec(torch.tensor([0, 4]), 4)


def test_unsupported_layer_names_its_type_and_place():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Sequential(nn.Tanh()), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=r"Tanh at '2\.0'"):
        BoundedModule(model, torch.rand(1, 4))

    class Branchy(nn.Module):
        def forward(self, x):
            return torch.sigmoid(x)

    with pytest.raises(UnsupportedLayerError, match="sigmoid"):
        BoundedModule(Branchy(), torch.rand(1, 4))
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    with pytest.raises(RuntimeError, match="Dropout"):
        BoundedModule(model, torch.rand(2, 4)).compute_bounds(torch.rand(2, 4), 0.1)


def test_a_bare_layer_is_a_model():
    """A single layer given as the whole model (``nn.Linear(...)``, not in a Sequential) is bounded like the
    one-layer chain it is: exactly, for an affine map."""
    torch.manual_seed(0)
    layer, x = nn.Linear(5, 3), torch.rand(2, 5)
    lb, ub = BoundedModule(layer, x).compute_bounds(x, 0.1, sound=False, x_min=-1.0, x_max=2.0)
    centre, radius = layer(x), 0.1 * layer.weight.abs().sum(1)
    torch.testing.assert_close(lb, centre - radius)
    torch.testing.assert_close(ub, centre + radius)
    with pytest.raises(ValueError, match=r"\(B, n_out\)"):     # traced, then refused for its output's shape
        BoundedModule(nn.Conv2d(2, 3, 3, padding=1), torch.rand(2, 2, 4, 4))


def test_robust_cross_entropy_matches_definition():
    lb = torch.randn(4, 3)
    want = nn.functional.cross_entropy(torch.cat([torch.zeros(4, 1), -lb], 1), torch.zeros(4, dtype=torch.long))
    torch.testing.assert_close(robust_cross_entropy(lb), want)
    C = margin_spec(torch.tensor([2, 0]), 3)
    assert C.shape == (2, 2, 3)
    torch.testing.assert_close(C[0], torch.tensor([[-1.0, 0, 1], [0, -1, 1]]))


@pytest.mark.parametrize("backend, bound_device", MODEL_CASES, indirect=["bound_device"])
def test_l2_dual_norm_bound_is_exact_for_an_affine_model(backend, bound_device):
    """Normalize -> Linear: the bound is eps * ||row of W diag(1/std)||_2 (exact); PGD gets within 1% of it,
    so the property tests' L2 attack can find a violation, and shrinking the bound by 2% is caught."""
    skip_unavailable(backend, bound_device)
    model = nn.Sequential(robustkern.nn.Normalize([0.5, 0.5], [0.3, 0.6]), nn.Flatten(), nn.Linear(8, 3)).eval()
    model = model.to(bound_device)
    x = (torch.rand(2, 2, 2, 2) * 0.5 + 0.25).to(bound_device)
    C = margin_spec(torch.tensor([0, 2]), 3).to(bound_device)
    eps = torch.full((2,), 0.1, device=bound_device)
    with use_backend(backend):
        lb, ub = BoundedModule(model, x).compute_bounds(x, eps, norm=2, C=C)
    w = (C @ (model[2].weight / torch.tensor([0.3, 0.6], device=bound_device).repeat_interleave(4)))  # (B, S, 8)
    z = spec_values(model, x, C)
    torch.testing.assert_close(ub - z, 0.1 * w.norm(dim=2), atol=1e-5, rtol=1e-4)
    assert count_violations(model, x, eps, 2, C, lb, ub) == 0
    width = ub - lb
    assert count_violations(model, x, eps, 2, C, lb + 0.02 * width, ub - 0.02 * width, samples=0) > 0


def test_check_values_false_skips_only_the_value_checks():
    """check_values=False skips the checks that read tensor values (host syncs on a GPU), gives the same
    bounds on valid input, and still checks shapes and a negative float eps."""
    model = random_sequential(2)
    x = torch.rand(2, 2, 6, 6)
    C = margin_spec(torch.tensor([1, 3]), 4)
    bm = BoundedModule(model, x)
    torch.testing.assert_close(bm.compute_bounds(x, 0.05, C=C, check_values=False)[0],
                               bm.compute_bounds(x, 0.05, C=C)[0])
    bm.compute_bounds(x + 1.5, 0.1, check_values=False)  # out of range: not checked
    with pytest.raises(ValueError, match="must lie in"):
        bm.compute_bounds(x + 1.5, 0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        bm.compute_bounds(x, -0.1, check_values=False)
    with pytest.raises(ValueError, match="must have shape"):
        bm.compute_bounds(torch.rand(2, 3, 6, 6), 0.1, check_values=False)


@pytest.mark.parametrize("train_mode", [False, True])
def test_channels_last_cpu_boxes_give_the_same_bounds_and_gradients(monkeypatch, train_mode):
    """robustkern.bounds.ibp.CHANNELS_LAST_CPU (boxes kept NHWC after the first convolution on the CPU) changes
    only the memory format: bounds and parameter gradients equal those of the NCHW path (float64, where
    summation order differences are far below the tolerance), with BatchNorm in eval and training mode."""
    from robustkern.bounds import ibp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(5 * 2 * 2, 7), nn.ReLU(), nn.Linear(7, 4)).double().train(train_mode)
    x = torch.rand(3, 3, 8, 8, dtype=torch.float64)
    C = margin_spec(torch.tensor([0, 2, 3]), 4)
    results = []
    for flag in (True, False):
        monkeypatch.setattr(ibp, "CHANNELS_LAST_CPU", flag)
        model.zero_grad()
        bm = BoundedModule(model, x)
        bm(x)
        lb, ub = bm.compute_bounds(x, 0.02, C=C)
        (robust_cross_entropy(lb) + ub.sum()).backward()
        results.append((lb.detach(), ub.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, u1, g1), (l2, u2, g2) = results
    torch.testing.assert_close(l1, l2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u1, u2, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
