"""Sound bounds that cost no tightness: float32 GEMM boxes with ``sound=True`` are the exact interval image up to a
few float32 ulps (float64 accumulation of exact products, rounded outwards once), on every backend; they contain
the exact image under cancellation (large ``|W||mid|``, small ``W mid``); sound IBP / CROWN-IBP / CROWN bounds of
small networks are within 1e-5 (of the largest bound) of the same relaxation in float64; and sound and unsound
bounds verify the same examples of a trained model."""
import copy
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkern import ops, use_backend
from robustkern.bounds import BoundedModule, margin_spec, verified_accuracy
from robustkern.bounds.exact import exact_forward, exact_spec, violations
from robustkern.testing import backend_params

from _digits import digits, one_thread, trained  # noqa: F401 (one_thread: a fixture)

BACKENDS = backend_params("cpu")
METHODS = ["IBP", "CROWN-IBP", "CROWN"]
U32 = 2.0 ** -24


def cancelling_rows(n, k, seed, scale=1e4):
    """``W`` (n, k) and ``mid`` (1, k) in float32 with ``|W||mid| ~ scale sqrt(k)`` and ``W mid`` a few float32
    ulps of that: each row's last weight is chosen to cancel the rest of its dot product."""
    g = torch.Generator().manual_seed(seed)
    mid = (torch.randn(1, k, generator=g) * scale).float()
    w = torch.randn(n, k, generator=g)
    rest = w[:, :-1].double() @ mid[0, :-1].double()
    w[:, -1] = (-rest / mid[0, -1].double()).float()
    return w, mid


def exact_image(mid, rad, w, b=None):
    """The exact interval image of ``x -> W x + b`` on the box, per row as Fractions ``(lo, hi, mag)`` (B, N),
    ``mag = |W| |mid| + |W| rad + |b|``."""
    out = []
    for i in range(mid.shape[0]):
        row = []
        for j in range(w.shape[0]):
            c = sum(Fraction(float(a)) * Fraction(float(x)) for a, x in zip(w[j], mid[i]))
            r = sum(abs(Fraction(float(a))) * Fraction(float(x)) for a, x in zip(w[j], rad[i]))
            mag = sum(abs(Fraction(float(a)) * Fraction(float(x))) for a, x in zip(w[j], mid[i])) + r
            if b is not None:
                c += Fraction(float(b[j]))
                mag += abs(Fraction(float(b[j])))
            row.append((c - r, c + r, mag))
        out.append(row)
    return out


def check_exact_up_to_ulps(m, r, image, k, ulps=4):
    """``[m - r, m + r]`` contains each exact interval and exceeds it on each side by at most ``ulps`` float32
    ulps of its end points plus the float64 accumulation's own widening, ``4 k 2^-53`` of the magnitudes
    ``|W||mid| + |W| rad + |b|`` (far below float32's ``k 2^-24`` of them)."""
    for i, row in enumerate(image):
        for j, (lo, hi, mag) in enumerate(row):
            mij, rij = Fraction(float(m[i, j])), Fraction(float(r[i, j]))
            assert mij - rij <= lo and hi <= mij + rij, f"[{i}, {j}] escapes"
            slack = Fraction(ulps * U32) * max(abs(lo), abs(hi)) + Fraction(4 * k * 2.0 ** -53) * mag \
                + Fraction(2.0 ** -126)
            assert (lo - (mij - rij)) <= slack and ((mij + rij) - hi) <= slack, \
                f"[{i}, {j}]: looser than {ulps} ulps: {float(lo - (mij - rij))}, {float((mij + rij) - hi)}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_sound_linear_box_is_exact_up_to_ulps_under_cancellation(backend):
    for seed in range(3):
        w, mid = cancelling_rows(6, 96, seed)
        mid = torch.cat([mid, torch.rand(1, 96)])
        rad = torch.rand(2, 96) * torch.tensor([[1e-6], [1e-2]])
        b = torch.randn(6)
        with use_backend(backend):
            m, r = ops.interval_linear(mid, rad, w, b, sound=True)
        check_exact_up_to_ulps(m, r, exact_image(mid, rad, w, b), 96)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_sound_conv_box_is_exact_up_to_ulps(backend):
    torch.manual_seed(0)
    mid = torch.randn(2, 3, 5, 5) * 1e3
    rad = torch.rand(2, 3, 5, 5) * 1e-3
    w = torch.randn(4, 3, 3, 3)
    b = torch.randn(4)
    with use_backend(backend):
        m, r = ops.interval_conv2d(mid, rad, w, b, 2, 1, sound=True)
    # the same convolution as rows of patches: exact interval images per output position
    cols_m = F.unfold(mid.double(), 3, padding=1, stride=2).transpose(1, 2)   # (B, L, C*9), exact copies
    cols_r = F.unfold(rad.double(), 3, padding=1, stride=2).transpose(1, 2)
    wf = w.reshape(4, -1)
    for i in range(2):
        image = exact_image(cols_m[i], cols_r[i], wf, b)       # (L, O)
        check_exact_up_to_ulps(m[i].flatten(1).t(), r[i].flatten(1).t(), image, 27)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_sound_epilogue_boxes_contain_the_exact_image(backend):
    """With a BatchNorm + ReLU epilogue the box and the pre-epilogue box still contain the exact images."""
    w, mid = cancelling_rows(5, 64, 3)
    rad = torch.full_like(mid, 1e-5)
    scale, shift = torch.randn(5), torch.randn(5)
    with use_backend(backend):
        m, r, (pm, pr) = ops.interval_linear(mid, rad, w, None, scale=scale, shift=shift, relu=True, sound=True,
                                             return_pre=True)
    pre = exact_image(mid, rad, w)
    check_exact_up_to_ulps(pm, pr, pre, 64)
    for j, (lo, hi, _) in enumerate(pre[0]):
        s, t = Fraction(float(scale[j])), Fraction(float(shift[j]))
        ends = sorted((s * lo + t, s * hi + t))
        ends = [max(e, Fraction(0)) for e in ends]
        mj, rj = Fraction(float(m[0, j])), Fraction(float(r[0, j]))
        assert mj - rj <= ends[0] and ends[1] <= mj + rj


# ------------------------------------------------------------------------------------------ whole networks
def mlp(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10)).eval()


def cnn(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 4, 2, 1),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model.eval()


def looseness(model, x, y, eps, method):
    """How much looser the sound float32 bounds are than the same relaxation in float64, over the largest bound;
    and whether the float64 bounds lie inside the sound ones."""
    C = margin_spec(y, 10)
    lb, ub = BoundedModule(model, x[:1]).compute_bounds(x, eps, C=C, method=method)
    m64 = copy.deepcopy(model).double()
    rl, ru = BoundedModule(m64, x[:1].double()).compute_bounds(x, eps, C=C.double(), method=method, sound=False)
    scale = float(torch.maximum(rl.abs(), ru.abs()).max())
    gap = torch.maximum(rl - lb.double(), ub.double() - ru)
    return float(gap.max()) / scale, float(gap.min()) / scale


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("make", [mlp, cnn], ids=["mlp", "cnn"])
def test_sound_bounds_are_within_1e5_of_float64(make, method):
    """The a-priori float32 widening made these 1e-4 to 3e-4 looser; float64 accumulation keeps them within the
    float32 rounding of the bounds."""
    model = make(0)
    torch.manual_seed(1)
    x = torch.rand(8, 1, 8, 8)
    y = torch.randint(10, (8,))
    worst, least = looseness(model, x, y, 0.05, method)
    assert least >= -1e-12          # the float64 relaxation lies inside the sound bounds (up to its own rounding)
    assert worst < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_cancelling_first_layer_is_bounded_exactly(backend, method):
    """A first layer whose rows cancel on the input (``|W||x| ~ 1e4 sqrt(k)``, ``W x`` a few ulps of it), at
    eps 0 and tiny eps: the exact network value (rigorous interval arithmetic) lies inside the sound bounds."""
    misses = 0
    for seed in range(2):
        w, x = cancelling_rows(6, 16, seed, scale=1.0)
        x = x.abs()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
        with torch.no_grad():
            model[0].weight.copy_(w * 1e3)
            model[0].bias.zero_()
        for eps in (0.0, 1e-7):
            with use_backend(backend):
                lb, ub = BoundedModule(model, x).compute_bounds(x, eps, method=method, x_min=0.0, x_max=10.0)
            misses += violations(exact_spec(None, exact_forward(model, x)), lb, ub)
    assert misses == 0


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_sound_and_unsound_verify_the_same_digits(kind, one_thread):
    model = trained(kind)
    _, _, xte, yte = digits()
    x, y = xte[:96], yte[:96]
    C = margin_spec(y, 10)
    bm = BoundedModule(model, x[:1])
    for method, eps in (("IBP", 0.005), ("CROWN-IBP", 0.01), ("CROWN", 0.02)):
        with torch.no_grad():
            sound = (bm.compute_bounds(x, eps, C=C, method=method, bound_upper=False)[0] > 0).all(1)
            unsound = (bm.compute_bounds(x, eps, C=C, method=method, bound_upper=False, sound=False)[0] > 0).all(1)
        assert 0 < int(unsound.sum()) < len(y), f"{method}: eps {eps} verifies all or none"
        assert torch.equal(sound, unsound), method
        assert verified_accuracy(model, x, y, eps, methods=(method,)) == float(unsound.float().mean()), method


@pytest.mark.parametrize("method", ["IBP", "CROWN-IBP"])
def test_sound_bounds_with_a_gradient_have_the_float64_value_and_the_float32_gradient(method):
    """With a gradient to record, sound bounds of a float32 model equal the no_grad ones exactly, and their gradient
    is that of the unsound float32 bounds (the widening is not differentiated)."""
    model = cnn(2)
    torch.manual_seed(3)
    x, y = torch.rand(4, 1, 8, 8), torch.randint(10, (4,))
    C = margin_spec(y, 10)
    bm = BoundedModule(model, x[:1])
    with torch.no_grad():
        value = bm.compute_bounds(x, 0.02, C=C, method=method)[0]
    lb = bm.compute_bounds(x, 0.02, C=C, method=method)[0]
    assert torch.equal(lb, value) and lb.requires_grad
    grads = torch.autograd.grad(lb.sum(), list(model.parameters()))
    unsound = bm.compute_bounds(x, 0.02, C=C, method=method, sound=False)[0]
    for g, h in zip(grads, torch.autograd.grad(unsound.sum(), list(model.parameters()))):
        torch.testing.assert_close(g, h, rtol=0, atol=0)
