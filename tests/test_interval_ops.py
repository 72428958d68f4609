"""The public interval ops against the reference on every backend present: values, gradients, opcheck,
gradcheck/gradgradcheck (float64), floating-point soundness, odd shapes, non-contiguous inputs, empty batch,
bad input."""
import itertools

import pytest
import torch
from torch.library import opcheck

from robustkern import ops, use_backend
from robustkern.reference import interval as ref
from robustkern.testing import assert_box_contains, backend_params, tolerance

BACKENDS = backend_params("cpu")
DTYPES = [torch.float32, torch.float64]


def box(*shape, dtype=torch.float64, scale=1.0):
    mid = (torch.randn(*shape, dtype=dtype) * scale)
    rad = torch.rand(*shape, dtype=dtype) * scale
    return mid, rad


def epilogues(n, dtype):
    s = torch.randn(n, dtype=dtype)
    t = torch.randn(n, dtype=dtype)
    return [dict(), dict(relu=True), dict(scale=s, shift=t), dict(scale=s, shift=t, relu=True), dict(shift=t)]


def linear_cases(dtype):
    B, K, N = 3, 7, 5
    cases = []
    for per_example, with_bias, epi in itertools.product((False, True), (False, True), epilogues(N, dtype)):
        mid, rad = box(B, K, dtype=dtype)
        w = torch.randn(*((B,) if per_example else ()), N, K, dtype=dtype)
        b = torch.randn(*((B,) if per_example else ()), N, dtype=dtype) if with_bias else None
        cases.append(((mid, rad, w, b), epi))
    return cases


def conv_cases(dtype):
    out = []
    confs = [dict(stride=1, padding=0, dilation=1, groups=1), dict(stride=2, padding=1, dilation=1, groups=1),
             dict(stride=1, padding=2, dilation=2, groups=2), dict(stride=(2, 1), padding=(1, 0), dilation=1, groups=1)]
    for conf, epi in zip(confs, [dict(), dict(relu=True), None, dict(shift=None)]):
        C, O = 4, 4
        mid, rad = box(2, C, 6, 5, dtype=dtype)
        w = torch.randn(O, C // conf["groups"], 3, 3, dtype=dtype)
        b = torch.randn(O, dtype=dtype)
        e = epi if epi is not None else dict(scale=torch.randn(O, dtype=dtype), shift=torch.randn(O, dtype=dtype),
                                             relu=True)
        out.append(((mid, rad, w, b), conf, e))
    return out


def _close(a, b, dtype):
    torch.testing.assert_close(a, b, **tolerance(dtype))


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sound", [False, True])
def test_linear_matches_reference(backend, dtype, sound):
    for (mid, rad, w, b), epi in linear_cases(dtype):
        with use_backend(backend):
            m, r, pre = ops.interval_linear(mid, rad, w, b, sound=sound, return_pre=True, **epi)
        rm, rr, rpm, rpr = ref.interval_linear(mid, rad, w, b, sound=sound, **epi)
        _close(m, rm, dtype)
        _close(r, rr, dtype)
        if pre is not None:
            _close(pre[0], rpm, dtype)
            _close(pre[1], rpr, dtype)
        else:
            assert rpm.numel() == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sound", [False, True])
def test_conv2d_matches_reference(backend, dtype, sound):
    for (mid, rad, w, b), conf, epi in conv_cases(dtype):
        with use_backend(backend):
            m, r = ops.interval_conv2d(mid, rad, w, b, sound=sound, **conf, **epi)
        stride, padding = conf["stride"], conf["padding"]
        stride = stride if isinstance(stride, tuple) else (stride, stride)
        padding = padding if isinstance(padding, tuple) else (padding, padding)
        rm, rr, _, _ = ref.interval_conv2d(mid, rad, w, b, stride, padding, (conf["dilation"],) * 2, conf["groups"],
                                           sound=sound, **epi)
        _close(m, rm, dtype)
        _close(r, rr, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (2, 3, 4, 5)])
def test_affine_and_input_box_match_reference(backend, dtype, shape):
    mid, rad = box(*shape, dtype=dtype)
    for epi in epilogues(shape[1], dtype)[1:]:
        for sound in (False, True):
            with use_backend(backend):
                m, r = ops.interval_affine(mid, rad, sound=sound, **epi)
            rm, rr = ref.interval_affine(mid, rad, sound=sound, **epi)
            _close(m, rm, dtype)
            _close(r, rr, dtype)
    x = torch.rand(*shape, dtype=dtype)
    eps = torch.rand(shape[0], dtype=dtype) * 0.3
    for sound in (False, True):
        with use_backend(backend):
            m, r = ops.interval_input_box(x, eps, 0.0, 1.0, sound=sound)
        rm, rr = ref.interval_input_box(x, eps, 0.0, 1.0, sound=sound)
        _close(m, rm, dtype)
        _close(r, rr, dtype)


# ------------------------------------------------------------------------------------------ soundness
@pytest.mark.parametrize("backend", BACKENDS)
def test_float32_sound_boxes_contain_exact_boxes(backend):
    """The float32 box with sound=True contains the float64 box of the same float32 inputs (its end points taken
    as the real numbers ``mid -/+ rad``: summed in float32 they could round inwards)."""
    torch.manual_seed(1)
    for (mid, rad, w, b), epi in linear_cases(torch.float32):
        with use_backend(backend):
            m, r = ops.interval_linear(mid * 100, rad, w, b, sound=True, **epi)
        d = {k: (v.double() if torch.is_tensor(v) else v) for k, v in epi.items()}
        em, er, _, _ = ref.interval_linear((mid * 100).double(), rad.double(), w.double(),
                                           None if b is None else b.double(), sound=False, **d)
        m, r = m.double(), r.double()
        assert_box_contains(m - r, m + r, em - er, em + er, "interval_linear")
    for (mid, rad, w, b), conf, epi in conv_cases(torch.float32):
        with use_backend(backend):
            m, r = ops.interval_conv2d(mid, rad, w, b, sound=True, **conf, **epi)
        s = conf["stride"] if isinstance(conf["stride"], tuple) else (conf["stride"],) * 2
        p = conf["padding"] if isinstance(conf["padding"], tuple) else (conf["padding"],) * 2
        d = {k: (v.double() if torch.is_tensor(v) else v) for k, v in epi.items()}
        em, er, _, _ = ref.interval_conv2d(mid.double(), rad.double(), w.double(), b.double(), s, p,
                                           (conf["dilation"],) * 2, conf["groups"], sound=False, **d)
        m, r = m.double(), r.double()
        assert_box_contains(m - r, m + r, em - er, em + er, "interval_conv2d")


def test_widening_is_needed_and_small():
    """Cancellation makes the unwidened float32 centre wrong by more than its radius; the widened box still
    contains the exact one, and the widening stays a relative O(K u)."""
    K = 512
    w = torch.ones(1, K)
    mid = torch.full((1, K), 1.0 + 2**-20)
    mid[0, K // 2:] = -1.0
    mid = mid[:, torch.randperm(K)]
    rad = torch.zeros(1, K)
    m32, r32 = ops.interval_linear(mid, rad, w, sound=True)
    exact = mid.double().sum()
    assert float(m32 - r32) <= float(exact) <= float(m32 + r32)
    mag = mid.double().abs().sum()
    assert float(r32) < 4 * K * 2**-24 * float(mag)


def test_relu_keeps_nan():
    mid = torch.tensor([[float("nan"), -1.0, 2.0]])
    m, r = ops.interval_affine(mid, torch.zeros_like(mid), relu=True)
    assert torch.isnan(m[0, 0]) and torch.isnan(r[0, 0])
    assert m[0, 1] == 0 and m[0, 2] == 2


# ------------------------------------------------------------------------------------------ gradients
def _linear_fn(epi):
    return lambda m, r, w, b: ops.interval_linear(m, r, w, b, sound=False, **epi)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_reference_autograd(backend):
    dtype = torch.float64
    for (mid, rad, w, b), epi in linear_cases(dtype)[:10]:
        leaves = [t.clone().requires_grad_(True) for t in (mid, rad, w) + ((b,) if b is not None else ())]
        epi_l = {k: (v.clone().requires_grad_(True) if torch.is_tensor(v) else v) for k, v in epi.items()}
        args = leaves + ([None] if b is None else [])
        with use_backend(backend):
            out = ops.interval_linear(*args, sound=False, **epi_l)
        ref_out = ref.interval_linear(*args, sound=False, **epi_l)[:2]
        gm, gr = torch.randn_like(out[0]), torch.randn_like(out[1])
        inputs = leaves + [v for v in epi_l.values() if torch.is_tensor(v)]
        got = torch.autograd.grad(out, inputs, (gm, gr))
        want = torch.autograd.grad(ref_out, inputs, (gm, gr))
        for g, h in zip(got, want):
            _close(g, h, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_and_gradgradcheck(backend):
    dt = torch.float64
    rg = lambda *s: torch.randn(*s, dtype=dt, requires_grad=True)  # noqa: E731
    rp = lambda *s: torch.rand(*s, dtype=dt).add(0.1).requires_grad_(True)  # noqa: E731
    scale, shift = rg(3), rg(3)
    with use_backend(backend):
        lin = lambda m, r, w, b, s, t: ops.interval_linear(m, r, w, b, scale=s, shift=t, relu=True)  # noqa: E731
        args = (rg(2, 4), rp(2, 4), rg(3, 4), rg(3), scale, shift)
        assert torch.autograd.gradcheck(lin, args)
        assert torch.autograd.gradgradcheck(lin, args)
        conv = lambda m, r, w, b: ops.interval_conv2d(m, r, w, b, stride=1, padding=1, relu=True)  # noqa: E731
        cargs = (rg(1, 2, 3, 3), rp(1, 2, 3, 3), rg(2, 2, 2, 2), rg(2))
        assert torch.autograd.gradcheck(conv, cargs)
        assert torch.autograd.gradgradcheck(conv, cargs)
        aff = lambda m, r, s, t: ops.interval_affine(m, r, s, t, relu=True)  # noqa: E731
        assert torch.autograd.gradcheck(aff, (rg(2, 3, 2), rp(2, 3, 2), rg(3), rg(3)))
        x = torch.rand(2, 5, dtype=dt).mul(0.8).add(0.1).requires_grad_(True)
        eps = torch.full((2,), 0.05, dtype=dt, requires_grad=True)
        assert torch.autograd.gradcheck(lambda x, e: ops.interval_input_box(x, e), (x, eps))


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    dt = torch.float32
    mid, rad = box(2, 3, dtype=dt)
    w, b, s, t = torch.randn(4, 3), torch.randn(4), torch.randn(4), torch.randn(4)
    cm, cr = box(1, 2, 4, 4, dtype=dt)
    cw = torch.randn(2, 2, 3, 3, requires_grad=True)
    with use_backend(backend):
        opcheck(torch.ops.robustkern.interval_linear.default,
                (mid.requires_grad_(), rad, w.requires_grad_(), b, s, t, True, True))
        opcheck(torch.ops.robustkern.interval_conv2d.default,
                (cm, cr, cw, None, [1, 1], [1, 1], [1, 1], 1, None, None, True, True))
        opcheck(torch.ops.robustkern.interval_affine.default, (cm, cr, torch.randn(2), None, True, True))
        opcheck(torch.ops.robustkern.interval_input_box.default,
                (torch.rand(2, 3), torch.full((2,), 0.1), 0.0, 1.0, True))


# ------------------------------------------------------------------------------------------ layouts and edges
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_empty(backend):
    mid, rad = box(5, 6, dtype=torch.float32)
    w = torch.randn(6, 4)  # used transposed: (4, 6) non-contiguous
    with use_backend(backend):
        m, r = ops.interval_linear(mid[::2], rad[::2], w.t(), None)
    rm, rr, _, _ = ref.interval_linear(mid[::2].contiguous(), rad[::2].contiguous(), w.t().contiguous())
    _close(m, rm, torch.float32)
    _close(r, rr, torch.float32)
    cm, cr = box(2, 3, 5, 5, dtype=torch.float32)
    with use_backend(backend):
        m, r = ops.interval_conv2d(cm.transpose(2, 3), cr.transpose(2, 3), torch.randn(2, 3, 3, 3), None, padding=1)
        em, er = ops.interval_linear(mid[:0], rad[:0], torch.randn(4, 6), torch.randn(4), relu=True)
        cm0, cr0 = ops.interval_conv2d(cm[:0], cr[:0], torch.randn(2, 3, 3, 3), None)
    assert m.shape == (2, 2, 5, 5) and bool((r >= 0).all())
    assert em.shape == (0, 4) and er.shape == (0, 4)
    assert cm0.shape == (0, 2, 3, 3)


def test_bad_input_is_a_clear_error():
    mid, rad = box(2, 3, dtype=torch.float32)
    with pytest.raises(TypeError, match="float32 or float64"):
        ops.interval_linear(mid.half(), rad.half(), torch.randn(4, 3).half())
    with pytest.raises(ValueError, match="weight must be"):
        ops.interval_linear(mid, rad, torch.randn(4, 5))
    with pytest.raises(ValueError, match="same shape"):
        ops.interval_linear(mid, rad[:1], torch.randn(4, 3))
    with pytest.raises(ValueError, match="bias must be"):
        ops.interval_linear(mid, rad, torch.randn(4, 3), torch.randn(3))
    with pytest.raises(ValueError, match="scale must have shape"):
        ops.interval_linear(mid, rad, torch.randn(4, 3), scale=torch.randn(3))
    with pytest.raises(ValueError, match="does not fit"):
        ops.interval_conv2d(*box(1, 3, 5, 5, dtype=torch.float32), torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="too small"):
        ops.interval_conv2d(*box(1, 2, 2, 2, dtype=torch.float32), torch.randn(2, 2, 3, 3))
    with pytest.raises(ValueError, match="eps must be"):
        ops.interval_input_box(torch.rand(2, 3), torch.rand(3))


@pytest.mark.skipif("cpp" not in [p.values[0] for p in BACKENDS], reason="compiled CPU backend not built")
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_epilogue_backward_equals_pytorch_formulas(dtype):
    """The single-pass C++ epilogue backward (used when no double backward is recorded) equals the
    differentiable PyTorch formulas it replaces."""
    from robustkern.ops.interval import _epilogue_grads

    for shape, layout in [((3, 4), None), ((2, 4, 3, 5), None), ((2, 4, 3, 5), torch.channels_last),
                          ((1, 300, 2, 1), None)]:
        pm, pr = box(*shape, dtype=dtype)
        gm, gr = torch.randn(*shape, dtype=dtype), torch.randn(*shape, dtype=dtype)
        if layout is not None:  # NHWC boxes and gradients: the kernel's [B*H*W][C] rows path
            pm, pr, gm, gr = (t.contiguous(memory_format=layout) for t in (pm, pr, gm, gr))
        for epi in epilogues(shape[1], dtype):
            args = (pm, pr, epi.get("scale"), epi.get("shift"), epi.get("relu", False), gm, gr)
            with torch.enable_grad():
                want = _epilogue_grads(*args)
            with use_backend("cpp"), torch.no_grad():
                got = _epilogue_grads(*args)
            for g, h in zip(got, want):
                assert (g is None) == (h is None)
                if g is not None:
                    _close(g, h, dtype)
