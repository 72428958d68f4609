"""CROWN's intermediate passes on patches (robustkern.bounds.patches): the same bounds as dense rows over every
neuron (float64 and float32, L-inf and L2, CROWN and alpha-CROWN, sound or not) on convolutional nets with
BatchNorm, padding/stride/dilation variants, average pooling and residual additions; passes that patches do not
serve fall back to dense rows; and no pass builds a dense (rows x all neurons) matrix."""
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import robustkern.bounds.crown as crown
import robustkern.bounds.patches as patches
from robustkern.bounds import BoundedModule, margin_spec


class Residual(nn.Module):
    """conv -> relu -> (conv, BatchNorm, relu, conv) + skip -> relu -> avgpool -> strided conv -> relu -> linear."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv3 = nn.Conv2d(4, 5, 4, stride=2, padding=1)
        self.fc = nn.Linear(5 * 3 * 3, 4)

    def forward(self, x):
        h = torch.relu(self.conv0(x))
        h = torch.relu(h + self.conv2(torch.relu(self.bn(self.conv1(h)))))
        return self.fc(torch.relu(self.conv3(self.pool(h))).flatten(1))


class LinearThenConv(nn.Module):
    """A convolution over a reshaped linear layer: its pass meets the reshape, which patches do not serve."""

    def __init__(self):
        super().__init__()
        self.fc0 = nn.Linear(2 * 12 * 12, 3 * 6 * 6)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 6 * 6, 4)

    def forward(self, x):
        h = torch.relu(self.fc0(x.flatten(1))).view(-1, 3, 6, 6)
        return self.fc(torch.relu(self.conv(h)).flatten(1))


def strided_bn():
    return nn.Sequential(nn.Conv2d(2, 4, 4, 2, 1), nn.ReLU(), nn.Conv2d(4, 6, 4, 2, 1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, 1, 0), nn.ReLU(), nn.Flatten(), nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))


def odd_geometry():   # padding larger than the kernel's reach, a rectangular dilated kernel, an odd input size
    return nn.Sequential(nn.Conv2d(2, 3, 3, 2, 2), nn.ReLU(), nn.Conv2d(3, 4, (3, 2), 1, (0, 1), dilation=(1, 2)),
                         nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 7, 4))


MODELS = {"strided_bn": strided_bn, "odd_geometry": odd_geometry, "residual": Residual}


def make(name, dtype):
    torch.manual_seed(0)
    model = MODELS[name]()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):   # eval statistics that are not the identity
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(-1, 1)
    model = model.eval().to(dtype)
    size = 11 if name == "odd_geometry" else 12
    x = torch.rand(3, 2, size, size, dtype=dtype)
    return model, x, margin_spec(torch.tensor([0, 2, 3]), 4, dtype=dtype)


def bounds(bm, x, C, *, patches_on, **kw):
    """``compute_bounds`` on patches (PATCHES True: wherever served) or on dense rows over every neuron."""
    saved = crown.PATCHES, crown.SPARSE_INTERMEDIATE
    crown.PATCHES, crown.SPARSE_INTERMEDIATE = (True, True) if patches_on else (False, False)
    try:
        return bm.compute_bounds(x, C=C, **kw)
    finally:
        crown.PATCHES, crown.SPARSE_INTERMEDIATE = saved


def counting_patches_passes(monkeypatch) -> list:
    calls = []
    original = crown.patches_bound

    def counted(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)
    monkeypatch.setattr(crown, "patches_bound", counted)
    return calls


CASES = [(name, dtype, norm, method, sound)
         for name in MODELS for dtype in (torch.float64, torch.float32) for norm, method, sound in
         [(math.inf, "CROWN", False), (2, "CROWN", True), (math.inf, "alpha-CROWN", True), (2, "alpha-CROWN", False)]]


@pytest.mark.parametrize("name,dtype,norm,method,sound", CASES)
def test_patches_give_the_dense_bounds(name, dtype, norm, method, sound, monkeypatch):
    model, x, C = make(name, dtype)
    bm = BoundedModule(model, x)
    eps = 0.05 if norm == math.inf else 0.3
    kw = dict(eps=eps, norm=norm, method=method, sound=sound)
    if method == "alpha-CROWN":
        kw["optimize_bound_args"] = {"iteration": 3}
    with torch.no_grad():
        dense = bounds(bm, x, C, patches_on=False, **kw)
        passes = counting_patches_passes(monkeypatch)
        ours = bounds(bm, x, C, patches_on=True, **kw)
    assert passes, "no pass ran on patches"
    scale = float(dense[0].abs().max() + dense[1].abs().max())
    for got, want in zip(ours, dense):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6 * scale)


def test_a_pass_that_meets_a_reshape_runs_dense(monkeypatch):
    torch.manual_seed(1)
    model = LinearThenConv().eval().double()
    x = torch.rand(2, 2, 12, 12, dtype=torch.float64)
    C = margin_spec(torch.tensor([1, 3]), 4, dtype=torch.float64)
    bm = BoundedModule(model, x)
    with torch.no_grad():
        dense = bounds(bm, x, C, patches_on=False, eps=0.05, method="CROWN", sound=False)
        passes = counting_patches_passes(monkeypatch)
        ours = bounds(bm, x, C, patches_on=True, eps=0.05, method="CROWN", sound=False)
    assert passes == []
    for got, want in zip(ours, dense):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_residual_branches_meet_on_the_union_of_their_windows():
    """From the residual sum, the skip path reaches conv0's ReLU with a 1x1 window and the path through conv1 and
    conv2 (3x3, padding 1 each) with a 5x5 one: they are summed on the 5x5 window."""
    model, x, _ = make("residual", torch.float64)
    bm = BoundedModule(model, x)
    bm.compute_bounds(x, 0.01, method="CROWN", sound=False)   # records the node shapes
    ctx = SimpleNamespace(shapes=bm._shapes, nodes=bm.nodes, index={n.name: i for i, n in enumerate(bm.nodes)})
    add = next(n for n in bm.nodes if n.kind == "add")
    relu0 = next(i for i in add.inputs if bm.nodes[ctx.index[i]].kind == "relu")
    assert patches.plan(ctx, add.name)[relu0] == patches.Geometry(5, 5, 1, 1, 2, 2)


class LargestTensor(TorchDispatchMode):
    """The largest number of elements of any tensor an op returns while the mode is on."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_pass_builds_a_dense_matrix_over_all_neurons():
    """On a net whose ReLU inputs are all convolution outputs, a dense pass from conv2's 16x7x7 neurons holds
    (B, 784 rows, 8x14x14) coefficients; patches hold (B, 784, 8x4x4) and (B, 784, 10x10) over the input."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 4, 2, 1), nn.ReLU(), nn.Conv2d(8, 16, 4, 2, 1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16 * 7 * 7, 10))
    B = 2
    x = torch.rand(B, 1, 28, 28)
    bm = BoundedModule(model, x)
    dense_size = B * (16 * 7 * 7) * (8 * 14 * 14)
    rows = 16 * 7 * 7
    bound = B * rows * 8 * 4 * 4 * 2           # the largest patches (over conv1's ReLU), with room for one copy

    def largest(patches_on):
        with LargestTensor() as mode, torch.no_grad():
            bounds(bm, x, None, patches_on=patches_on, eps=0.3, method="CROWN", sound=False)
        return mode.largest
    assert largest(False) >= dense_size       # the measurement sees a dense pass when there is one
    assert largest(True) <= bound < dense_size // 4


@pytest.mark.parametrize("method", ["CROWN", "alpha-CROWN"])
def test_patches_passes_in_chunks_of_rows_give_the_same_bounds(method, monkeypatch):
    model, x, C = make("strided_bn", torch.float64)
    bm = BoundedModule(model, x)
    kw = dict(eps=0.05, method=method, sound=False)
    if method == "alpha-CROWN":
        kw["optimize_bound_args"] = {"iteration": 3}
    with torch.no_grad():
        whole = bounds(bm, x, C, patches_on=True, **kw)
        passes = counting_patches_passes(monkeypatch)
        chunked = bounds(bm, x, C, patches_on=True, crown_batch_size=7, **kw)
    assert len(passes) > 2 * len({*passes})      # several passes per start node
    for got, want in zip(chunked, whole):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("stride,dilation", [((2, 2), (1, 1)), ((1, 2), (2, 1))])
def test_tap_composition_is_the_transposed_convolution_and_differentiates_twice(stride, dilation):
    """``patches._compose`` on one output channel (the tap-by-tap path) against ``conv_transpose2d``, with its
    own backward checked by gradcheck and gradgradcheck."""
    torch.manual_seed(0)
    P = torch.randn(3, 2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(4, 1, 3, 2, dtype=torch.float64, requires_grad=True)
    got = patches._compose(P, w, stride, dilation, 1)
    want = torch.nn.functional.conv_transpose2d(P.permute(0, 3, 1, 2), w, None, stride, 0, 0, 1, dilation)
    torch.testing.assert_close(got, want.permute(0, 2, 3, 1))
    f = lambda P, w: patches._compose(P, w, stride, dilation, 1)  # noqa: E731
    assert torch.autograd.gradcheck(f, (P, w))
    assert torch.autograd.gradgradcheck(f, (P, w))
