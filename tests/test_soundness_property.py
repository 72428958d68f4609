"""Property test of soundness: random networks, input sets, dtypes and settings; the bounds are attacked (random
points, corners and PGD in float64) and every point that comes close is evaluated exactly
(``robustkern.bounds.exact``: rigorous interval arithmetic), so a reported violation is never a false alarm.

Covered per example (drawn from a seed): convolutional nets with BatchNorm in training and eval mode, a BatchNorm
module applied twice, residual additions, average pooling, input normalisation, a channel with a large mean and
small spread; float32 and float64 models; eps from 0 to 1 (L-inf and L2, clipped or not), given as a float or as
a float32/float64 tensor; ``x`` in float64 for a float32 model; margin or random specifications in float64;
autocast on; the reference and the compiled backends; IBP, CROWN-IBP, CROWN with every ReLU lower slope and alpha-CROWN
(4 iterations, starting from that slope), their passes from convolutions on patches where the kernels are smaller
than the nodes or wherever patches serve them.

``--property-examples N`` sets the number of examples (default 60: about half a minute on 2 cores);
``--property-seed S`` the first seed.
"""
import contextlib
import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import robustkern
from robustkern import use_backend
import robustkern.bounds.crown as crown
from robustkern.bounds import BoundedModule, margin_spec
from robustkern.bounds.batch_stats import forward_with_statistics, uses_batch_stats
from robustkern.graph import capture
from robustkern.bounds.exact import exact_forward, exact_spec, inside_l2, inside_linf
from robustkern.testing import backends_for

BACKENDS = backends_for("cpu", include_interpreter=False)
RELU_LOWER = ("adaptive", "zero", "one", "same-slope")


# ------------------------------------------------------------------------------------------------ random models
def _bn(cls, n, rng):
    bn = cls(n)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


class ConvNet(nn.Module):
    def __init__(self, rng: random.Random, classes: int):
        super().__init__()
        layers = []
        if rng.random() < 0.4:
            layers.append(robustkern.nn.Normalize([0.45, 0.5], [0.25, 0.3]))
        ch, size = 2, 6
        for _ in range(rng.randint(1, 2)):
            out = rng.randint(2, 4)
            stride = rng.choice([1, 2])
            layers.append(nn.Conv2d(ch, out, 3, stride=stride, padding=1))
            size = (size - 1) // stride + 1
            if rng.random() < 0.6:
                layers.append(_bn(nn.BatchNorm2d, out, rng))
            layers.append(nn.ReLU())
            ch = out
        if size % 2 == 0 and rng.random() < 0.5:
            layers.append(nn.AvgPool2d(2))
            size //= 2
        layers.append(nn.Flatten())
        width = rng.randint(3, 7)
        layers.append(nn.Linear(ch * size * size, width))
        if rng.random() < 0.4:
            layers.append(_bn(nn.BatchNorm1d, width, rng))
        layers += [nn.ReLU(), nn.Linear(width, classes)]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class ResidualNet(nn.Module):
    def __init__(self, rng: random.Random, classes: int):
        super().__init__()
        ch = rng.randint(2, 3)
        self.conv0 = nn.Conv2d(2, ch, 3, padding=1)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.bn1 = _bn(nn.BatchNorm2d, ch, rng)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(ch * 9, classes)

    def forward(self, x):
        h = torch.relu(self.conv0(x))
        h = torch.relu(h + self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        return self.fc(self.pool(h).view(h.size(0), -1))


class TiedMLP(nn.Module):
    """One BatchNorm module applied after two layers; optionally a channel with a large mean."""

    def __init__(self, rng: random.Random, classes: int, large_mean: bool = False):
        super().__init__()
        self.lin1, self.lin2, self.out = nn.Linear(72, 6), nn.Linear(6, 6), nn.Linear(6, classes)
        self.bn = _bn(nn.BatchNorm1d, 6, rng)
        with torch.no_grad():
            self.lin2.bias.add_(rng.uniform(-3, 3))
            if large_mean:
                self.lin1.weight[0].uniform_(-1e-3, 1e-3)
                self.lin1.bias[0] = 1e4

    def forward(self, x):
        h = F.relu(self.bn(self.lin1(x.flatten(1))))
        return self.out(F.relu(self.bn(self.lin2(h))))


def random_model(rng: random.Random, classes: int) -> nn.Module:
    kind = rng.choice(["conv", "conv", "residual", "tied", "large_mean"])
    if kind == "conv":
        model = ConvNet(rng, classes)
    elif kind == "residual":
        model = ResidualNet(rng, classes)
    else:
        model = TiedMLP(rng, classes, large_mean=kind == "large_mean")
    model.train(rng.random() < 0.5)
    if kind in ("tied", "large_mean") and rng.random() < 0.7:
        model.train()
    return model


# ------------------------------------------------------------------------------------------------ one example
def draw(seed: int) -> dict:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    classes = 3
    model = random_model(rng, classes)
    dtype = rng.choice([torch.float32, torch.float32, torch.float64])
    model = model.to(dtype)
    B = rng.randint(2, 3)
    norm = rng.choice([math.inf, 2.0])
    r = rng.random()
    if r < 0.15:
        eps = 0.0
    elif r < 0.25:
        eps = rng.uniform(0, 1e-6)
    else:
        eps = rng.uniform(0, 0.3 if norm == math.inf else 1.0)
    eps_kind = rng.choice(["float", "float32", "float64"])
    x = torch.rand(B, 2, 6, 6, dtype=torch.float64)
    x_dtype = torch.float64 if (dtype == torch.float32 and rng.random() < 0.3) else dtype
    x = x.to(x_dtype)
    clip = rng.random() < 0.6
    C_kind = rng.choice(["none", "margin32", "margin64", "random64"])
    y = torch.randint(0, classes, (B,))
    C = None
    if C_kind == "margin32":
        C = margin_spec(y, classes, dtype=dtype)
    elif C_kind == "margin64":
        C = margin_spec(y, classes, dtype=torch.float64)
    elif C_kind == "random64":
        C = torch.randn(B, 2, classes, dtype=torch.float64)
    if eps_kind == "float":
        eps_arg = eps
    else:
        eps_arg = torch.full((B,), eps, dtype=torch.float64).to(getattr(torch, eps_kind)) * \
            torch.tensor([1.0] + [rng.uniform(0.5, 1.0) for _ in range(B - 1)], dtype=torch.float64).to(
                getattr(torch, eps_kind))
    ex = dict(model=model, dtype=dtype, x=x, norm=norm, eps=eps_arg, clip=clip, C=C,
              autocast=rng.random() < 0.2, backend=rng.choice(BACKENDS),
              relu_lower=rng.choice(RELU_LOWER), method_order=rng.sample(["IBP", "CROWN-IBP", "CROWN", "alpha-CROWN"], 4))
    ex["patches"] = rng.choice(["auto", True])   # CROWN's passes from convolutions on patches wherever served
    return ex


def exact_eps(eps, B) -> torch.Tensor:
    """The radius as given, exactly (float64 holds a Python float and any float32)."""
    if isinstance(eps, torch.Tensor):
        return eps.to(torch.float64)
    return torch.full((B,), float(eps), dtype=torch.float64)


def attack_points(nodes, stats, x64, eps64, norm, lo_clip, hi_clip, C64, S, steps=10):
    """Points of the input set: the clean point, random points, a corner (L-inf) and PGD towards each
    specification row and side, in float64 on the function the bounds are about (``stats``: the clean batch's
    statistics for batch-statistics BatchNorm). Returns ``(points, values)``."""
    shape = (-1,) + (1,) * (x64.dim() - 1)
    e = eps64.view(shape)

    def values(p):
        out, _ = forward_with_statistics(nodes, p, stats)
        return out if C64 is None else torch.bmm(C64, out.unsqueeze(-1)).squeeze(-1)

    def proj(p):
        d = p - x64
        if norm == 2:
            n = d.flatten(1).norm(dim=1).clamp_min(1e-300).view(shape)
            d = d * torch.clamp(e / n, max=1.0)
        else:
            d = torch.maximum(torch.minimum(d, e), -e)
        return (x64 + d).clamp(lo_clip, hi_clip)

    pts = [x64.clone()]
    for _ in range(3):
        d = torch.randn_like(x64) if norm == 2 else torch.rand_like(x64) * 2 - 1
        pts.append(proj(x64 + d * e * (2 if norm == 2 else 1)))
    if norm != 2:
        pts.append(proj(x64 + e * torch.sign(torch.randn_like(x64))))
    for s in range(S):
        for sign in (1.0, -1.0):
            xa = proj(x64 + (torch.rand_like(x64) * 2 - 1) * e / 4).requires_grad_(True)
            for _ in range(steps):
                (g,) = torch.autograd.grad(sign * values(xa)[:, s].sum(), xa)
                if norm == 2:
                    g = g / g.flatten(1).norm(dim=1).clamp_min(1e-300).view(shape)
                    xa = proj(xa + 0.5 * e * g)
                else:
                    xa = proj(xa + 0.25 * e * g.sign())
                xa = xa.detach().requires_grad_(True)
            pts.append(xa.detach())
    with torch.no_grad():
        vals = [values(p) for p in pts]
    return pts, vals


def closest(vals, lb, ub, k=3) -> torch.Tensor:
    """Indices (k, B) of the points whose float64 values come closest to (or beyond) a bound, per example."""
    gaps = []
    for v in vals:
        gap = torch.full((v.shape[0],), math.inf, dtype=torch.float64)
        if lb is not None:
            gap = torch.minimum(gap, (v - lb.detach().double()).amin(1))
        if ub is not None:
            gap = torch.minimum(gap, (ub.detach().double() - v).amin(1))
        gaps.append(gap)
    return torch.stack(gaps).argsort(0)[:k]


def exactly_inside(p, x64, eps64, norm, lo_clip, hi_clip):
    if norm == 2:
        return inside_l2(inside_l2(p, x64, eps64).clamp(lo_clip, hi_clip), x64, eps64)
    return inside_linf(p, x64, eps64, lo_clip, hi_clip)


def run_example(seed: int) -> list[str]:
    ex = draw(seed)
    model, x, norm, eps, C = ex["model"], ex["x"], ex["norm"], ex["eps"], ex["C"]
    lo_clip, hi_clip = (0.0, 1.0) if ex["clip"] else (-math.inf, math.inf)
    bm = BoundedModule(model, x.to(ex["dtype"]))
    model64 = copy.deepcopy(model).double()
    nodes = capture(model64)
    x64 = x.to(torch.float64)
    eps64 = exact_eps(eps, x.shape[0])
    C64 = C.to(torch.float64) if C is not None else None
    train_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and uses_batch_stats(m) for m in model.modules())
    stats = forward_with_statistics(nodes, x64)[1] if train_bn else None
    S = C.shape[1] if C is not None else bm.num_outputs
    pts, vals = attack_points(nodes, stats, x64, eps64, norm, lo_clip, hi_clip, C64, S)
    exact_cache: dict = {}

    def exact_row(i: int, b: int):
        if (i, b) not in exact_cache:
            p = exactly_inside(pts[i][b:b + 1], x64[b:b + 1], eps64[b:b + 1], norm, lo_clip, hi_clip)
            out = exact_forward(model, p, clean_batch=x64 if train_bn else None) if not train_bn else None
            if train_bn:   # the batch statistics are the clean batch's: evaluate the point inside that batch
                batch = x64.clone()
                batch[b] = p[0]
                out = exact_forward(model, batch, clean_batch=x64)[b:b + 1]
            exact_cache[(i, b)] = exact_spec(None if C64 is None else C64[b:b + 1], out)[0]
        return exact_cache[(i, b)]

    problems = []
    for method in ex["method_order"]:
        with use_backend(ex["backend"]), torch.autocast("cpu", dtype=torch.bfloat16, enabled=ex["autocast"]), \
                _patches(ex["patches"]):
            opt = {"optimize_bound_args": {"iteration": 4, "lr_alpha": 1.0}} if method == "alpha-CROWN" else {}
            lb, ub = bm.compute_bounds(x, eps, norm=norm, method=method, C=C, x_min=lo_clip, x_max=hi_clip,
                                       relu_lower=ex["relu_lower"], **opt)
        lb, ub = lb.detach().double(), ub.detach().double()
        order = closest(vals, lb, ub)
        for k in range(order.shape[0]):
            for b in range(x.shape[0]):
                row = exact_row(int(order[k, b]), b)
                for s in range(row.shape[0]):
                    v = row[s]
                    if v.b < float(lb[b, s]) or v.a > float(ub[b, s]):
                        problems.append(f"seed {seed}, {method}: exact {v} outside [{float(lb[b, s])!r}, "
                                        f"{float(ub[b, s])!r}] (example {b}, row {s}; {describe(ex)})")
    return problems


@contextlib.contextmanager
def _patches(mode):
    saved = crown.PATCHES
    crown.PATCHES = mode
    try:
        yield
    finally:
        crown.PATCHES = saved


def describe(ex) -> str:
    eps = ex["eps"]
    return (f"{type(ex['model']).__name__} {'train' if ex['model'].training else 'eval'} {ex['dtype']}, "
            f"x {ex['x'].dtype}, norm {ex['norm']}, eps {eps if not isinstance(eps, torch.Tensor) else eps.tolist()}"
            f", clip {ex['clip']}, C {None if ex['C'] is None else ex['C'].dtype}, autocast {ex['autocast']}, "
            f"backend {ex['backend']}, relu_lower {ex['relu_lower']}, patches {ex['patches']}")


def test_no_exact_value_escapes_a_sound_bound(property_examples, property_seed, one_thread):
    problems = []
    for seed in range(property_seed, property_seed + property_examples):
        problems += run_example(seed)
    assert problems == [], "\n".join(problems[:20])


def test_the_search_finds_a_planted_violation(one_thread):
    """The attack and the exact check catch a bound that is wrong by a little (the bound of a linear model
    moved up by 1e-9 of its size)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(72, 2)).double()
    x = torch.rand(2, 2, 6, 6, dtype=torch.float64)
    eps = torch.full((2,), 0.05, dtype=torch.float64)
    lb, ub = BoundedModule(model, x).compute_bounds(x, eps, method="CROWN", x_min=-math.inf, x_max=math.inf)
    lb = lb + 1e-9 * lb.abs()
    pts, vals = attack_points(capture(model), None, x, eps, math.inf, -math.inf, math.inf, None, 2)
    order = closest(vals, lb, ub)
    found = 0
    for k in range(order.shape[0]):
        for b in range(2):
            p = exactly_inside(pts[int(order[k, b])][b:b + 1], x[b:b + 1], eps[b:b + 1], math.inf, -math.inf,
                               math.inf)
            found += sum(int(v.b < float(lb[b, s])) for s, v in enumerate(exact_forward(model, p)[0]))
    assert found > 0
