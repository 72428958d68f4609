"""The compiled robustkern interval ops (CPU kernels; CUDA kernels too when a GPU is present) against
robustkern.reference.interval: values, epilogues, conv configurations, per-example weights, non-contiguous
and channels-last inputs, empty batches, argument errors, and floating-point soundness.

On CPU the kernels call the same ATen GEMMs / convolutions as the reference and repeat its element-wise
arithmetic operation for operation, so for contiguous inputs the results are compared bit for bit (a
tolerance would hide a missing rounding-error term, which is O(K u) or K * tiny). Where the memory layout
of an intermediate differs from the reference's (non-contiguous inputs; CUDA, which fuses multiply-adds),
the comparison uses robustkern.testing's tolerances."""
import pytest
import torch

from robustkern import _backend, _ext
from robustkern.reference import interval as ref
from robustkern.testing import assert_box_contains, tolerance

if not _ext.load():
    pytest.skip(f"compiled extension unavailable: {_ext.status()}", allow_module_level=True)

E = torch.ops.robustkern
DTYPES = [torch.float32, torch.float64]
SOUND = [True, False]
EPILOGUES = ["none", "relu", "scale", "shift", "affine", "affine+relu"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and _ext.has_cuda_kernels() else [])


def reference(name, *args):
    """The reference op, with IEEE float32 products on CUDA too (torch may default cuDNN to TF32)."""
    with _backend.ieee_fp32():
        return getattr(ref, name)(*args)


def exact(got, expected):
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0)


def close(got, expected, dtype, device="cpu"):
    # cuBLAS / cuDNN may sum in another order for the op than for the reference (another algorithm).
    tol = dict(atol=1e-4, rtol=1e-4) if device == "cuda" and dtype == torch.float32 else tolerance(dtype)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, **tol)


def compare(got, expected, dtype, device, bitwise=True):
    if bitwise and device == "cpu":
        exact(got, expected)
    else:
        close(got, expected, dtype, device)


def box(*shape, dtype, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device), torch.rand(*shape, dtype=dtype, device=device)


def epilogue(kind, n, dtype, device="cpu"):
    """(scale, shift, relu) for an epilogue kind over n channels."""
    scale = torch.randn(n, dtype=dtype, device=device) if kind in ("scale", "affine", "affine+relu") else None
    shift = torch.randn(n, dtype=dtype, device=device) if kind in ("shift", "affine", "affine+relu") else None
    return scale, shift, kind in ("relu", "affine+relu")


# ------------------------------------------------------------------------------------------ values
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sound", SOUND)
@pytest.mark.parametrize("kind", EPILOGUES)
@pytest.mark.parametrize("weights,bias", [("shared", None), ("shared", "N"), ("per_example", None),
                                          ("per_example", "N"), ("per_example", "BN")])
def test_linear(device, dtype, sound, kind, weights, bias):
    B, K, N = 6, 33, 10
    mid, rad = box(B, K, dtype=dtype, device=device)
    w = torch.randn(*((B,) if weights == "per_example" else ()), N, K, dtype=dtype, device=device)
    b = None if bias is None else torch.randn(*((B,) if bias == "BN" else ()), N, dtype=dtype, device=device)
    args = (mid, rad, w, b, *epilogue(kind, N, dtype, device), sound)
    got = E.interval_linear(*args)
    compare(got, reference("interval_linear", *args), dtype, device)
    assert (got[2].numel() == 0) == (kind == "none")


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_empty_reduction(dtype):
    """K = 0: the products are empty sums, and the bias still gets its rounding-error term."""
    mid, rad = box(3, 0, dtype=dtype)
    args = (mid, rad, torch.randn(4, 0, dtype=dtype), torch.randn(4, dtype=dtype), None, None, True, True)
    exact(E.interval_linear(*args), reference("interval_linear", *args))


CONV_CONFIGS = [
    dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1),
    dict(stride=[2, 2], padding=[0, 0], dilation=[1, 1], groups=1),
    dict(stride=[2, 1], padding=[1, 2], dilation=[1, 1], groups=2),
    dict(stride=[1, 1], padding=[2, 2], dilation=[2, 2], groups=1),
    dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=6),  # depthwise
    dict(stride=[1], padding=[1], dilation=[1], groups=3),  # one entry for both dimensions
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sound", SOUND)
@pytest.mark.parametrize("kind", EPILOGUES)
@pytest.mark.parametrize("conf", range(len(CONV_CONFIGS)))
@pytest.mark.parametrize("with_bias", [True, False])
def test_conv2d(device, dtype, sound, kind, conf, with_bias):
    c = CONV_CONFIGS[conf]
    B, C, O, H, W = 2, 6, 12, 9, 7
    mid, rad = box(B, C, H, W, dtype=dtype, device=device)
    w = torch.randn(O, C // c["groups"], 3, 3, dtype=dtype, device=device)
    b = torch.randn(O, dtype=dtype, device=device) if with_bias else None
    scale, shift, relu = epilogue(kind, O, dtype, device)
    got = E.interval_conv2d(mid, rad, w, b, c["stride"], c["padding"], c["dilation"], c["groups"], scale, shift,
                            relu, sound)
    expected = reference("interval_conv2d", mid, rad, w, b, c["stride"] * (3 - len(c["stride"])),
                                   c["padding"] * (3 - len(c["padding"])), c["dilation"] * (3 - len(c["dilation"])),
                                   c["groups"], scale, shift, relu, sound)
    compare(got, expected, dtype, device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sound", SOUND)
@pytest.mark.parametrize("kind", EPILOGUES)
@pytest.mark.parametrize("shape", [(5, 8), (3, 8, 11), (2, 8, 5, 4), (1, 8, 1, 1)])
def test_affine(device, dtype, sound, kind, shape):
    mid, rad = box(*shape, dtype=dtype, device=device)
    args = (mid, rad, *epilogue(kind, shape[1], dtype, device), sound)
    got = E.interval_affine(*args)
    compare(got, reference("interval_affine", *args), dtype, device)
    for g, x in zip(got, (mid, rad)):
        assert g.data_ptr() != x.data_ptr()  # fresh outputs even when the op is the identity


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sound", SOUND)
@pytest.mark.parametrize("eps_shape", ["per_example", "single"])
@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 17), (3,)])
def test_input_box(device, dtype, sound, eps_shape, shape):
    x = torch.rand(*shape, dtype=dtype, device=device) * 1.2 - 0.1  # some entries outside [0, 1]
    eps = torch.rand(shape[0] if eps_shape == "per_example" else 1, dtype=dtype, device=device) * 0.3
    got = E.interval_input_box(x, eps, 0.0, 1.0, sound)
    compare(got, reference("interval_input_box", x, eps, 0.0, 1.0, sound), dtype, device)


def test_relu_keeps_nan():
    mid = torch.tensor([[float("nan"), 1.0, -1.0]])
    rad = torch.tensor([[0.5, float("nan"), 0.5]])
    for sound in SOUND:
        m, r = E.interval_affine(mid, rad, None, None, True, sound)
        assert torch.isnan(m[0, :2]).all() and torch.isnan(r[0, :2]).all()
        assert m[0, 2] == 0 and (r[0, 2] == 0 if not sound else r[0, 2] > 0)


def test_pre_gemm_box_is_returned_with_an_epilogue():
    mid, rad = box(4, 9, dtype=torch.float64)
    w = torch.randn(5, 9, dtype=torch.float64)
    plain = E.interval_linear(mid, rad, w, None, None, None, False, True)
    with_relu = E.interval_linear(mid, rad, w, None, None, None, True, True)
    exact(with_relu[2:], plain[:2])
    exact(with_relu[:2], reference("interval_affine", *plain[:2], None, None, True, True))


# ------------------------------------------------------------------------------------------ layouts
@pytest.mark.parametrize("sound", SOUND)
def test_linear_non_contiguous(sound):
    dtype = torch.float64
    mid = torch.randn(11, 6, dtype=dtype).t()  # (6, 11), column-major
    rad = torch.rand(6, 22, dtype=dtype)[:, ::2]  # strided
    w = torch.randn(11, 8, dtype=dtype).t()  # (8, 11)
    b = torch.randn(16, dtype=dtype)[::2]
    scale, shift = torch.randn(16, dtype=dtype)[::2], torch.randn(8, dtype=dtype)
    args = (mid, rad, w, b, scale, shift, True, sound)
    close(E.interval_linear(*args), reference("interval_linear", *args), dtype)
    args = (mid, rad, torch.randn(8, 11, 6, dtype=dtype).permute(2, 0, 1), b, None, None, False, sound)
    close(E.interval_linear(*args), reference("interval_linear", *args), dtype)


@pytest.mark.parametrize("sound", SOUND)
@pytest.mark.parametrize("layout", ["channels_last", "mixed", "sliced"])
def test_conv2d_layouts(sound, layout):
    dtype = torch.float32
    mid, rad = box(3, 8, 10, 10, dtype=dtype)
    if layout == "channels_last":
        mid, rad = mid.to(memory_format=torch.channels_last), rad.to(memory_format=torch.channels_last)
    elif layout == "mixed":
        mid = mid.to(memory_format=torch.channels_last)
    else:
        mid, rad = mid[:, :, 1:-1, ::2], rad[:, :, 1:-1, ::2]
    w = torch.randn(16, 8, 3, 3, dtype=dtype)
    scale, shift = torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype)
    args = (mid, rad, w, None, [1, 1], [1, 1], [1, 1], 1, scale, shift, True, sound)
    got = E.interval_conv2d(*args)
    close(got, reference("interval_conv2d", *args), dtype)


@pytest.mark.parametrize("sound", SOUND)
def test_affine_and_input_box_layouts(sound):
    dtype = torch.float32
    mid, rad = box(2, 5, 6, 7, dtype=dtype)
    mid_cl, rad_cl = mid.to(memory_format=torch.channels_last), rad.to(memory_format=torch.channels_last)
    scale, shift = torch.randn(5, dtype=dtype), torch.randn(5, dtype=dtype)
    pairs = [(mid_cl, rad_cl), (mid_cl, rad), (mid.transpose(2, 3), rad.transpose(2, 3)), (mid[:, ::2], rad[:, ::2])]
    for m, r in pairs:
        for args in [(m, r, scale[: m.shape[1]], shift[: m.shape[1]], True, sound), (m, r, None, None, True, sound)]:
            exact(E.interval_affine(*args), reference("interval_affine", *args))
    x = torch.rand(4, 3, 5, 5, dtype=dtype)
    eps = torch.rand(8, dtype=dtype)[::2]
    for xx in (x.to(memory_format=torch.channels_last), x[:, :, ::2], x.transpose(0, 1).contiguous().transpose(0, 1)):
        args = (xx, eps, -0.5, 1.5, sound)
        exact(E.interval_input_box(*args), reference("interval_input_box", *args))


# ------------------------------------------------------------------------------------------ empty batch
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["none", "affine+relu"])
def test_empty_batch(device, kind):
    dtype = torch.float32
    mid, rad = box(0, 7, dtype=dtype, device=device)
    scale, shift, relu = epilogue(kind, 4, dtype, device)
    w = torch.randn(4, 7, dtype=dtype, device=device)
    b = torch.randn(4, dtype=dtype, device=device)
    for got, expected in [
        (E.interval_linear(mid, rad, w, b, scale, shift, relu, True),
         reference("interval_linear", mid, rad, w, b, scale, shift, relu, True)),
        (E.interval_linear(mid, rad, w.expand(0, 4, 7), b, scale, shift, relu, True),
         reference("interval_linear", mid, rad, w.expand(0, 4, 7), b, scale, shift, relu, True)),
    ]:
        assert [tuple(g.shape) for g in got] == [tuple(e.shape) for e in expected]
    cm, cr = box(0, 3, 5, 5, dtype=dtype, device=device)
    cw = torch.randn(4, 3, 3, 3, dtype=dtype, device=device)
    got = E.interval_conv2d(cm, cr, cw, b, [1, 1], [1, 1], [1, 1], 1, scale, shift, relu, True)
    assert tuple(got[0].shape) == (0, 4, 5, 5)
    assert tuple(E.interval_affine(cm, cr, None, None, True, True)[0].shape) == (0, 3, 5, 5)
    x = torch.rand(0, 3, 2, 2, dtype=dtype, device=device)
    assert tuple(E.interval_input_box(x, x.new_empty(0), 0.0, 1.0, True)[1].shape) == (0, 3, 2, 2)


# ------------------------------------------------------------------------------------------ bad input
def _bad_cases():
    f32, f64 = torch.float32, torch.float64
    mid, rad = box(2, 4, dtype=f32)
    w, b = torch.randn(3, 4), torch.randn(3)
    cm, cr = box(2, 4, 5, 5, dtype=f32)
    cw = torch.randn(6, 4, 3, 3)
    x, eps = torch.rand(2, 3), torch.rand(2)
    return [
        ("half", lambda: E.interval_linear(mid.half(), rad.half(), w.half(), None, None, None, False, True),
         "mid must be float32 or float64"),
        ("int", lambda: E.interval_affine(mid.int(), rad.int(), None, None, True, True), "mid must be float32"),
        ("weight dtype", lambda: E.interval_linear(mid, rad, w.to(f64), b, None, None, False, True),
         "weight has dtype Double but mid has dtype Float"),
        ("rad shape", lambda: E.interval_linear(mid, rad[:, :3], w, b, None, None, False, True), "rad has shape"),
        ("weight shape", lambda: E.interval_linear(mid, rad, w[:, :3], b, None, None, False, True),
         "weight must have shape"),
        ("bias shape", lambda: E.interval_linear(mid, rad, w, b[:2], None, None, False, True), "bias must have shape"),
        ("bias per example", lambda: E.interval_linear(mid, rad, w.expand(2, 3, 4), torch.randn(3, 3), None, None,
                                                       False, True), "bias must have shape"),
        ("scale shape", lambda: E.interval_linear(mid, rad, w, b, torch.randn(4), None, False, True),
         "scale must have shape"),
        ("shift dtype", lambda: E.interval_linear(mid, rad, w, b, None, torch.randn(3, dtype=f64), True, True),
         "shift has dtype"),
        ("mid dims", lambda: E.interval_linear(mid[0], rad[0], w, b, None, None, False, True),
         "mid must have 2 dimensions"),
        ("conv channels", lambda: E.interval_conv2d(cm, cr, cw[:, :3], None, [1, 1], [0, 0], [1, 1], 1, None, None,
                                                    False, True), "mid has 4 channels but weight"),
        ("conv groups", lambda: E.interval_conv2d(cm, cr, cw, None, [1, 1], [0, 0], [1, 1], 4, None, None,
                                                  False, True), "not divisible by groups=4"),
        ("conv stride", lambda: E.interval_conv2d(cm, cr, cw, None, [1, 1, 1], [0, 0], [1, 1], 1, None, None,
                                                  False, True), "stride must have 1 or 2 entries"),
        ("conv mid dims", lambda: E.interval_conv2d(cm[0], cr[0], cw, None, [1, 1], [0, 0], [1, 1], 1, None, None,
                                                    False, True), "mid must have 4 dimensions"),
        ("affine scale", lambda: E.interval_affine(cm, cr, torch.randn(5), None, False, True),
         "scale must have shape"),
        ("eps size", lambda: E.interval_input_box(x, torch.rand(3), 0.0, 1.0, True), "eps must hold one radius"),
        ("eps dtype", lambda: E.interval_input_box(x, eps.to(f64), 0.0, 1.0, True), "eps has dtype"),
        ("clip range", lambda: E.interval_input_box(x, eps, 1.0, 0.0, True), "x_min (1) must not exceed x_max"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_names_the_argument(case):
    _, call, message = case
    with pytest.raises(RuntimeError, match=message.replace("(", r"\(").replace(")", r"\)")):
        call()


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs a CUDA device and the CUDA kernels")
def test_mixed_devices_are_rejected():
    mid, rad = box(2, 4, dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="weight is on cpu but mid is on cuda"):
        E.interval_linear(mid, rad, torch.randn(3, 4), None, None, None, False, True)
    with pytest.raises(RuntimeError, match="mid must be a"):
        E.interval_linear(mid.cpu(), rad.cpu(), torch.randn(3, 4, device="cuda"), None, None, None, False, True)


# ------------------------------------------------------------------------------------------ precision settings
def _precision_settings():
    b = torch.backends
    return (torch.get_float32_matmul_precision(), b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
            b.mkldnn.matmul.fp32_precision, b.mkldnn.conv.fp32_precision, torch._C._get_nnpack_enabled())


@pytest.mark.parametrize("device", DEVICES)
def test_reduced_precision_settings_are_ignored_and_restored(device):
    """With TF32 (CUDA) or bfloat16 (oneDNN) allowed for float32 the ops still compute in IEEE float32, and
    leave the settings as they found them."""
    mid, rad = box(64, 1024, dtype=torch.float32, device=device)
    w = torch.randn(256, 1024, device=device)
    cm, cr = box(16, 64, 8, 8, dtype=torch.float32, device=device)
    cw = torch.randn(64, 64, 3, 3, device=device)
    lin_args = (mid, rad, w, None, None, None, True, True)
    conv_args = (cm, cr, cw, None, [1, 1], [1, 1], [1, 1], 1, None, None, True, True)
    expected = [reference("interval_linear", *lin_args), reference("interval_conv2d", *conv_args)]
    before = _precision_settings()
    b = torch.backends
    try:
        torch.set_float32_matmul_precision("medium")  # CUDA matmul: TF32; oneDNN matmul: bfloat16
        b.cudnn.conv.fp32_precision = "tf32"
        if b.mkldnn.is_available():
            b.mkldnn.conv.fp32_precision = "bf16"
        reduced = _precision_settings()
        got = [E.interval_linear(*lin_args), E.interval_conv2d(*conv_args)]
        assert _precision_settings() == reduced
        if device == "cuda":  # the settings do matter for torch's own ops on this device
            tf32 = ref.interval_linear(*lin_args)
            with pytest.raises(AssertionError):
                close(tf32[:2], expected[0][:2], torch.float32, device)
    finally:
        torch.set_float32_matmul_precision(before[0])
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = before[1:3]
        b.mkldnn.matmul.fp32_precision, b.mkldnn.conv.fp32_precision = before[3:5]
    assert _precision_settings() == before
    for g, e in zip(got, expected):
        compare(g, e, torch.float32, device)


# ------------------------------------------------------------------------------------------ soundness
def _lo_hi(mid, rad):
    return mid.double() - rad.double(), mid.double() + rad.double()


def _assert_sound(op, args32, what):
    """float32 with sound=True contains the float64 box of the same (float32) inputs."""
    got = getattr(E, op)(*args32, True)
    args64 = [a.double() if isinstance(a, torch.Tensor) else a for a in args32]
    expected = reference(op, *args64, True)
    assert_box_contains(*_lo_hi(*got[:2]), *_lo_hi(*expected[:2]), what)
    if len(got) == 4 and got[2].numel():
        assert_box_contains(*_lo_hi(*got[2:]), *_lo_hi(*expected[2:]), what + " (pre-epilogue)")


# Input kinds that stress rounding. "wide": magnitudes over 6 decades; "point": degenerate boxes (rad = 0), so
# the radius is all widening; "tiny": products around the smallest normal number (gradual underflow);
# "underflow": products below the smallest subnormal, where only the K * tiny / tiny terms keep the box sound.
KINDS = ["wide", "point", "tiny", "underflow"]
MAGNITUDE = {"wide": (1.0, 1.0), "point": (1.0, 1.0), "tiny": (1e-19, 1e-19), "underflow": (1e-30, 1e-15)}


def _hard_box(shape, kind, device):
    """(mid, rad) of the kind with magnitudes spread over the last dimension, and the weight scale."""
    box_scale, weight_scale = MAGNITUDE[kind]
    mid = torch.randn(shape, device=device) * torch.logspace(-3, 3, shape[-1], device=device) * box_scale
    rad = torch.zeros(shape, device=device) if kind == "point" else torch.rand(shape, device=device) * 1e-3 * box_scale
    return mid, rad, weight_scale


def _terms(kind, n, epi, device):
    """bias and epilogue of the magnitude of the kind's products (bias and shift would otherwise dominate
    the widening and hide a missing term)."""
    product = MAGNITUDE[kind][0] * MAGNITUDE[kind][1]
    scale, shift, relu = epilogue(epi, n, torch.float32, device)
    return torch.randn(n, device=device) * product, scale, (shift * product if shift is not None else None), relu


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("epi", EPILOGUES)
def test_float32_linear_is_sound(device, kind, epi):
    for trial in range(3):
        mid, rad, ws = _hard_box((8, 300), kind, device)
        w = torch.randn(50, 300, device=device) * ws
        _assert_sound("interval_linear", (mid, rad, w, *_terms(kind, 50, epi, device)), f"linear {kind}")
        wb = torch.randn(8, 10, 300, device=device) * ws
        _assert_sound("interval_linear", (mid, rad, wb, None, None, None, False), f"per-example linear {kind}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("groups", [1, 4])
def test_float32_conv2d_is_sound(device, kind, groups):
    mid, rad, ws = _hard_box((4, 16, 10, 10), kind, device)
    w = torch.randn(32, 16 // groups, 3, 3, device=device) * ws
    for epi in EPILOGUES:
        bias, scale, shift, relu = _terms(kind, 32, epi, device)
        args = (mid, rad, w, bias, [1, 1], [1, 1], [1, 1], groups, scale, shift, relu)
        _assert_sound("interval_conv2d", args, f"conv2d {kind} {epi}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_float32_affine_is_sound(device, kind):
    mid, rad, ws = _hard_box((6, 5, 5, 40), kind, device)
    mid, rad = mid.permute(0, 3, 1, 2) * ws, rad.permute(0, 3, 1, 2) * ws  # (6, 40, 5, 5): products' magnitude
    for epi in EPILOGUES[1:]:
        _, scale, shift, relu = _terms(kind, 40, epi, device)
        _assert_sound("interval_affine", (mid, rad, scale, shift, relu), f"affine {kind} {epi}")


@pytest.mark.parametrize("device", DEVICES)
def test_float32_input_box_is_sound(device):
    mean = torch.tensor([0.4914, 0.4822, 0.4465], device=device)
    std = torch.tensor([0.2470, 0.2435, 0.2616], device=device)
    x = torch.rand(16, 3, 8, 8, device=device)
    eps = torch.full((16,), 8 / 255, device=device)
    _assert_sound("interval_input_box", (x, eps, 0.0, 1.0), "input box")
    # The usual chain: a box in pixel space, then the per-channel normalisation.
    m, r = E.interval_input_box(x, eps, 0.0, 1.0, True)
    _assert_sound("interval_affine", (m, r, 1 / std, -mean / std, False), "normalisation")
    # Subnormal inputs: halving (lo + hi) rounds, and only the tiny term covers it.
    sub = 2.0 ** -149
    x = torch.randint(-100, 100, (16, 50), device=device).float() * sub
    eps = torch.randint(0, 30, (16,), device=device).float() * sub
    _assert_sound("interval_input_box", (x, eps, -1.0, 1.0), "subnormal input box")


def test_soundness_cases_are_tight_enough_to_matter():
    """Without the widening, float32 escapes the float64 box on these inputs: the property tests above
    would catch a missing rounding-error term."""
    mid, rad, _ = _hard_box((8, 300), "point", "cpu")
    w = torch.randn(50, 300)
    got = E.interval_linear(mid, rad, w, None, None, None, False, False)
    expected = reference("interval_linear", mid.double(), rad.double(), w.double(), None, None, None, False, True)
    with pytest.raises(AssertionError, match="escape"):
        assert_box_contains(*_lo_hi(*got[:2]), *_lo_hi(*expected[:2]), "unsound")
