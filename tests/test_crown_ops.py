"""CROWN ops (robustkern::crown_relu_backward, robustkern::crown_concretize): Triton (interpreted on the CPU with
tiny shapes, compiled on CUDA when a GPU is present: tests/_devices.py), C++ (forward and the fused backward ops)
and reference agree, opcheck, gradcheck in float64, the relaxation is valid, bad input."""
import os

import pytest
import torch

from _devices import backend_device_params, device_params, sized, to
from robustkern import use_backend
from robustkern.ops import crown_concretize, crown_relu_backward
from robustkern.reference import crown as R
from robustkern.reference.crown import relu_relaxation
from robustkern.testing import backends_for

BACKENDS = backend_device_params("reference", "cpp", "triton")
needs_cpp = pytest.mark.skipif("cpp" not in backends_for("cpu"), reason="the compiled extension is not available")

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def make(B=2, S=3, N=37, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, S, N, generator=g, dtype=dtype)
    c = torch.randn(B, N, generator=g, dtype=dtype)
    r = torch.rand(B, N, generator=g, dtype=dtype) * 1.5
    lo, hi = c - r, c + r
    lo[:, :3] = hi[:, :3] = 0.0           # degenerate l = u = 0
    lo[:, 3], hi[:, 3] = 0.2, 0.5         # stable active
    lo[:, 4], hi[:, 4] = -0.5, -0.2       # stable inactive
    return A, lo, hi


# N = 37: one block of the Triton kernels; on CUDA N = 2100 also loops over three blocks of 1024
@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("upper_side", [False, True])
def test_relu_backward_matches_reference(backend, device, dtype, mode, upper_side):
    A, lo, hi = make(N=sized(device, 37, 2100), dtype=dtype)
    want = R.crown_relu_backward(A, lo, hi, mode, upper_side)
    with use_backend(backend):
        got = crown_relu_backward(*to(device, A, lo, hi), mode, upper_side)
    for g, w in zip(got, want):
        assert g.device.type == device
        torch.testing.assert_close(g.cpu(), w, **TOL[dtype])


@pytest.mark.parametrize("backend, device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("l2", [False, True])
@pytest.mark.parametrize("upper_side", [False, True])
def test_concretize_matches_reference(backend, device, dtype, l2, upper_side):
    A, lo, hi = make(N=sized(device, 37, 2100), dtype=dtype)
    bias = torch.randn(2, 3, dtype=dtype)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    center, eps = (mid + 0.01, torch.tensor([0.3, 2.0], dtype=dtype)) if l2 else (None, None)
    want = R.crown_concretize(A, bias, mid, rad, center, eps, upper_side)
    with use_backend(backend):
        got = crown_concretize(*to(device, A, bias, mid, rad, center, eps), upper_side)
    assert got.device.type == device
    torch.testing.assert_close(got.cpu(), want, **TOL[dtype])


@pytest.mark.parametrize("device", device_params())
def test_relaxation_is_valid_and_bias_is_consistent(device):
    A, lo, hi = to(device, *make(N=200))     # auto backend: C++ or the reference on the CPU, Triton on CUDA
    for mode in range(4):
        d_l, d_u, b_u = relu_relaxation(lo, hi, mode)
        t = torch.rand(50, *lo.shape, dtype=lo.dtype, device=device)
        z = lo + t * (hi - lo)
        assert bool((torch.relu(z) <= d_u * z + b_u + 1e-12).all())
        assert bool((torch.relu(z) >= d_l * z - 1e-12).all())
        assert bool(((d_l >= 0) & (d_l <= 1)).all())
        # the backward step is a valid lower/upper linear bound of A relu(z)
        Al, bl = crown_relu_backward(A, lo, hi, mode, False)
        Au, bu = crown_relu_backward(A, lo, hi, mode, True)
        f = torch.einsum("bsn,tbn->tbs", A, torch.relu(z))
        assert bool((torch.einsum("bsn,tbn->tbs", Al, z) + bl <= f + 1e-9).all())
        assert bool((torch.einsum("bsn,tbn->tbs", Au, z) + bu >= f - 1e-9).all())


@pytest.mark.parametrize("mode", [0, 3])
@pytest.mark.parametrize("upper_side", [False, True])
def test_relu_backward_opcheck_and_gradcheck(mode, upper_side):
    A, lo, hi = make(B=2, S=2, N=6)
    lo[:, :3] -= 0.05  # keep away from the kinks (u = 0, l = 0) for finite differences
    hi[:, :3] += 0.07
    args = (A, lo, hi, mode, upper_side)
    with use_backend("reference"):
        torch.library.opcheck(torch.ops.robustkern.crown_relu_backward.default, args)
        A, lo, hi = (t.clone().requires_grad_() for t in (A, lo, hi))
        torch.autograd.gradcheck(lambda a, l, u: crown_relu_backward(a, l, u, mode, upper_side), (A, lo, hi))
        torch.autograd.gradgradcheck(lambda a, l, u: crown_relu_backward(a, l, u, mode, upper_side), (A, lo, hi))


@pytest.mark.parametrize("l2", [False, True])
def test_concretize_opcheck_and_gradcheck(l2):
    A, lo, hi = make(B=2, S=2, N=5)
    bias = torch.randn(2, 2, dtype=torch.float64)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    center, eps = (mid + 0.01, torch.tensor([0.3, 2.0], dtype=torch.float64)) if l2 else (None, None)
    with use_backend("reference"):
        torch.library.opcheck(torch.ops.robustkern.crown_concretize.default, (A, bias, mid, rad, center, eps, False))
        ts = [t.clone().requires_grad_() for t in (A, bias, mid, rad)]
        extra = [t.clone().requires_grad_() for t in (center, eps)] if l2 else []
        fn = (lambda a, b, m, r, c, e: crown_concretize(a, b, m, r, c, e, True)) if l2 else \
            (lambda a, b, m, r: crown_concretize(a, b, m, r, upper_side=True))
        torch.autograd.gradcheck(fn, tuple(ts + extra))


def test_bad_input_is_a_clear_error():
    A, lo, hi = make()
    with pytest.raises(ValueError, match="lower must have shape"):
        crown_relu_backward(A, lo[:1], hi)
    with pytest.raises(ValueError, match="mode must be one of"):
        crown_relu_backward(A, lo, hi, "magic")
    with pytest.raises(TypeError, match="float32 or float64"):
        crown_relu_backward(A.half(), lo, hi)
    with pytest.raises(ValueError, match="A must be"):
        crown_concretize(A[0], lo, lo, hi)
    with pytest.raises(ValueError, match="both center and eps"):
        crown_concretize(A, torch.zeros(2, 3, dtype=A.dtype), lo, hi, center=lo)
    with pytest.raises(ValueError, match="dtype and device"):
        crown_relu_backward(A, lo.float(), hi)


def test_empty_batch():
    A = torch.zeros(0, 3, 5)
    out, b = crown_relu_backward(A, torch.zeros(0, 5), torch.zeros(0, 5))
    assert out.shape == (0, 3, 5) and b.shape == (0, 3)


def _relu_grads(backend, A, lo, hi, mode, upper_side, gA, gb):
    with use_backend(backend):
        a, l, u = (t.clone().requires_grad_() for t in (A, lo, hi))
        out, b = crown_relu_backward(a, l, u, mode, upper_side)
        torch.autograd.backward((out, b), (gA, gb))
    return a.grad, l.grad, u.grad


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", [0, 1, 2, 3])
@pytest.mark.parametrize("upper_side", [False, True])
def test_cpp_fused_relu_backward_grad_matches_differentiable_formulas(dtype, mode, upper_side):
    # N > 2048: more than one block of the blocked C++ pass; degenerate/stable neurons included by make()
    A, lo, hi = make(B=2, S=3, N=2100, dtype=dtype, seed=1)
    g = torch.Generator().manual_seed(2)
    gA, gb = torch.randn(A.shape, generator=g, dtype=dtype), torch.randn(2, 3, generator=g, dtype=dtype)
    got = _relu_grads("cpp", A, lo, hi, mode, upper_side, gA, gb)
    want = _relu_grads("reference", A, lo, hi, mode, upper_side, gA, gb)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, **TOL[dtype])
    # only A needs a gradient: the op skips the sums for lower/upper
    with use_backend("cpp"):
        a = A.clone().requires_grad_()
        out, b = crown_relu_backward(a, lo, hi, mode, upper_side)
        torch.autograd.backward((out, b), (gA, gb))
    torch.testing.assert_close(a.grad, want[0], **TOL[dtype])


@needs_cpp
@pytest.mark.parametrize("upper_side", [False, True])
def test_cpp_large_outputs_with_huge_page_advice_match_reference(upper_side):
    # outputs of >= 8 MB are allocated with madvise(MADV_HUGEPAGE) on their 2 MB-aligned interior
    # (csrc/include/robustkern/alloc.h): the advice must not change a value, including the first and last
    # elements outside the aligned interior
    A, lo, hi = make(B=2, S=3, N=(9 << 20) // 24 + 5, dtype=torch.float32, seed=4)
    assert A.nbytes >= 8 << 20
    g = torch.Generator().manual_seed(5)
    gA, gb = torch.randn(A.shape, generator=g), torch.randn(2, 3, generator=g)
    want = R.crown_relu_backward(A, lo, hi, 0, upper_side)
    with use_backend("cpp"):
        got = crown_relu_backward(A, lo, hi, 0, upper_side)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, **TOL[torch.float32])
    got = _relu_grads("cpp", A, lo, hi, 0, upper_side, gA, gb)
    want = _relu_grads("reference", A, lo, hi, 0, upper_side, gA, gb)
    for x, w in zip(got, want):
        torch.testing.assert_close(x, w, **TOL[torch.float32])


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("upper_side", [False, True])
def test_cpp_fused_concretize_grad_matches_differentiable_formulas(dtype, upper_side):
    A, lo, hi = make(B=2, S=3, N=2100, dtype=dtype, seed=3)
    A[:, :, :4] = 0.0                      # sign(0) = 0
    bias = torch.randn(2, 3, dtype=dtype)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    g = torch.randn(2, 3, dtype=dtype)
    grads = {}
    for backend in ("cpp", "reference"):
        with use_backend(backend):
            ts = [t.clone().requires_grad_() for t in (A, bias, mid, rad)]
            crown_concretize(*ts, upper_side=upper_side).backward(g)
        grads[backend] = [t.grad for t in ts]
    for x, w in zip(grads["cpp"], grads["reference"]):
        torch.testing.assert_close(x, w, **TOL[dtype])


@needs_cpp
@pytest.mark.parametrize("mode", [0, 3])
def test_cpp_opcheck_and_gradcheck(mode):
    A, lo, hi = make(B=2, S=2, N=6)
    lo[:, :3] -= 0.05
    hi[:, :3] += 0.07
    bias = torch.randn(2, 2, dtype=torch.float64)
    mid, rad = (lo + hi) / 2, (hi - lo) / 2
    with use_backend("cpp"):
        torch.library.opcheck(torch.ops.robustkern.crown_relu_backward.default, (A, lo, hi, mode, False))
        torch.library.opcheck(torch.ops.robustkern.crown_concretize.default, (A, bias, mid, rad, None, None, True))
        ts = tuple(t.clone().requires_grad_() for t in (A, lo, hi))
        # first order: the fused C++ backward; second order: the differentiable formulas
        torch.autograd.gradcheck(lambda a, l, u: crown_relu_backward(a, l, u, mode, True), ts)
        torch.autograd.gradgradcheck(lambda a, l, u: crown_relu_backward(a, l, u, mode, False), ts)
        cs = tuple(t.clone().requires_grad_() for t in (A, bias, mid, rad))
        torch.autograd.gradcheck(lambda a, b, m, r: crown_concretize(a, b, m, r), cs)


@needs_cpp
def test_cpp_kernels_reject_bad_input():
    A, lo, hi = make()
    ext = torch.ops.robustkern
    with pytest.raises(RuntimeError, match="crown_relu_backward: lower(_in)? must have shape"):
        ext.crown_relu_backward(A, lo[:1], hi, 0, False)
    with pytest.raises(RuntimeError, match="mode must be 0..3"):
        ext.crown_relu_backward(A, lo, hi, 7, False)
    with pytest.raises(RuntimeError, match="crown_relu_backward_grad: g_bias(_in)? must have shape"):
        ext.crown_relu_backward_grad(A, lo, hi, 0, False, A, lo, True)
    with pytest.raises(RuntimeError, match="give both center and eps"):
        ext.crown_concretize(A, torch.zeros(2, 3, dtype=A.dtype), lo, hi, lo, None, False)
    with pytest.raises(RuntimeError, match="crown_concretize_grad: rad(_in)? has dtype"):
        ext.crown_concretize_grad(A, lo, hi.float(), torch.zeros(2, 3, dtype=A.dtype), False)


_HUGE_PAGE_PROBE = """
import sys, torch
sys.path.insert(0, {root!r})
import robustkern.ops
from robustkern.ops import cpu_options
assert robustkern.ops.load()
{setup}
A = torch.randn(2, 3, 700000)
lo, hi = -torch.rand(2, 700000), torch.rand(2, 700000)
out, _ = torch.ops.robustkern.crown_relu_backward(A, lo, hi, 0, False)
p = out.data_ptr()
flags = None
for line in open("/proc/self/smaps"):
    head = line.split()
    if "-" in head[0] and len(head) >= 5:
        lo_, hi_ = (int(v, 16) for v in head[0].split("-"))
        inside = lo_ <= p + (4 << 20) < hi_
    elif head[0] == "VmFlags:" and inside:
        flags = head[1:]
print("hg" in flags)
"""


@needs_cpp
@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc/self/smaps")
@pytest.mark.parametrize("setup, advised", [("", True), ("cpu_options(huge_pages=False)", False)])
def test_large_outputs_are_advised_onto_huge_pages_unless_turned_off(setup, advised):
    # csrc/include/robustkern/alloc.h: a >= 8 MB output's memory carries MADV_HUGEPAGE (VmFlags "hg"),
    # and robustkern.ops.cpu_options(huge_pages=False) turns the advice off
    import subprocess
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", _HUGE_PAGE_PROBE.format(root=root, setup=setup)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(advised)
