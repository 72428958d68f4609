"""Second-order flatness ops (robustkern::relu_bits, relu_pack_mask, relu_masked, softmax_ce_grad,
softmax_curvature, softmax_curvature_backward, conv2d_input_grad, linear_input_grad) and
robustkern.flatness.fused: every backend against the float64 reference, opcheck, gradcheck and gradgradcheck;
input gradients, parameter gradients of ||grad_x CE||_p and the LFR ascent direction against PyTorch's double
backprop (float64, tiny MLP and CNN with stride/padding); unsupported models refused with a reason.
The Triton kernels run interpreted on the CPU (tiny shapes), and compiled on CUDA when a GPU is present
(tests/_devices.py), against the reference computed on the CPU."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.library import opcheck

from _devices import backend_device_params, device_params, sized, to
from robustkern import use_backend
from robustkern.graph import UnsupportedLayerError
from robustkern.flatness import fused
from robustkern.ops import flatness as O
from robustkern.reference import flatness_ops as R

BACKENDS = backend_device_params("reference", "triton")
D = torch.float64
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.float64: dict(atol=1e-13, rtol=1e-12)}
# Compiled for a GPU, Triton evaluates fp32 tl.exp as ex2.approx and fp32 division as div.full (<= 2 ulp each;
# PyTorch and the interpreter round to 1/2 ulp). softmax_curvature_backward cancels products |g a| ~ 10:
# perturbing every exp and division of the fp32 reference formula by up to 2 ulp (uniformly, 300 draws) moved its
# outputs up to 2e-6 from the float64 reference on these inputs, C = 1 ... 370 (2.2e-6 from the fp32 reference,
# over TOL). So fp32 on CUDA is compared with the float64 reference at an atol of 4e-6. float64 (libdevice exp,
# IEEE division) keeps TOL.
CUDA_FP32_TOL = dict(atol=4e-6, rtol=1e-5)


def _x(shape, dtype=D, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    x.view(-1)[:3] = 0.0  # ties at exactly zero are inactive, as in torch's ReLU backward
    return x


# ----------------------------------------------------------------------------------------------- ops
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 8), (1,), (4, 3, 2, 3)])
def test_relu_bits_layout_and_masked(backend, device, shape):
    shape = sized(device, shape, (shape[0] * 257,) + shape[1:])   # on CUDA: several blocks of the kernels
    x = _x(shape, torch.float32)
    g = _x(shape, torch.float32, seed=1)
    with use_backend(backend):
        y, bits = O.relu_bits(x.to(device))
        packed = O.relu_pack_mask(x.to(device))
        masked = O.relu_masked(*to(device, g, bits))
    assert {t.device.type for t in (y, bits, packed, masked)} == {device}
    y, bits, packed, masked = (t.cpu() for t in (y, bits, packed, masked))
    flat = (x > 0).reshape(-1).tolist()
    assert bits.dtype == torch.uint8 and bits.shape == ((len(flat) + 7) // 8,)
    assert [(int(bits[i // 8]) >> (i % 8)) & 1 for i in range(len(flat))] == [int(f) for f in flat]
    assert torch.equal(packed, bits)
    assert torch.equal(y, torch.relu(x))
    assert torch.equal(masked, torch.where(x > 0, g, torch.zeros_like(g)))
    assert torch.equal(R.unpack_mask(bits, shape), x > 0)


def test_relu_masked_empty_and_bad_bits():
    assert O.relu_bits(torch.empty(0, 4))[1].numel() == 0
    g = torch.randn(3, 5)
    with pytest.raises(ValueError, match="needs 2"):
        O.relu_masked(g, torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        O.relu_masked(g, torch.zeros(2, dtype=torch.int32))
    with pytest.raises(TypeError, match="float32 or float64"):
        O.relu_bits(torch.ones(3, dtype=torch.int64))


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("C", [1, 3, 10])
def test_softmax_ops_match_reference(backend, device, dtype, C):
    C = sized(device, C, 37 * C)                                    # on CUDA: rows of up to 370 classes
    z, v, g = (_x((5, C), dtype, seed=s) * 3 for s in range(3))
    y = torch.randint(0, C, (5,), generator=torch.Generator().manual_seed(4))
    want = (R.softmax_ce_grad(z, y), R.softmax_curvature(z, v), R.softmax_curvature_backward(z, v, g))
    zd, vd, gd, yd = to(device, z, v, g, y)
    with use_backend(backend):
        got = (O.softmax_ce_grad(zd, yd), O.softmax_curvature(zd, vd), O.softmax_curvature_backward(zd, vd, gd))
    fast_math = device == "cuda" and dtype == torch.float32
    if fast_math:  # against the float64 reference of the same inputs, at CUDA_FP32_TOL (see there)
        z64, v64, g64 = z.double(), v.double(), g.double()
        ref64 = (R.softmax_ce_grad(z64, y), R.softmax_curvature(z64, v64), R.softmax_curvature_backward(z64, v64, g64))
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.device.type == device and a.dtype == dtype
        if fast_math:
            torch.testing.assert_close(a.cpu().double(), ref64[i], **CUDA_FP32_TOL)
        else:
            torch.testing.assert_close(a.cpu(), b, **TOL[dtype])
    # the reference states the calculus: the CE gradient and its Hessian-vector product, via autograd
    zz = z.detach().to(D).requires_grad_(True)
    ce_grad, = torch.autograd.grad(F.cross_entropy(zz, y, reduction="sum"), zz, create_graph=True)
    torch.testing.assert_close(want[0].to(D), ce_grad.detach(), **TOL[dtype])
    hvp, = torch.autograd.grad(ce_grad, zz, v.to(D), create_graph=True)
    torch.testing.assert_close(want[1].to(D), hvp.detach(), **TOL[dtype])
    third, = torch.autograd.grad(hvp, zz, g.to(D))
    torch.testing.assert_close(want[2].to(D), third, **TOL[dtype])


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("masked", [False, True])
def test_layer_input_grads_match_autograd(backend, device, masked):
    a = _x((2, 3, 7, 6))
    bits = R.relu_pack_mask(a) if masked else None
    x_in = (a.relu() if masked else a).requires_grad_(True)
    w = _x((4, 3, 3, 3), seed=1)
    out = F.conv2d(x_in, w, None, 2, 1)
    g = _x(out.shape, seed=2)
    want = torch.autograd.grad(out, x_in, g)[0] * ((a > 0) if masked else 1)
    a2 = _x((5, 6), seed=3)
    bits2 = R.relu_pack_mask(a2) if masked else None
    w2, g2 = _x((4, 6), seed=4), _x((5, 4), seed=5)
    want2 = (g2 @ w2) * ((a2 > 0) if masked else 1)
    with use_backend(backend):
        got = O.conv2d_input_grad(*to(device, g, w, bits), a.shape, 2, 1)
        got2 = O.linear_input_grad(*to(device, g2, w2, bits2))
    assert got.device.type == got2.device.type == device
    torch.testing.assert_close(got.cpu(), want, **TOL[D])
    torch.testing.assert_close(got2.cpu(), want2, **TOL[D])


def _op_cases():
    z, v, w = (_x((4, 6), seed=s).requires_grad_(True) for s in range(3))
    y = torch.tensor([0, 5, 2, 2])
    x = _x((3, 5, 7), seed=3)
    x = (x + torch.where(x >= 0, 0.1, -0.1)).requires_grad_(True)  # away from the kink: finite differences are valid
    bits = R.relu_pack_mask(x.detach())
    g = _x((3, 5, 7), seed=4).requires_grad_(True)
    a = _x((1, 2, 5, 4), seed=5)
    cw = _x((2, 2, 3, 3), seed=6).requires_grad_(True)
    cg = _x((1, 2, 3, 2), seed=7).requires_grad_(True)
    cb = R.relu_pack_mask(a)
    lw, lg = _x((4, 6), seed=8).requires_grad_(True), _x((5, 4), seed=9).requires_grad_(True)
    lb = R.relu_pack_mask(_x((5, 6), seed=10))
    conv = [list(a.shape), [2, 2], [1, 1], [1, 1], 1]
    ops = torch.ops.robustkern
    return {
        "relu_bits": (ops.relu_bits.default, (x,), lambda x: O.relu_bits(x)[0], (x,)),
        "relu_masked": (ops.relu_masked.default, (g, bits), lambda g: O.relu_masked(g, bits), (g,)),
        "softmax_ce_grad": (ops.softmax_ce_grad.default, (z, y), lambda z: O.softmax_ce_grad(z, y), (z,)),
        "softmax_curvature": (ops.softmax_curvature.default, (z, v), O.softmax_curvature, (z, v)),
        "softmax_curvature_backward": (ops.softmax_curvature_backward.default, (z, v, w),
                                       O.softmax_curvature_backward, (z, v, w)),
        "conv2d_input_grad": (ops.conv2d_input_grad.default, (cg, cw, cb, *conv),
                              lambda g, w: O.conv2d_input_grad(g, w, cb, a.shape, 2, 1), (cg, cw)),
        "conv2d_input_grad_nomask": (ops.conv2d_input_grad.default, (cg, cw, None, *conv),
                                     lambda g, w: O.conv2d_input_grad(g, w, None, a.shape, 2, 1), (cg, cw)),
        "linear_input_grad": (ops.linear_input_grad.default, (lg, lw, lb),
                              lambda g, w: O.linear_input_grad(g, w, lb), (lg, lw)),
    }


@pytest.mark.parametrize("name", list(_op_cases()))
def test_opcheck_gradcheck_gradgradcheck(name):
    op, op_args, fn, diff_args = _op_cases()[name]
    opcheck(op, op_args)
    assert gradcheck(fn, diff_args)
    assert gradgradcheck(fn, diff_args, fast_mode=True)  # slow mode: ~1 min for the conv op on 2 cores


def test_relu_pack_mask_opcheck():
    opcheck(torch.ops.robustkern.relu_pack_mask.default, (_x((3, 5)),))


# ----------------------------------------------------------------------------------------------- models
class TinyMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(12, 9), nn.Linear(9, 7), nn.Linear(7, 4)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(torch.relu(self.fc1(x)))))


class TinyResCNN(nn.Module):
    """Stride, padding, BatchNorm (eval), AvgPool, a residual +, a view and a ReLU feeding two layers."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.c3 = nn.Conv2d(4, 3, 2, stride=1, padding=0)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(3 * 1 * 1, 5)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = h + self.bn(self.c2(h))
        h = self.pool(torch.relu(self.c3(h)))
        return self.fc(h.view(h.size(0), -1))


def _model_rgb(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        m, shape = TinyMLP(), (6, 3, 4)
    else:
        m, shape = TinyResCNN(), (5, 2, 7, 7)
        with torch.no_grad():
            m.bn.running_mean.normal_()
            m.bn.running_var.uniform_(0.5, 2.0)
            m.bn.weight.normal_()
            m.bn.bias.normal_()
    m = m.double().eval()
    x = torch.randn(shape, dtype=D)
    y = torch.randint(0, 4, (shape[0],))
    return m, x, y


def _torch_grad(m, x, y):
    xx = x.clone().requires_grad_(True)
    z = m(xx)
    g, = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), xx, create_graph=True)
    return z, g, xx


class GreyCNN(nn.Module):
    """One input channel (the im2col weight gradient and col2im input gradient of robustkern.flatness.fused_step),
    stride 2 with padding, a stride-1 VALID conv, Flatten."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2)
        self.fc = nn.Linear(4 * 3 * 3, 4)

    def forward(self, x):
        return self.fc(torch.flatten(F.relu(self.c2(F.relu(self.c1(x)))), 1))


class PoolCNN(nn.Module):
    """Max pooling (overlapping windows with padding, and plain 2x2) between ReLU conv layers, as in LFR's
    SmallCNN; the fused paths keep each pool's selections."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3, padding=1)
        self.p1 = nn.MaxPool2d(3, stride=2, padding=1)
        self.c2 = nn.Conv2d(3, 4, 2)
        self.p2 = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        h = self.p1(F.relu(self.c1(x)))
        return self.fc(torch.flatten(self.p2(F.relu(self.c2(h))), 1))


def _model(kind):
    if kind == "pool":
        torch.manual_seed(0)
        return PoolCNN().double().eval(), torch.randn(5, 1, 7, 7, dtype=D), torch.randint(0, 4, (5,))
    if kind == "grey":
        torch.manual_seed(0)
        return GreyCNN().double().eval(), torch.randn(5, 1, 7, 7, dtype=D), torch.randint(0, 4, (5,))
    return _model_rgb(kind)


def _on(device, m, x, y):
    """A copy of the model, and the batch, on ``device`` (the reference keeps the CPU originals)."""
    return (copy.deepcopy(m).to(device),) + to(device, x, y)


# On CUDA the fused path's ops (``auto``) run the compiled Triton kernels, in float64; the reference is PyTorch's
# double backprop on the CPU.
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", ["ops", "step"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "grey", "pool"])
@pytest.mark.parametrize("p", [1, 2])
def test_input_gradient_and_double_backward_match_torch(kind, p, impl, device):
    m, x, y = _model(kind)
    assert fused.supports(m)
    z_t, g_t, _ = _torch_grad(m, x, y)
    md, xd, yd = _on(device, m, x, y)
    z_f, g_f = fused.input_gradient(md, xd, yd, create_graph=True, impl=impl)
    assert z_f.device.type == g_f.device.type == device
    torch.testing.assert_close(z_f.cpu(), z_t, **TOL[D])
    torch.testing.assert_close(g_f.cpu(), g_t, **TOL[D])
    assert g_f.abs().max() > 0
    pen_t = F.cross_entropy(z_t, y) + g_t.flatten(1).norm(p=p, dim=1).sum()
    pen_f = F.cross_entropy(z_f, yd) + g_f.flatten(1).norm(p=p, dim=1).sum()
    want = torch.autograd.grad(pen_t, list(m.parameters()))
    got = torch.autograd.grad(pen_f, list(md.parameters()))
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, **TOL[D])
    _, g0 = fused.input_gradient(md, xd, yd, create_graph=False, impl=impl)
    assert g0.grad_fn is None
    torch.testing.assert_close(g0.cpu(), g_t.detach(), **TOL[D])


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("impl", ["ops", "step"])
@pytest.mark.parametrize("kind", ["mlp", "cnn", "grey", "pool"])
@pytest.mark.parametrize("p", [1, 2])
def test_lfr_ascent_direction_matches_double_backprop(kind, p, impl, device):
    m, x, y = _model(kind)
    _, g, xx = _torch_grad(m, x, y)
    want, = torch.autograd.grad(g.flatten(1).norm(p=p, dim=1).sum(), xx)
    got = fused.lfr_ascent_direction(*_on(device, m, x, y), p=p, impl=impl)
    assert got.grad_fn is None and got.device.type == device
    assert want.abs().max() > 0
    torch.testing.assert_close(got.cpu(), want, **TOL[D])


@pytest.mark.parametrize("impl", ["ops", "step"])
@pytest.mark.parametrize("kind", ["cnn", "grey", "pool"])
def test_gradient_wrt_input_through_fused_graph(kind, impl):
    """create_graph=True also differentiates in x: J^T (diag p - p p^T) J v, like torch; with the logits in the
    loss too (both adjoints of the step's node at once)."""
    m, x, y = _model(kind)
    _, g_t, xx = _torch_grad(m, x, y)
    z_t = m(xx)
    params = list(m.parameters())
    want = torch.autograd.grad(g_t.pow(2).sum() + z_t.sin().sum(), [xx] + params)
    x2 = x.clone().requires_grad_(True)
    z_f, g_f = fused.input_gradient(m, x2, y, create_graph=True, impl=impl)
    got = torch.autograd.grad(g_f.pow(2).sum() + z_f.sin().sum(), [x2] + params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[D])


def test_step_impl_logits_only_and_third_order():
    """The one-node step: a loss of the logits alone gives the ordinary gradients; differentiating its double
    backward again raises (the op-based impl keeps every order)."""
    m, x, y = _model("grey")
    params = list(m.parameters())
    z, _ = fused.input_gradient(m, x, y, create_graph=True, impl="step")
    want = torch.autograd.grad(F.cross_entropy(m(x), y), params)
    for a, b in zip(torch.autograd.grad(F.cross_entropy(z, y), params), want):
        torch.testing.assert_close(a, b, **TOL[D])
    _, g = fused.input_gradient(m, x, y, create_graph=True, impl="step")
    first = torch.autograd.grad(g.pow(2).sum(), params[0], create_graph=True)[0]
    with pytest.raises(RuntimeError):
        torch.autograd.grad(first.sum(), params[0])
    with pytest.raises(ValueError, match="impl"):
        fused.input_gradient(m, x, y, create_graph=False, impl="fast")


@pytest.mark.parametrize("layer,why", [(nn.MaxPool2d(2, return_indices=True), "return_indices"),
                                       (nn.Tanh(), "Tanh")])
def test_unsupported_models_are_refused_with_reason(layer, why):
    m = nn.Sequential(nn.Conv2d(1, 2, 3), layer, nn.Flatten(), nn.LazyLinear(3))
    assert not fused.supports(m)
    assert why in fused.unsupported_reason(m)
    with pytest.raises(UnsupportedLayerError, match=why):
        fused.input_gradient(m, torch.randn(2, 1, 6, 6), torch.tensor([0, 1]), create_graph=False)


def test_training_mode_batchnorm_and_bad_arguments():
    m, x, y = _model("cnn")
    m.bn.train()
    assert not fused.supports(m) and "BatchNorm2d" in fused.unsupported_reason(m)
    m.eval()
    with pytest.raises(ValueError, match="int64 labels"):
        fused.input_gradient(m, x, y[:-1], create_graph=False)
    with pytest.raises(ValueError, match="p must be"):
        fused.lfr_ascent_direction(m, x, y, p=3)


@pytest.mark.parametrize("strided_cl", [True, False])
@pytest.mark.parametrize("kind", ["cnn", "grey"])
def test_step_kernel_choices_match_torch(kind, strided_cl, monkeypatch):
    """The strided layers of these models take the fold by default; without it they run the channels-last
    transposed convolution (strided_cl) or ATen's NCHW one: every choice still equals double backprop."""
    from robustkern.flatness import fused_step

    monkeypatch.setattr(fused_step, "STRIDED_CHANNELS_LAST", strided_cl)
    monkeypatch.setattr(fused_step, "FOLD_MAX_IN", 0)
    m, x, y = _model(kind)
    _, g_t, xx = _torch_grad(m, x, y)
    params = list(m.parameters())
    want = torch.autograd.grad(g_t.abs().sum() + m(xx).logsumexp(1).sum(), [xx] + params)
    x2 = x.clone().requires_grad_(True)
    z, g = fused.input_gradient(m, x2, y, create_graph=True, impl="step")
    got = torch.autograd.grad(g.abs().sum() + z.logsumexp(1).sum(), [x2] + params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL[D])


def test_max_pool_is_for_the_gradient_paths_only():
    """capture() refuses MaxPool2d for bound propagation (named in the error) and takes it for the fused
    input-gradient paths, which ask for it."""
    from robustkern.graph import capture

    m, _, _ = _model("pool")
    with pytest.raises(UnsupportedLayerError, match="MaxPool2d"):
        capture(m)
    assert [n.kind for n in capture(m, extra=("maxpool",))].count("maxpool") == 2
    assert fused.supports(m)


def test_unsupported_message_lists_what_each_caller_takes():
    """The flatness paths name MaxPool2d among what they support; bound propagation's message does not."""
    from robustkern.graph import capture

    m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))
    assert fused.unsupported_reason(m).rstrip().endswith("MaxPool2d")
    with pytest.raises(UnsupportedLayerError) as info:
        capture(m)
    assert "Tanh" in str(info.value) and "MaxPool2d" not in str(info.value)
