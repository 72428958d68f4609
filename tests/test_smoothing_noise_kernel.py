"""The C++ smoothing-noise kernel (csrc/cpu/smoothing_cpu.cpp, smoothing_normal_avx2.cpp) against the reference
on millions of elements, on both of its paths (AVX2 + FMA with its own float64 log / sin / cos, and the
portable one with ATen's), and the block layout of the noise spec (four normals per Philox call)."""
import pytest
import torch

from robustkern import _ext
from robustkern.ops import smoothing_noise
from robustkern.reference import smoothing as ref
from robustkern.testing import backend, portable_simd

from _devices import backend_device_params, to
from test_smoothing_ops import assert_noise_is_reference

PATHS = ["vector", "portable"]


def _cpp_noise(monkeypatch, path, *args):
    if not _ext.load() or not hasattr(torch.ops.robustkern, "smoothing_noise"):
        pytest.skip(f"no compiled smoothing kernels here ({_ext.status()})")
    with portable_simd(path == "portable"):
        return torch.ops.robustkern.smoothing_noise(*args)


@pytest.mark.parametrize("path", PATHS)
def test_normals_bit_identical_on_millions(monkeypatch, path):
    """x = 0, sigma = 1: the kernel's output is the fp32 normal itself. Independent float64 log / sin / cos
    implementations agree after the rounding to fp32 except within an ulp or two of an fp32 rounding
    boundary (~1e-8 per element): at most a couple of mismatches over 2.5M elements, each of one fp32 ulp
    (measured: 0 on AMD EPYC / torch 2.13 for both paths)."""
    rows = 800 if path == "vector" else 200
    x = torch.zeros(1, 3, 32, 32)
    src = torch.zeros(rows, dtype=torch.int64)
    counter = torch.stack([torch.full((rows,), 2 ** 32 - 3), torch.arange(rows) * 7919 + 11,
                           torch.full((rows,), 1)], 1)
    seed = torch.tensor([0x5DEECE66D])
    got = _cpp_noise(monkeypatch, path, x, src, counter, seed, 1.0, None, None, torch.float32)
    want = ref.smoothing_noise(x, src, counter, seed, 1.0, None, None, torch.float32)
    bad = got != want
    assert int(bad.sum()) <= 2, f"{int(bad.sum())} mismatches in {got.numel()}"
    ulps = (got[bad].view(torch.int32).long() - want[bad].view(torch.int32).long()).abs()
    assert bool((ulps <= 1).all())
    assert abs(float(got.mean())) < 3e-3 and abs(float(got.std()) - 1) < 3e-3


@pytest.mark.parametrize("path", PATHS)
def test_chunks_tails_and_normalisation(monkeypatch, path):
    """Rows of 6345 elements (several kernel chunks, not a multiple of 4), normalisation, bf16 output, the
    largest counter words."""
    x = torch.rand(2, 3, 45, 47)
    src = torch.tensor([1, 0, 1, 1, 0])
    counter = torch.stack([torch.tensor([0, 2 ** 32 - 1, 5, 6, 7]), torch.arange(5) + 2 ** 32 - 5,
                           torch.tensor([0, 1, 2, 2 ** 32 - 1, 0])], 1)
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.3, 0.25])
    seed = torch.tensor([2 ** 63 - 2])
    for dt in (torch.float32, torch.bfloat16):
        got = _cpp_noise(monkeypatch, path, x, src, counter, seed, 0.5, mean, std, dt)
        want = ref.smoothing_noise(x, src, counter, seed, 0.5, mean, std, dt)
        assert torch.equal(got, want)


def test_block_layout_and_independence():
    """Element e is lane e % 4 of Philox block e // 4: (rho_A cos, rho_A sin, rho_B cos, rho_B sin); the two
    outputs of a Box-Muller pair and the two pairs of a block are uncorrelated standard normals."""
    blocks = torch.arange(100_000)
    z4 = ref.normals_from_block(blocks, torch.tensor(3), torch.tensor(1), torch.tensor(0), 11)
    elem = torch.arange(40)
    assert torch.equal(ref.normal_from_counter(elem, torch.tensor(3), torch.tensor(1), torch.tensor(0), 11),
                       z4[:10].reshape(-1))
    o0, o1, _, _ = ref.philox4x32(blocks[:5], torch.tensor(3), torch.tensor(1), torch.tensor(0), 11)
    u1 = (o0.double() + 0.5) * 2.0 ** -32
    theta = ref.TWO_PI * ((o1.double() + 0.5) * 2.0 ** -32)
    assert torch.equal(z4[:5, 1], (torch.sqrt(-2.0 * torch.log(u1)) * torch.sin(theta)).float())
    zz = z4.double()
    corr = torch.corrcoef(zz.T)
    assert float((corr - torch.eye(4, dtype=torch.float64)).abs().max()) < 0.015
    assert float((zz ** 2).mean()) == pytest.approx(1.0, abs=0.01)
    # the squared radius of a pair is chi-square(2), i.e. exponential with mean 2
    r2 = zz[:, 0] ** 2 + zz[:, 1] ** 2
    assert float((r2 > 2 * 2.302585).double().mean()) == pytest.approx(0.1, abs=0.004)


@pytest.mark.parametrize("bk, device", backend_device_params())
def test_channels_last_input_gives_channels_last_output(bk, device):
    """A channels-last x gives a channels-last output on every backend (the C++ kernel writes it directly),
    with the same values as the NCHW reference (on CUDA up to the contraction of x + sigma z, as in
    test_smoothing_ops.py); opcheck checks the fake tensor's strides."""
    x = torch.rand(2, 3, 5, 7).contiguous(memory_format=torch.channels_last)
    src = torch.tensor([0, 1, 1])
    counter = torch.tensor([[0, 1, 2], [1, 2, 3], [5, 6, 2 ** 32 - 1]])
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    xd, srcd, counterd = to(device, x, src, counter)
    assert xd.is_contiguous(memory_format=torch.channels_last)
    with backend(bk):
        for m, s in ((None, None), (mean, std)):
            got = smoothing_noise(xd, srcd, counterd, 3, 0.3, mean=to(device, m)[0], std=to(device, s)[0])
            assert not got.is_contiguous() and got.is_contiguous(memory_format=torch.channels_last)
            assert_noise_is_reference(got, device, x.contiguous(), src, counter, torch.tensor([3]), 0.3, m, s,
                                      torch.float32)
        torch.library.opcheck(torch.ops.robustkern.smoothing_noise.default,
                              (xd, srcd, counterd, torch.tensor([3], device=device), 0.3, *to(device, mean, std),
                               torch.bfloat16))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 24, 24), (4, 8, 12), (3, 5, 7), (5, 8, 8)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_channels_last_output_is_the_nchw_output_bit_for_bit(monkeypatch, path, shape, out_dtype):
    """The channels-last output (written pixel-major for 2 <= C <= 4 and H*W a multiple of 4, in blocks of 512
    pixels: (3, 24, 24) has two; else channel by channel) holds exactly the NCHW output's values, with and
    without normalisation, on both generator paths."""
    c = shape[0]
    x = torch.rand((2,) + shape)
    src = torch.tensor([1, 0, 1])
    counter = torch.tensor([[0, 1, 2], [1, 2, 3], [5, 6, 2 ** 32 - 1]])
    seed = torch.tensor([77])
    xcl = x.contiguous(memory_format=torch.channels_last)
    for mean, std in ((None, None), (torch.linspace(0.1, 0.4, c), torch.linspace(0.5, 0.8, c))):
        want = _cpp_noise(monkeypatch, path, x, src, counter, seed, 0.3, mean, std, out_dtype)
        got = _cpp_noise(monkeypatch, path, xcl, src, counter, seed, 0.3, mean, std, out_dtype)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert c == 1 or not got.is_contiguous()  # one channel: the two layouts are the same memory
        assert torch.equal(got, want)
        if path == "vector" and out_dtype == torch.float32:
            assert_noise_is_reference(got, "cpu", x, src, counter, seed, 0.3, mean, std, out_dtype)
