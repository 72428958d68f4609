"""robustkern::smoothing_noise and robustkern::smoothing_count against the reference on every backend: the CPU
backends (cpp included), and Triton interpreted on the CPU or compiled on CUDA when a GPU is present
(tests/_devices.py); the references are computed on the CPU."""
import pytest
import torch

from _devices import backend_device_params, to
from robustkern.ops import smoothing_count, smoothing_noise
from robustkern.reference import smoothing as ref
from robustkern.testing import backend


def smoothing_backends():
    """(backend, device) pairs: the CPU backends, cpp included (its kernels must be bit-identical too), and
    Triton on CUDA when a GPU is present."""
    return backend_device_params()


def contracted_reference(x, src, counter, seed, sigma, mean, std, out_dtype):
    """The reference with ``x + sigma z`` rounded once, as one fused multiply-add: a GPU compiler may contract
    the kernel's ``x + sigma * z`` (robustkern/kernels/smoothing.py), one fp32 rounding fewer than the
    reference. ``sigma z`` of two fp32 numbers is exact in float64, so only the sum is rounded (to float64, then
    to fp32: the same as one rounding unless the float64 sum lands exactly on an fp32 tie, probability ~2^-29)."""
    z = ref.smoothing_noise(torch.zeros_like(x), src, counter, seed, 1.0, None, None, torch.float32)  # z itself
    sigma32 = float(torch.tensor(sigma, dtype=torch.float32))
    v = (x.float()[src].double() + sigma32 * z.double()).float()
    if mean is not None:                                             # as the reference, in fp32
        shape = (1, -1) + (1,) * (x.dim() - 2)
        v = (v - mean.float().view(shape)) / std.float().view(shape)
    return v.to(out_dtype)


def test_contracted_reference_rounds_x_plus_sigma_z_once():
    """The CUDA tolerance of the noise tests is exact: ``contracted_reference`` is ``x + sigma z`` correctly
    rounded once (checked in rational arithmetic), and it is a different tensor from the reference."""
    from fractions import Fraction

    x = torch.rand(3, 3, 4, 5)
    src, counter = _meta(7, 3)
    seed = torch.tensor([2 ** 40 + 5])
    got = contracted_reference(x, src, counter, seed, 0.37, None, None, torch.float32)
    z = ref.smoothing_noise(torch.zeros_like(x), src, counter, seed, 1.0, None, None, torch.float32)
    sigma = Fraction(float(torch.tensor(0.37, dtype=torch.float32)))
    for xi, zi, gi in zip(x[src].flatten().tolist(), z.flatten().tolist(), got.flatten().tolist()):
        exact = Fraction(xi) + sigma * Fraction(zi)
        g = torch.tensor(gi, dtype=torch.float32)
        below, above = torch.nextafter(g, torch.tensor(-1e30)), torch.nextafter(g, torch.tensor(1e30))
        assert abs(Fraction(gi) - exact) <= min(abs(Fraction(float(n)) - exact) for n in (below, above))
    assert not torch.equal(got, ref.smoothing_noise(x, src, counter, seed, 0.37, None, None, torch.float32))


def assert_noise_is_reference(got, device, x, src, counter, seed, sigma, mean, std, out_dtype):
    """``got`` (computed on ``device``) equals the CPU reference bit for bit. On CUDA it may instead equal the
    contracted reference everywhere (``contracted_reference``: the compiled kernel either fuses the
    multiply-add or does not; the normals themselves must be the reference's)."""
    want = ref.smoothing_noise(x, src, counter, seed, sigma, mean, std, out_dtype)
    assert got.device.type == device and got.dtype == out_dtype and got.shape == want.shape
    got = got.cpu()
    if device == "cpu":
        assert torch.equal(got, want)
    else:
        assert torch.equal(got, want) or torch.equal(
            got, contracted_reference(x, src, counter, seed, sigma, mean, std, out_dtype))


def _meta(rows, images, stream=1, start=0):
    src = torch.arange(rows) % images
    counter = torch.stack([src + 7, torch.arange(rows) + start, torch.full((rows,), stream)], 1)
    return src, counter


def test_philox_known_answers():
    """Random123's known-answer vectors for Philox4x32-10."""
    z = torch.zeros(1, dtype=torch.int64)
    f = torch.full((1,), 0xFFFFFFFF, dtype=torch.int64)
    assert [int(t) for t in ref.philox4x32(z, z, z, z, 0)] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    assert [int(t) for t in ref.philox4x32(f, f, f, f, 2 ** 64 - 1)] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6,
                                                                         0x6D5451FD]


def test_noise_is_standard_normal():
    z = ref.normal_from_counter(torch.arange(200_000), torch.tensor(3), torch.tensor(1), torch.tensor(0), 11)
    assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
    assert abs(float((z > 1.6449).float().mean()) - 0.05) < 0.003


@pytest.mark.parametrize("bk, device", smoothing_backends())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("norm", [False, True])
def test_noise_matches_reference(bk, device, dtype, norm):
    x = torch.rand(3, 3, 4, 5)
    src, counter = _meta(7, 3)
    mean, std = (torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])) if norm else (None, None)
    with backend(bk):
        got = smoothing_noise(*to(device, x, src, counter), 2 ** 40 + 5, 0.37, mean=to(device, mean)[0],
                              std=to(device, std)[0], out_dtype=dtype)
    assert got.shape == (7, 3, 4, 5)
    # bit-identical on every backend (on CUDA up to the contraction of x + sigma z: assert_noise_is_reference)
    assert_noise_is_reference(got, device, x, src, counter, torch.tensor([2 ** 40 + 5]), 0.37, mean, std, dtype)


@pytest.mark.parametrize("bk, device", smoothing_backends())
def test_noise_empty_and_odd_shapes(bk, device):
    with backend(bk):
        out = smoothing_noise(*to(device, torch.rand(2, 1, 3), torch.zeros(0, dtype=torch.int64),
                                  torch.zeros(0, 3, dtype=torch.int64)), 1, 0.5)
        assert out.shape == (0, 1, 3)
        x = torch.rand(2, 5, 3).transpose(1, 2)              # non-contiguous (2, 3, 5)
        src, counter = _meta(3, 2)
        xd = x.to(device)
        assert not xd.is_contiguous()
        got = smoothing_noise(xd, *to(device, src, counter), 1, 0.5)
    assert_noise_is_reference(got, device, x.contiguous(), src, counter, torch.tensor([1]), 0.5, None, None,
                              torch.float32)


def test_noise_depends_on_every_counter_word_and_seed():
    x = torch.zeros(1, 1, 8, 8)
    base = torch.tensor([[3, 4, 0]])
    ref_out = smoothing_noise(x, torch.zeros(1, dtype=torch.int64), base, 9, 1.0)
    for k in range(3):
        c = base.clone()
        c[0, k] += 1
        other = smoothing_noise(x, torch.zeros(1, dtype=torch.int64), c, 9, 1.0)
        assert abs(float(torch.corrcoef(torch.stack([ref_out.flatten(), other.flatten()]))[0, 1])) < 0.5
    assert not torch.equal(ref_out, smoothing_noise(x, torch.zeros(1, dtype=torch.int64), base, 10, 1.0))


def test_noise_gradient():
    x = torch.rand(2, 3, 2, 2, requires_grad=True)
    src, counter = _meta(5, 2)
    std = torch.tensor([0.5, 0.25, 2.0])
    smoothing_noise(x, src, counter, 0, 0.5, mean=torch.zeros(3), std=std).sum().backward()
    per_img = torch.bincount(src, minlength=2).float().view(2, 1, 1, 1)
    assert torch.allclose(x.grad, per_img / std.view(1, 3, 1, 1).expand(2, 3, 2, 2))


# Counts are integer atomic adds on CUDA: exact in any order, so compared bit for bit on every device.
@pytest.mark.parametrize("bk, device", smoothing_backends())
def test_count_matches_reference(bk, device):
    logits = torch.randn(37, 5)
    logits[3, 1] = logits[3, 4] = 50.0                        # a tie: the first maximum wins
    group = torch.randint(0, 4, (37,))
    want = ref.smoothing_count(logits, group, 4)
    with backend(bk):
        got = smoothing_count(*to(device, logits, group), 4)
        got_bf16 = smoothing_count(*to(device, logits.bfloat16(), group), 4)
        empty = smoothing_count(*to(device, torch.zeros(0, 5), torch.zeros(0, dtype=torch.int64)), 2)
    assert got.device.type == got_bf16.device.type == empty.device.type == device
    got, got_bf16, empty = got.cpu(), got_bf16.cpu(), empty.cpu()
    assert torch.equal(got, want) and int(got[group[3], 1]) >= 1
    assert torch.equal(got_bf16, ref.smoothing_count(logits.bfloat16(), group, 4))
    assert torch.equal(empty, torch.zeros(2, 5, dtype=torch.int64))
    assert int(got.sum()) == 37


@pytest.mark.parametrize("bk, device", smoothing_backends())
def test_opcheck(bk, device):
    x, seed = to(device, torch.rand(2, 3, 2, 3), torch.tensor([5]))
    src, counter = to(device, *_meta(4, 2))
    with backend(bk):
        torch.library.opcheck(torch.ops.robustkern.smoothing_noise.default,
                              (x, src, counter, seed, 0.5, None, None, torch.float32))
        torch.library.opcheck(torch.ops.robustkern.smoothing_noise.default,
                              (x, src, counter, seed, 0.5, *to(device, torch.zeros(3), torch.ones(3)),
                               torch.bfloat16), test_utils=("test_schema", "test_faketensor"))
        torch.library.opcheck(torch.ops.robustkern.smoothing_count.default,
                              (*to(device, torch.randn(9, 4), torch.randint(0, 3, (9,))), 3))


def test_bad_input():
    x = torch.rand(2, 3, 2, 2)
    src, counter = _meta(3, 2)
    with pytest.raises(ValueError, match="sigma"):
        smoothing_noise(x, src, counter, 0, 0.0)
    with pytest.raises(ValueError, match="counter"):
        smoothing_noise(x, src, counter[:, :2], 0, 0.5)
    with pytest.raises(ValueError, match="seed"):
        smoothing_noise(x, src, counter, -1, 0.5)
    with pytest.raises(ValueError, match="mean"):
        smoothing_noise(x, src, counter, 0, 0.5, mean=torch.zeros(2), std=torch.ones(2))
    with pytest.raises(TypeError):
        smoothing_noise(x.long(), src, counter, 0, 0.5)
    with pytest.raises(ValueError, match="logits"):
        smoothing_count(torch.randn(3), torch.zeros(3, dtype=torch.int64), 1)
    with pytest.raises(ValueError, match="group"):
        smoothing_count(torch.randn(3, 2), torch.zeros(2, dtype=torch.int64), 1)


def test_auto_falls_back_without_compiled_kernels(monkeypatch):
    """An extension without the smoothing kernels (an older build, or none for this device): ``auto`` runs the
    reference, an explicit compiled backend raises."""
    from robustkern import _backend

    x = torch.rand(2, 3, 2, 2)
    src, counter = _meta(3, 2)
    want = ref.smoothing_noise(x, src, counter, torch.tensor([4]), 0.5, None, None, torch.float32)
    with backend("auto"):
        assert torch.equal(smoothing_noise(x, src, counter, 4, 0.5), want)
    from robustkern.ops.smoothing import SMOOTHING_NOISE

    monkeypatch.setattr(SMOOTHING_NOISE, "kernels", ("triton",))   # as if the extension had no such kernel
    monkeypatch.setattr(SMOOTHING_NOISE, "_choice", {})
    with backend("auto"):
        assert torch.equal(smoothing_noise(x, src, counter, 4, 0.5), want)
    if _backend.available("cpp", "cpu"):
        with backend("cpp"), pytest.raises(_backend.BackendUnavailable):
            smoothing_noise(x, src, counter, 4, 0.5)


def test_cpp_kernels_registered():
    """The compiled extension has CPU kernels for both smoothing ops."""
    from robustkern import _backend, _ext

    if not _ext.load():
        pytest.skip(f"no compiled extension here ({_ext.status()})")
    assert _backend.available("cpp", "cpu", op="smoothing_noise")
    assert _backend.available("cpp", "cpu", op="smoothing_count")


@pytest.mark.parametrize("bk, device", smoothing_backends())
def test_noise_matches_reference_large(bk, device):
    """Several chunks per row, channels not aligned to chunks, many rows across threads, odd seed words."""
    if bk == "triton" and device == "cpu":
        pytest.skip("interpreted Triton: tiny shapes only")
    x = torch.randn(3, 3, 17, 19)
    src, counter = _meta(40, 3, stream=2, start=2 ** 32 - 40)
    counter[:, 0] = torch.arange(40) * 97 + 2 ** 31
    mean, std = torch.tensor([0.1, -0.2, 0.3]), torch.tensor([0.7, 1.3, 0.9])
    seed = 2 ** 63 - 1 - 12345
    for out_dtype in (torch.float32, torch.float16):
        with backend(bk):
            got = smoothing_noise(*to(device, x, src, counter), seed, 0.25, mean=mean.to(device), std=std.to(device),
                                  out_dtype=out_dtype)
        assert_noise_is_reference(got, device, x, src, counter, torch.tensor([seed]), 0.25, mean, std, out_dtype)


@pytest.mark.parametrize("bk, device", smoothing_backends())
def test_count_ties_and_dtypes(bk, device):
    """All-equal rows vote for class 0; ties after the first maximum lose; float64 and float16 logits."""
    logits = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0], [-1.0, -3.0, -1.0], [5.0, 6.0, 7.0]])
    group = torch.tensor([0, 1, 1, 0])
    want = torch.tensor([[1, 0, 1], [1, 1, 0]])
    with backend(bk):
        for dt in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            assert torch.equal(smoothing_count(*to(device, logits.to(dt), group), 2).cpu(), want)
        big = torch.randn(300, 10, dtype=torch.float64)
        g = torch.randint(0, 7, (300,))
        assert torch.equal(smoothing_count(*to(device, big, g), 7).cpu(), ref.smoothing_count(big, g, 7))
