"""Triton interval (IBP) kernels against the reference (robustkern.reference.interval).

Runs the kernels in Triton's CPU interpreter on tiny shapes when there is no GPU (tests/conftest.py then sets
TRITON_INTERPRET=1 before any kernel is defined; no test module sets it), or compiled on CUDA when a GPU is
present. Checks, for float32 and float64:
the centre matches the reference; the radius matches it and is never smaller beyond rounding; and, for
``sound=True`` in float32, that the returned real box contains the float64 reference box computed from the
same (float32-valued) inputs: the floating-point soundness property.
"""
import inspect

import pytest
import torch

pytest.importorskip("triton")

from robustkern.kernels import interval as K  # noqa: E402
from robustkern.kernels._config import autotune_configs, is_interpreting  # noqa: E402
from robustkern.reference import interval as R  # noqa: E402

pytestmark = pytest.mark.triton

if not is_interpreting() and not torch.cuda.is_available():
    pytest.skip("Triton kernels need TRITON_INTERPRET=1 or a CUDA device", allow_module_level=True)

DEVICE = "cpu" if is_interpreting() else "cuda"
DTYPES = [torch.float32, torch.float64]
# dtype -> (atol, rtol) for the centre and radius against the same-precision reference.
TOL = {torch.float32: (3e-5, 1e-5), torch.float64: (1e-12, 1e-12)}


# ----------------------------------------------------------------------------------------------- helpers
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, dtype, seed, scale=1.0):
    return (torch.randn(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def rand(*shape, dtype, seed, scale=1.0):
    return (torch.rand(*shape, generator=_gen(seed), dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _to64(a):
    if isinstance(a, torch.Tensor) and a.is_floating_point():
        return a.double()
    return a


def check(name, *args, **kwargs):
    """Run ``name`` from the kernels and the reference on the same arguments and compare (see module doc)."""
    out = getattr(K, name)(*args, **kwargs)
    ref = getattr(R, name)(*args, **kwargs)
    assert len(out) == len(ref)
    dtype = args[0].dtype
    atol, rtol = TOL[dtype]
    for o, r in zip(out, ref):
        assert o.shape == r.shape and o.dtype == r.dtype and o.device == r.device
    for i in range(0, len(out), 2):
        (om, orad), (rm, rrad) = out[i:i + 2], ref[i:i + 2]
        torch.testing.assert_close(om, rm, atol=atol, rtol=rtol, equal_nan=True)
        torch.testing.assert_close(orad, rrad, atol=atol, rtol=rtol, equal_nan=True)
        assert bool((orad >= rrad - (atol + rtol * rrad.abs())).all()), "radius below the reference"
    sound = inspect.signature(getattr(R, name)).bind(*args, **kwargs).arguments.get("sound", True)
    if dtype == torch.float32 and sound:
        ref64 = getattr(R, name)(*map(_to64, args), **{k: _to64(v) for k, v in kwargs.items()})
        for i in range(0, len(out), 2):
            m32, r32 = out[i].double(), out[i + 1].double()
            m64, r64 = ref64[i], ref64[i + 1]
            slack = 1e-12 * (m64.abs() + r64)   # the float64 boxes' own rounding (their summation orders differ)
            assert bool(((m32 - r32) <= (m64 - r64) + slack).all()), "float32 lower bound above the float64 one"
            assert bool(((m32 + r32) >= (m64 + r64) - slack).all()), "float32 upper bound below the float64 one"
    return out, ref


def box(*shape, dtype, seed):
    return randn(*shape, dtype=dtype, seed=seed), rand(*shape, dtype=dtype, seed=seed + 1, scale=0.3)


EPILOGUES = {  # name -> (has bias, scale, shift, relu)
    "plain": (False, False, False, False),
    "bias": (True, False, False, False),
    "bias_bn_relu": (True, True, True, True),
    "relu": (False, False, False, True),
    "scale": (True, True, False, False),
    "shift_relu": (False, False, True, True),
}


def _epilogue_args(n, dtype, which, seed):
    has_b, has_a, has_c, relu = EPILOGUES[which]
    b = randn(n, dtype=dtype, seed=seed) if has_b else None
    a = randn(n, dtype=dtype, seed=seed + 1) if has_a else None
    c = randn(n, dtype=dtype, seed=seed + 2) if has_c else None
    return b, a, c, relu


# ----------------------------------------------------------------------------------------------- linear
@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", list(EPILOGUES))
def test_linear_shared_weight(which, dtype, sound):
    B, Kd, N = 3, 20, 7
    mid, rad = box(B, Kd, dtype=dtype, seed=1)
    w = randn(N, Kd, dtype=dtype, seed=3, scale=0.3)
    b, a, c, relu = _epilogue_args(N, dtype, which, seed=4)
    out, _ = check("interval_linear", mid, rad, w, b, scale=a, shift=c, relu=relu, sound=sound)
    if which == "plain":
        assert out[2].numel() == 0 and out[3].numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_multi_tile_and_gemv_rows(dtype):
    # several M, N and K tiles on the dot path; a single row takes the dot-free path
    mid, rad = box(33, 40, dtype=dtype, seed=10)
    w = randn(33, 40, dtype=dtype, seed=12, scale=0.2)
    b, a, c, _ = _epilogue_args(33, dtype, "bias_bn_relu", seed=13)
    check("interval_linear", mid, rad, w, b, a, c, True, True)
    check("interval_linear", mid[:1], rad[:1], w, b, a, c, True, True)
    check("interval_linear", mid[:1], rad[:1], w, None, None, None, False, False)


@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_per_example_weight(dtype, sound):
    B, Kd, N = 3, 40, 5
    mid, rad = box(B, Kd, dtype=dtype, seed=20)
    w = randn(B, N, Kd, dtype=dtype, seed=22, scale=0.2)
    check("interval_linear", mid, rad, w, sound=sound)
    b = randn(B, N, dtype=dtype, seed=23)
    a = randn(N, dtype=dtype, seed=24)
    check("interval_linear", mid, rad, w, b, a, None, True, sound)
    check("interval_linear", mid, rad, w, b[0], None, None, False, sound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_bias_per_row_with_shared_weight(dtype):
    mid, rad = box(3, 6, dtype=dtype, seed=30)
    w = randn(4, 6, dtype=dtype, seed=32)
    b = randn(3, 4, dtype=dtype, seed=33)
    check("interval_linear", mid, rad, w, b, None, None, True, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_non_contiguous(dtype):
    big_m, big_r = box(3, 24, dtype=dtype, seed=40)
    mid, rad = big_m[:, ::2], big_r.t().contiguous().t()[:, 1::2]  # strided columns; column-major storage
    w = randn(12, 7, dtype=dtype, seed=42).t()  # (7, 12) transposed view
    wp = randn(3, 12, 5, dtype=dtype, seed=43).transpose(1, 2)  # per-example (3, 5, 12), non-contiguous
    assert not mid.is_contiguous() and not rad.is_contiguous() and not w.is_contiguous()
    b = randn(7, 2, dtype=dtype, seed=44)[:, 0]
    check("interval_linear", mid, rad, w, b, None, None, True, True)
    check("interval_linear", mid, rad, wp, None, None, None, False, True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_empty_batch_and_leading_dims(dtype):
    w = randn(4, 5, dtype=dtype, seed=50)
    mid, rad = box(0, 5, dtype=dtype, seed=51)
    out = K.interval_linear(mid, rad, w, None, None, None, True, True)
    assert [tuple(t.shape) for t in out] == [(0, 4)] * 4
    out = K.interval_linear(mid, rad, w.expand(0, 4, 5), None, None, None, False, True)
    assert [tuple(t.shape) for t in out] == [(0, 4), (0, 4), (0,), (0,)]
    mid, rad = box(2, 3, 5, dtype=dtype, seed=52)
    check("interval_linear", mid, rad, w, None, None, None, True, True)


def test_linear_fp64_constants_exact():
    # 1 + 3e and K*tiny do not survive a rounding to fp32: the fp64 kernel must use them in fp64.
    Kd = 8
    one = torch.ones(2, Kd, dtype=torch.float64, device=DEVICE)
    w = torch.ones(3, Kd, dtype=torch.float64, device=DEVICE)
    out = K.interval_linear(one * 0, one, w)
    ref = R.interval_linear(one * 0, one, w)
    assert torch.equal(out[1], ref[1]) and bool((out[1] > Kd).all())
    out = K.interval_linear(one * 0, one * 0, w)
    assert torch.equal(out[1], torch.full_like(out[1], Kd * torch.finfo(torch.float64).tiny))


def test_linear_relu_keeps_nan():
    mid, rad = box(2, 6, dtype=torch.float32, seed=60)
    mid[0, 2] = float("nan")
    w = randn(3, 6, dtype=torch.float32, seed=61)
    m, r, _, _ = K.interval_linear(mid, rad, w, None, None, None, True, True)
    assert bool(m[0].isnan().all() and r[0].isnan().all()) and not bool(m[1].isnan().any())


# ----------------------------------------------------------------------------------------------- conv2d
CONV_CASES = {  # name -> (C, O, kernel, stride, padding, dilation, groups)
    "basic": (3, 4, (3, 3), (1, 1), (0, 0), (1, 1), 1),
    "stride2_pad1": (3, 4, (3, 3), (2, 2), (1, 1), (1, 1), 1),
    "dilation2_pad1": (2, 3, (3, 3), (1, 1), (1, 1), (2, 2), 1),
    "groups2": (4, 4, (3, 3), (1, 1), (1, 1), (1, 1), 2),
    "depthwise": (3, 6, (3, 3), (2, 1), (1, 0), (1, 1), 3),
    "rect_kernel_asym": (2, 4, (2, 3), (1, 2), (0, 1), (2, 1), 1),
    "dot_path": (3, 10, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    "dot_path_groups2": (2, 20, (1, 1), (2, 2), (0, 0), (1, 1), 2),
}


@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CONV_CASES))
def test_conv2d_geometry(case, dtype, sound):
    C, O, (kh, kw), stride, padding, dilation, groups = CONV_CASES[case]
    mid, rad = box(2, C, 6, 5, dtype=dtype, seed=70)
    w = randn(O, C // groups, kh, kw, dtype=dtype, seed=72, scale=0.4)
    b = randn(O, dtype=dtype, seed=73)
    check("interval_conv2d", mid, rad, w, b, stride, padding, dilation, groups, sound=sound)


@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["plain", "bias_bn_relu", "relu", "scale", "shift_relu"])
def test_conv2d_epilogue(which, dtype, sound):
    mid, rad = box(2, 3, 5, 5, dtype=dtype, seed=80)
    w = randn(4, 3, 3, 3, dtype=dtype, seed=82, scale=0.4)
    b, a, c, relu = _epilogue_args(4, dtype, which, seed=83)
    out, _ = check("interval_conv2d", mid, rad, w, b, (1, 1), (1, 1), (1, 1), 1, a, c, relu, sound)
    if which == "plain":
        assert out[2].numel() == 0 and out[3].numel() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_dot_path_epilogue_and_int_args(dtype):
    mid, rad = box(3, 2, 6, 6, dtype=dtype, seed=90)
    w = randn(12, 1, 3, 3, dtype=dtype, seed=92, scale=0.4)
    b, a, c, relu = _epilogue_args(12, dtype, "bias_bn_relu", seed=93)
    out = K.interval_conv2d(mid, rad, w, b, 2, 1, 1, 2, a, c, relu, True)
    ref = R.interval_conv2d(mid, rad, w, b, (2, 2), (1, 1), (1, 1), 2, a, c, relu, True)
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r, atol=TOL[dtype][0], rtol=TOL[dtype][1])


@pytest.mark.parametrize("dtype", DTYPES)
def test_conv2d_non_contiguous_and_empty(dtype):
    mid, rad = box(2, 3, 6, 6, dtype=dtype, seed=100)
    mid = mid.to(memory_format=torch.channels_last)
    rad = box(2, 3, 6, 12, dtype=dtype, seed=102)[1][..., ::2]
    w = randn(4, 3, 3, 3, dtype=dtype, seed=104).transpose(2, 3)
    assert not rad.is_contiguous() and not w.is_contiguous()
    check("interval_conv2d", mid, rad, w, None, (1, 1), (1, 1), (1, 1), 1, None, None, True, True)
    e_mid, e_rad = box(0, 3, 6, 6, dtype=dtype, seed=105)
    out = K.interval_conv2d(e_mid, e_rad, w, None, (2, 2), (1, 1), (1, 1), 1, None, None, True, True)
    assert [tuple(t.shape) for t in out] == [(0, 4, 3, 3)] * 4
    out = K.interval_conv2d(e_mid, e_rad, w, None, (2, 2), (1, 1), (1, 1), 1)
    assert [tuple(t.shape) for t in out] == [(0, 4, 3, 3), (0, 4, 3, 3), (0,), (0,)]


def test_conv2d_rejects_bad_geometry():
    mid, rad = box(1, 4, 5, 5, dtype=torch.float32, seed=110)
    with pytest.raises(ValueError):
        K.interval_conv2d(mid, rad, randn(4, 3, 3, 3, dtype=torch.float32, seed=111), groups=2)
    with pytest.raises(ValueError):
        K.interval_conv2d(mid, rad, randn(4, 4, 7, 7, dtype=torch.float32, seed=112))


# ----------------------------------------------------------------------------------------------- affine
@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["scale_shift_relu", "scale", "shift", "relu", "scale_relu"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 6)])
def test_affine(shape, which, dtype, sound):
    mid, rad = box(*shape, dtype=dtype, seed=120)
    C = shape[1]
    a = randn(C, dtype=dtype, seed=122) if "scale" in which else None
    c = randn(C, dtype=dtype, seed=123) if "shift" in which else None
    check("interval_affine", mid, rad, a, c, "relu" in which, sound)


@pytest.mark.parametrize("dtype", DTYPES)
def test_affine_non_contiguous_empty_identity_nan(dtype):
    mid, rad = box(2, 4, 3, 6, dtype=dtype, seed=130)
    mid, rad = mid[..., ::2], rad[..., ::2].transpose(2, 3).contiguous().transpose(2, 3)
    a, c = randn(4, dtype=dtype, seed=132), randn(4, dtype=dtype, seed=133)
    check("interval_affine", mid, rad, a, c, True, True)
    e_mid, e_rad = box(0, 4, 3, 3, dtype=dtype, seed=134)
    out = K.interval_affine(e_mid, e_rad, a, c, True)
    assert [tuple(t.shape) for t in out] == [(0, 4, 3, 3)] * 2
    out = K.interval_affine(mid, rad)
    assert out[0] is mid and out[1] is rad  # as the reference: the identity returns its inputs
    nan_mid = mid.clone()
    nan_mid[0, 1, 0, 0] = float("nan")
    m, r = K.interval_affine(nan_mid, rad, None, None, True)
    assert bool(m[0, 1, 0, 0].isnan() and r[0, 1, 0, 0].isnan()) and int(m.isnan().sum()) == 1


# ----------------------------------------------------------------------------------------------- input box
@pytest.mark.parametrize("sound", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_input_box(dtype, sound):
    x = rand(3, 2, 4, 4, dtype=dtype, seed=140)
    eps = rand(3, dtype=dtype, seed=141, scale=0.3)
    check("interval_input_box", x, eps, 0.0, 1.0, sound)
    check("interval_input_box", x * 4 - 2, eps, -1.5, 1.25, sound)
    check("interval_input_box", x, eps, float("-inf"), float("inf"), sound)
    check("interval_input_box", x[:, :, ::2], eps, 0.1, 0.9, sound)


def test_input_box_edge_cases():
    x = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    mid, rad = K.interval_input_box(x, torch.zeros(2, dtype=torch.float64, device=DEVICE), -1.0, 1.0)
    assert torch.equal(rad, torch.full_like(rad, torch.finfo(torch.float64).tiny))  # fp64 tiny, not 0
    x = torch.tensor([[0.5, float("nan")]], device=DEVICE)
    mid, rad = K.interval_input_box(x, torch.tensor([0.1], device=DEVICE), 0.0, 1.0)
    assert bool(mid[0, 1].isnan() and rad[0, 1].isnan()) and not bool(mid[0, 0].isnan())
    mid, rad = K.interval_input_box(x[:0], torch.zeros(0, device=DEVICE), 0.0, 1.0)
    assert mid.shape == (0, 2) and rad.shape == (0, 2)


# ----------------------------------------------------------------------------------------------- widening
def check_widening(name, *args, relu_rtol=None):
    """On a point box (rad = 0) the returned radius *is* the rounding-error widening, so it can be compared
    with the reference's to a relative tolerance far below the widening itself (the absolute tolerances
    of ``check`` are larger than the whole widening). Outputs after a ReLU get ``relu_rtol``: there the
    end points ``mid +- rad`` are rounded at ``u |mid|``, a few percent of a widening of ``~3 K u |mid|``.
    Float32 GEMM boxes are float64 boxes rounded outwards, whose radius holds ``|mid64 - fl32(mid64)|``: it
    depends on the float64 centre's last bits, which differ between summation orders by ~1e-16 of ``|mid|``
    (the absolute tolerance)."""
    out, ref = check(name, *args)
    rtol = {torch.float32: 2e-5, torch.float64: 1e-12}[args[0].dtype]
    for i in range(1, len(out), 2):
        tol = relu_rtol if (relu_rtol is not None and i == 1) else rtol
        atol = 1e-14 * float(ref[i - 1].abs().max()) if args[0].dtype == torch.float32 else 0.0
        assert bool((ref[i] > 0).all())
        torch.testing.assert_close(out[i], ref[i], atol=atol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_widening_matches_reference(dtype):
    zeros = torch.zeros
    mid = randn(3, 20, dtype=dtype, seed=150)
    rad = zeros(3, 20, dtype=dtype, device=DEVICE)
    w = randn(7, 20, dtype=dtype, seed=151)
    b, a, c, _ = _epilogue_args(7, dtype, "bias_bn_relu", seed=152)
    check_widening("interval_linear", mid, rad, w, b, a, c, False, True)
    check_widening("interval_linear", mid, rad, w, b, a, c, True, True, relu_rtol=0.05)
    check_widening("interval_linear", mid, rad, randn(3, 5, 20, dtype=dtype, seed=153), None, None, c[:5],
                   False, True)
    cm = randn(2, 4, 5, 5, dtype=dtype, seed=154)
    cr = zeros(2, 4, 5, 5, dtype=dtype, device=DEVICE)
    for O, groups in ((6, 2), (10, 1)):
        cw = randn(O, 4 // groups, 3, 3, dtype=dtype, seed=155)
        cb, ca, cc, _ = _epilogue_args(O, dtype, "bias_bn_relu", seed=156)
        check_widening("interval_conv2d", cm, cr, cw, cb, (1, 1), (1, 1), (1, 1), groups, ca, cc, False, True)
    check_widening("interval_affine", cm, cr, cb[:4], cc[:4], False, True)
    check_widening("interval_affine", cm, cr, cb[:4], cc[:4], True, True, relu_rtol=0.05)
    check_widening("interval_input_box", cm.clamp(-2, 2), zeros(2, dtype=dtype, device=DEVICE), -2.0, 2.0, True)


# ----------------------------------------------------------------------------------------------- config
def test_autotune_configs_shrink_under_interpreter():
    configs = [1, 2, 3]
    assert autotune_configs(configs) == ([1] if is_interpreting() else configs)
