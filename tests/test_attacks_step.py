"""The fused projected-gradient step ``robustkern::pgd_step`` against the reference on every backend present
(Triton interpreted on the CPU, or compiled on CUDA when a GPU is present: tests/_devices.py; the reference on
the CPU): values (both norms, float32/float64, odd and empty shapes, non-contiguous inputs, per-example
eps/alpha), the ball and [0, 1] constraints, gradients against the reference's autograd, opcheck, bad input."""
import pytest
import torch

import robustkern
from _devices import backend_device_params, device_params, to
from robustkern import testing
from robustkern.ops import pgd_step
from robustkern.reference.attacks import pgd_step as ref_step

NORMS = ["linf", "l2"]
DTYPES = [torch.float32, torch.float64]
# the last one (a CIFAR-10 batch) is not run by the interpreted Triton kernels
SHAPES = [(3, 1, 5, 7), (4, 33), (1, 2, 3, 3), (5, 1030), (64, 3, 32, 32)]


def _inputs(shape, dtype, seed=0, eps_scale=0.3):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(shape, generator=g, dtype=torch.float64)
    xa = (x0 + 0.2 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    grad.view(-1)[::7] = 0.0  # sign(0) = 0
    b = shape[0]
    eps = torch.rand(b, generator=g, dtype=torch.float64) * eps_scale
    eps[0] = 0.0 if b > 2 else eps[0]
    alpha = torch.rand(b, generator=g, dtype=torch.float64) * 0.2 + 0.01
    return [t.to(dtype) for t in (xa, grad, x0, eps, alpha)]


def _ball_violation(out, x0, eps, norm):
    d = (out.double() - x0.double()).reshape(out.shape[0], -1)
    n = d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
    return float((n - eps.double()).max()) if n.numel() else 0.0


def _skip_missing(backend):
    if backend in ("cpp", "cuda") and not hasattr(torch.ops.robustkern, "pgd_step"):
        pytest.skip("the compiled extension has no pgd_step kernel (Triton and reference only)")


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("shape", SHAPES)
def test_step_matches_reference(backend, device, dtype, norm, shape):
    _skip_missing(backend)
    if backend == "triton" and device == "cpu" and shape[0] == 64:
        pytest.skip("interpreted Triton: tiny shapes only")
    xa, g, x0, eps, alpha = _inputs(shape, dtype)
    with robustkern.use_backend(backend):
        out = pgd_step(*to(device, xa, g, x0, eps, alpha), norm)
    assert out.device.type == device
    out = out.cpu()
    ref = ref_step(xa, g, x0, eps, alpha, norm)
    torch.testing.assert_close(out, ref, **testing.tolerance(dtype))
    assert out.min() >= 0 and out.max() <= 1
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    assert _ball_violation(out, x0, eps, norm) <= slack


@pytest.mark.parametrize("backend, device", backend_device_params())
@pytest.mark.parametrize("norm", NORMS)
def test_step_noncontiguous_scalar_eps_and_empty(backend, device, norm):
    _skip_missing(backend)
    xa, g, x0, eps, alpha = _inputs((6, 4, 5), torch.float32)
    xa_t, g_t, x0_t = (t.transpose(1, 2) for t in (xa, g, x0))  # non-contiguous (6, 5, 4)
    xa_d, g_d, x0_d, eps_d, alpha_d = to(device, xa, g, x0, eps, alpha)
    with robustkern.use_backend(backend):
        out = pgd_step(*(t.transpose(1, 2) for t in (xa_d, g_d, x0_d)), 0.1, 0.05, norm)
        empty = pgd_step(xa_d[:0], g_d[:0], x0_d[:0], eps_d[:0], alpha_d[:0], norm)
    assert out.device.type == empty.device.type == device
    e, a = torch.full((6,), 0.1), torch.full((6,), 0.05)
    torch.testing.assert_close(out.cpu(), ref_step(xa_t, g_t, x0_t, e, a, norm), **testing.tolerance(torch.float32))
    assert empty.shape == (0, 4, 5)


# The default backend: C++ or the reference on the CPU, Triton on CUDA.
@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("norm", NORMS)
def test_step_gradients_match_reference_autograd(norm, device):
    args = _inputs((3, 2, 4), torch.float64, seed=3, eps_scale=0.05)
    leaves = [t.clone().to(device).requires_grad_(True) for t in args]
    out = pgd_step(*leaves, norm)
    w = torch.randn(out.shape, dtype=out.dtype)
    got = torch.autograd.grad((out * w.to(device)).sum(), leaves, allow_unused=True)
    ref_leaves = [t.clone().requires_grad_(True) for t in args]
    want = torch.autograd.grad((ref_step(*ref_leaves, norm) * w).sum(), ref_leaves, allow_unused=True)
    for a, b in zip(got, want):
        assert a.device.type == device
        a = a.cpu()
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("norm", NORMS)
def test_step_opcheck(norm, device):
    xa, g, x0, eps, alpha = to(device, *_inputs((3, 2, 4), torch.float32, seed=1))
    torch.library.opcheck(torch.ops.robustkern.pgd_step.default, (xa, g, x0, eps, alpha, norm))
    args = [t.clone().requires_grad_(True) for t in (xa, g, x0, eps, alpha)]
    torch.library.opcheck(torch.ops.robustkern.pgd_step.default, (*args, norm))


def test_step_bad_input():
    xa, g, x0, eps, alpha = _inputs((3, 4), torch.float32)
    with pytest.raises(ValueError, match="norm"):
        pgd_step(xa, g, x0, eps, alpha, "l1")
    with pytest.raises(ValueError, match="grad must match"):
        pgd_step(xa, g[:2], x0, eps, alpha)
    with pytest.raises(ValueError, match="eps must be"):
        pgd_step(xa, g, x0, eps[:2], alpha)
    with pytest.raises(TypeError, match="float32 or float64"):
        pgd_step(xa.half(), g.half(), x0.half(), eps, alpha)


def test_explicit_cpp_backend_without_kernel_raises():
    if not robustkern._backend.available("cpp") or hasattr(torch.ops.robustkern, "pgd_step"):
        pytest.skip("needs the compiled extension without a pgd_step kernel")
    xa, g, x0, eps, alpha = _inputs((3, 4), torch.float32)
    with robustkern.use_backend("cpp"), pytest.raises(robustkern.BackendUnavailable, match="pgd_step"):
        pgd_step(xa, g, x0, eps, alpha)
